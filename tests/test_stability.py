"""The stability the batch recluster job promises, at a small size (benchmarks/stability.py at
2,000 synthetic faces, the same functions): re-clustering twice changes nothing, every decision
of the user survives both re-clusterings, and once 10% more photos arrive every named person
keeps at least 99% of the faces it had."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from services.store.db import make_engine, migrate, session_factory
from testdb import scratch_pg_database

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from stability import run, synthetic  # noqa: E402

KINDS = ("names", "hidden", "favourite", "covers", "placed", "rejected", "merged")


@pytest.fixture
def sessions(request, tmp_path):
    if request.param == "postgres":
        with scratch_pg_database(request.getfixturevalue("pg_url")) as url:
            engine = make_engine(url)
            migrate(engine)
            yield session_factory(engine)
            engine.dispose()
        return
    path = tmp_path / "facecluster.db"
    shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
    engine = make_engine(f"sqlite:///{path}")
    yield session_factory(engine)
    engine.dispose()


@pytest.mark.parametrize(("sessions", "seed"), [("sqlite", 0), ("sqlite", 1),
                                                pytest.param("postgres", 0, marks=pytest.mark.cloud)],
                         indirect=["sessions"])
def test_reclustering_is_stable_and_keeps_every_decision(sessions, seed):
    r = run(sessions, synthetic(2000, seed), edits=10, seed=seed)
    assert all(r["decisions"][k] > 0 for k in KINDS), r["decisions"]  # the user did decide every kind
    assert r["named"] >= 50 and r["added_faces"] > 100

    second = r["second"]
    assert all(n == 0 for n in second["plan"].values()), second
    assert all(n == 0 for n in second["rows_changed"].values()), second
    assert second["decisions_kept"] == 1.0

    added = r["added"]
    assert any(added["plan"].values())  # the new photos did change something
    assert added["decisions_kept"] == 1.0, added["decisions_lost"]
    assert added["named_keep"]["below_99"] == 0, added["worst_named"]
