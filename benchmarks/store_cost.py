"""CPU and wall time of storing one indexed photo (`repository.save_photo_result` + commit).

The pipeline runs once over N LFW-dev photos; the same results are then stored, one
transaction per photo as `index` and the ingest worker do, into a fresh database per round.
On a 2-core machine every millisecond of CPU spent here is taken from the models.

    python benchmarks/store_cost.py [--photos 1000] [--rounds 3] [--db postgresql+psycopg2://...]

With ``--db`` each round stores under a new user of that (migrated) database instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from facecore.pipeline import FacePipeline, batched
from facecore.settings import load_settings
from services.store import repository as repo
from services.store.db import make_engine, migrate, session_factory

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=REPO.parent / "shared/data/lfw-dev/images")
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--db", help="database URL (default: a fresh SQLite file per round)")
    args = ap.parse_args()
    files = sorted(args.dir.rglob("*.jpg"))
    files = files[:: max(1, len(files) // args.photos)][: args.photos]
    pipeline = FacePipeline(load_settings(threads=2))
    results = [r for chunk in batched(files, 32) for r in pipeline.process([(f.name, f) for f in chunk])]
    pipeline.close()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            engine = make_engine(args.db or f"sqlite:///{tmp}/round{r}.db")
            migrate(engine)
            sessions = session_factory(engine)
            with sessions() as session:
                user_id = repo.get_or_create_user(session, f"store-cost-{uuid.uuid4().hex[:8]}").id
                session.commit()
            cpu, wall = time.process_time(), time.perf_counter()
            with sessions() as session:
                for result in results:
                    repo.save_photo_result(session, user_id, result.key, result)
                    session.commit()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            if args.db:
                with sessions() as session:
                    repo.delete_user(session, user_id)
                    session.commit()
            engine.dispose()
            rounds.append({"wall_ms_per_photo": 1000 * wall / len(results), "cpu_ms_per_photo": 1000 * cpu / len(results)})
            print(f"round {r}: wall {rounds[-1]['wall_ms_per_photo']:.2f} ms/photo, "
                  f"cpu {rounds[-1]['cpu_ms_per_photo']:.2f} ms/photo", flush=True)
    print(json.dumps({"photos": len(results), "faces": sum(len(r.faces) for r in results),
                      "database": make_engine(args.db).dialect.name if args.db else "sqlite",
                      **{k: statistics.median(x[k] for x in rounds) for k in rounds[0]}}))


if __name__ == "__main__":
    main()
