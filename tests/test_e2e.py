"""End to end on real photos: a few hundred LFW-dev photos through `facecluster index`,
`cluster` and `export`, judged by the independent scorer in ../shared/bench."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

from badinput import lfw_dev

from services.cli import main

REPO = Path(__file__).resolve().parents[1]
SCORER = REPO.parent / "shared" / "bench" / "lfw_score.py"


def pick_people(images: Path, photos: int) -> list[Path]:
    """Every 7th identity with at least two photos, until ~`photos` photos: clusters to find,
    and singletons between them to keep apart."""
    chosen, total = [], 0
    for i, d in enumerate(sorted(p for p in images.iterdir() if p.is_dir())):
        n = len(list(d.glob("*.jpg")))
        if i % 7 == 0 or n >= 4:
            chosen.append(d)
            total += n
        if total >= photos:
            break
    return chosen


def test_index_cluster_export_is_pure(tmp_path, capsys):
    assert SCORER.is_file(), f"independent scorer missing at {SCORER}"
    root = tmp_path / "photos"
    for d in pick_people(lfw_dev() / "images", 300):
        shutil.copytree(d, root / d.name)
    db = f"sqlite:///{tmp_path / 'fc.db'}"
    assert main(["index", str(root), "--db", db, "--threads", "2"]) == 0
    assert main(["cluster", "--db", db]) == 0
    out = tmp_path / "faces.csv"
    assert main(["export", "--db", db, "--out", str(out)]) == 0
    proc = subprocess.run([sys.executable, str(SCORER), "clusters", str(root), str(out)],
                          capture_output=True, text=True, check=True)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["photos"] >= 300
    assert m["detection_coverage"] == 1.0
    assert m["bcubed_precision"] >= 0.98, m
    assert m["bcubed_f1"] >= 0.97, m
    assert m["pairwise_precision"] >= 0.97, m
