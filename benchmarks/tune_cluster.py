"""Choose the clustering cut on LFW-dev: sweep methods and thresholds, score each with lfw_score.

Reads the embeddings an `facecluster index` run stored, so the models run once:

    facecluster index ../shared/data/lfw-dev/images --db sqlite:///out/lfw/lfw.db --user lfw
    python benchmarks/tune_cluster.py --db sqlite:///out/lfw/lfw.db --user lfw
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path

from sklearn.cluster import DBSCAN

from facecore import cluster as fc
from services.store import repository as repo
from services.store.db import make_engine, migrate, session_factory

from score import score_clusters

REPO = Path(__file__).resolve().parents[1]


def write_faces(rows: list[dict], labels: dict[int, int], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["photo", "face", "x1", "y1", "x2", "y2", "score", "blur", "person"],
                           extrasaction="ignore")
        w.writeheader()
        for r in rows:
            lab = labels.get(r["face_id"], -1)
            w.writerow({**r, "person": "" if lab < 0 else lab})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", required=True)
    ap.add_argument("--user", default="lfw")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/lfw-dev")
    ap.add_argument("--average", type=float, nargs="*", default=[0.45, 0.5, 0.55, 0.6, 0.65, 0.7],
                    help="average-linkage cosine distance cuts to try")
    ap.add_argument("--dbscan", type=float, nargs="*", default=[0.4, 0.5], help="DBSCAN eps values to try")
    args = ap.parse_args()
    engine = make_engine(args.db)
    migrate(engine)  # an index made by older code, as the CLI would bring it up to date
    sessions = session_factory(engine)
    with sessions() as s:
        uid = repo.get_or_create_user(s, args.user).id
        ids, x = repo.user_embeddings(s, uid)
        rows = list(repo.export_rows(s, uid))
    methods = {f"average@{t:.2f}": (lambda t: lambda: fc.cluster(x, t))(t) for t in args.average}
    methods.update({f"dbscan@{e:.2f}": (lambda e: lambda: DBSCAN(eps=e, min_samples=1, metric="cosine")
                                        .fit_predict(x))(e) for e in args.dbscan})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in methods.items():
            labels = run()
            path = Path(tmp) / "faces.csv"
            write_faces(rows, {int(i): int(l) for i, l in zip(ids, labels)}, path)
            m = score_clusters(path, args.data)
            results[name] = {k: round(m[k], 4) for k in ("bcubed_f1", "pairwise_f1", "bcubed_precision",
                                                            "bcubed_recall", "nmi", "clusters")}
            print(name, results[name], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
