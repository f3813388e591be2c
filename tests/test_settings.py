"""Settings precedence: overrides > env vars > TOML file > defaults."""

from facecore.settings import Settings, load_settings


def test_precedence(tmp_path, monkeypatch):
    cfg = tmp_path / "fc.toml"
    cfg.write_text('min_face_size = 33\nbatch_size = 7\ndatabase_url = "sqlite:///from-file.db"\n')
    monkeypatch.setenv("FACECLUSTER_BATCH_SIZE", "9")
    s = load_settings(cfg, database_url="sqlite:///override.db")
    assert s.min_face_size == 33  # from the file
    assert s.batch_size == 9  # env beats file
    assert s.database_url == "sqlite:///override.db"  # explicit override beats both
    # the file given to one call does not leak into the next
    assert Settings().min_face_size == Settings.model_fields["min_face_size"].default


def test_env_file_variable(tmp_path, monkeypatch):
    cfg = tmp_path / "fc.toml"
    cfg.write_text('providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]\n')
    monkeypatch.setenv("FACECLUSTER_CONFIG", str(cfg))
    assert Settings().providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
