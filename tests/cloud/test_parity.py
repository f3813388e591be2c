"""The same photos give the same albums embedded and in the cloud (docs/ARCHITECTURE.md, "One
clustering policy").

About 250 LFW-dev photos go once through `facecluster run` on SQLite, and once through
`facecluster publish`, the ingest worker and the cluster worker on the real PostgreSQL and Kafka.
The two workers run side by side, so faces reach the cluster worker in many small batches, as
uploads do. The photos are whole identities (every 7th one, and every one with 4 photos or more,
at most 6 photos each), so there are albums to find, look-alikes to keep apart, and lone faces
that must stay in no album. The albums, as partitions of (photo uri, face index), must be equal.

Both sides decode and embed the photos in batches of the same size and order, so they store the
same faces; that is checked first, so that a difference in the albums is the clustering's.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from services import bus as busmod
from services.cli import main
from services.store import repository as repo
from services.store.db import make_engine, session_factory
from test_ingest import BATCH, WORKER_START_S, Deployment, lfw_photos, uri_of

pytestmark = pytest.mark.cloud

USER = "parity"
PER_PERSON = 6
PHOTOS = 250


def pick() -> list[Path]:
    """Every 7th identity and every one with at least 4 photos, at most PER_PERSON photos each,
    in path order until PHOTOS photos."""
    people: dict[str, list[Path]] = {}
    for path in lfw_photos():
        people.setdefault(path.parent.name, []).append(path)
    chosen: list[Path] = []
    for i, name in enumerate(sorted(people)):
        if i % 7 == 0 or len(people[name]) >= 4:
            chosen += people[name][:PER_PERSON]
        if len(chosen) >= PHOTOS:
            return chosen
    raise AssertionError("LFW-dev has fewer photos than the test needs")


def stored(sessions, user: str) -> tuple[list[tuple], set[frozenset]]:
    """(faces as (uri, face index, blurry, box), albums as sets of (uri, face index))."""
    with sessions() as session:
        rows = list(repo.export_rows(session, repo.find_user(session, user).id))
    faces = [(r["photo"], r["face"], r["blurry"], (r["x1"], r["y1"], r["x2"], r["y2"])) for r in rows]
    albums: dict[int, set] = {}
    for r in rows:
        if r["person"] is not None:
            albums.setdefault(r["person"], set()).add((r["photo"], r["face"]))
    return faces, {frozenset(a) for a in albums.values()}


def show(albums: set[frozenset]) -> list[list[str]]:
    return sorted(sorted(f"{uri}#{face}" for uri, face in a) for a in albums)


@pytest.mark.timeout(1200)  # a few minutes when well; a hang fails instead of stalling the run
def test_the_same_photos_give_the_same_albums_embedded_and_in_the_cloud(kafka_bootstrap, pg_url, tmp_path,
                                                                        monkeypatch):
    photos = pick()
    items = [(uri_of(p), p) for p in photos]

    # Embedded: `facecluster run` over a folder of the photos, in the ingest worker's batch size.
    folder = tmp_path / "library"
    for uri, path in items:
        (folder / uri).parent.mkdir(parents=True, exist_ok=True)
        (folder / uri).symlink_to(path.resolve())
    monkeypatch.setenv("FACECLUSTER_BATCH_SIZE", str(BATCH))
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    assert main(["run", str(folder), "--db", url, "--user", USER, "--threads", "2",
                 "--report", str(tmp_path / "report")]) == 0
    engine = make_engine(url)
    try:
        embedded_faces, embedded = stored(session_factory(engine), USER)
    finally:
        engine.dispose()

    # Cloud: publish, then the ingest and cluster workers side by side.
    dep = Deployment(kafka_bootstrap, pg_url, tmp_path / "cloud")
    try:
        dep.publish_cli(USER, items)
        workers = [dep.start("services.ingest", 2), dep.start("services.cluster_worker", 1)]
        dep.wait_drained(workers)  # every photo stored: every faces.indexed event published
        dep.wait("faces.indexed consumed", lambda: dep.pending(busmod.INDEXED, "cluster") == 0,
                 WORKER_START_S + 300, workers)
        assert [w.stop() for w in workers] == [0, 0], workers[1].log()[-4000:]
        cluster_log = workers[1].log()
        cloud_faces, cloud = stored(dep.sessions, USER)
    finally:
        dep.close()

    # The same faces on both sides (boxes up to float noise), so the albums are comparable.
    assert [f[:3] for f in cloud_faces] == [f[:3] for f in embedded_faces]
    assert np.allclose([f[3] for f in cloud_faces], [f[3] for f in embedded_faces], rtol=1e-3, atol=1e-2)
    batches = cluster_log.count("batch of")
    assert batches >= 5, f"the cluster worker had {batches} batches: too few to test filing faces as they come"

    # The rule bites: albums to find, no one-face album, lone faces left in no album.
    sizes = Counter(len(a) for a in embedded)
    assert len(embedded) >= 20 and sizes[1] == 0, sizes
    assert sum(len(a) for a in embedded) < len(embedded_faces)

    assert cloud == embedded, (f"albums only embedded: {show(embedded - cloud)[:10]}; "
                               f"only in the cloud: {show(cloud - embedded)[:10]}")
