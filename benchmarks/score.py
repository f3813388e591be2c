"""Score benchmark outputs with the independent scorer, and compare runs side by side.

Every figure we quote comes from running ``../shared/bench/lfw_score.py`` as a
separate process on plain files, never from our own metric code, so the peers
and our product are judged by the same, untouched judge.

A run named NAME in OUTDIR is the file set the peers write and the product is
expected to write too:

    OUTDIR/NAME_scores.tsv   verification scores, one per pairs.txt line
    OUTDIR/NAME_faces.csv    all faces with their cluster id
    OUTDIR/NAME_timing.json  per-photo cost (optional)

    python benchmarks/score.py opencv dlib product --out out/bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "lfw-dev"
DEFAULT_SCORER = REPO.parent / "shared" / "bench" / "lfw_score.py"


def run_scorer(*args: str | os.PathLike, scorer: Path = DEFAULT_SCORER, echo: bool = False) -> dict:
    """Run lfw_score.py; its last stdout line is the JSON with every figure."""
    proc = subprocess.run([sys.executable, str(scorer), *map(str, args)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lfw_score.py {' '.join(map(str, args))} failed:\n{proc.stdout}{proc.stderr}")
    lines = proc.stdout.strip().splitlines()
    if echo:
        print("\n".join(lines[:-1]))
    return json.loads(lines[-1])


def score_pairs(scores_tsv: Path, data: Path = DEFAULT_DATA, **kw) -> dict:
    return run_scorer("pairs", data / "pairs.txt", scores_tsv, **kw)


def score_clusters(faces_csv: Path, data: Path = DEFAULT_DATA, **kw) -> dict:
    gender = data / "gender.tsv"
    extra = ["--gender", gender] if gender.exists() else []
    return run_scorer("clusters", data / "images", faces_csv, *extra, **kw)


def score_run(outdir: Path, name: str, data: Path = DEFAULT_DATA, **kw) -> dict:
    """Score whichever of a run's files exist; a run may have only one half."""
    out: dict = {"name": name}
    scores, faces, timing = (outdir / f"{name}_{s}" for s in ("scores.tsv", "faces.csv", "timing.json"))
    if scores.exists():
        out["verification"] = score_pairs(scores, data, **kw)
    if faces.exists():
        out["clustering"] = score_clusters(faces, data, **kw)
    if timing.exists():
        out["timing"] = json.loads(timing.read_text())
    if len(out) == 1:
        raise FileNotFoundError(f"no {name}_scores.tsv / {name}_faces.csv in {outdir}")
    return out


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(runs: list[dict]) -> str:
    """Markdown table: the handful of figures a reader compares first."""
    head = ["run", "LFW acc", "AUC", "TAR@FAR1%", "BCubed F1", "pairwise F1", "NMI",
            "clusters", "coverage", "ms/photo", "photos/s", "peak RSS MB", "threads"]
    rows = []
    for r in runs:
        v, c, t = r.get("verification", {}), r.get("clustering", {}), r.get("timing", {})
        acc = v.get("accuracy")
        rows.append([
            r["name"],
            "-" if acc is None else f"{100 * acc:.2f} ± {100 * v['accuracy_std']:.2f}",
            _fmt(v.get("auc"), ".4f"),
            _fmt(v.get("tar_at_far_1pct"), ".4f"),
            _fmt(c.get("bcubed_f1"), ".4f"),
            _fmt(c.get("pairwise_f1"), ".4f"),
            _fmt(c.get("nmi"), ".4f"),
            "-" if not c else f"{c['clusters']} / {c['identities']}",
            _fmt(c.get("detection_coverage"), ".4f"),
            _fmt(t.get("ms_per_photo", {}).get("total"), ".1f"),
            _fmt(t.get("photos_per_s"), ".1f"),
            _fmt(t.get("peak_rss_mb"), ".0f"),
            _fmt(t.get("threads"), "d"),
        ])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", help="run names: files OUTDIR/NAME_scores.tsv, NAME_faces.csv, NAME_timing.json")
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench", help="folder holding the runs (default: out/bench)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LFW-dev folder (default: ../shared/data/lfw-dev)")
    ap.add_argument("--scorer", type=Path, default=DEFAULT_SCORER, help="lfw_score.py to run (default: ../shared/bench/lfw_score.py)")
    ap.add_argument("--json", type=Path, help="also write every figure of every run to this file")
    args = ap.parse_args(argv)
    runs = []
    for name in args.names:
        print(f"== {name}")
        runs.append(score_run(args.out, name, args.data, scorer=args.scorer, echo=True))
    print()
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
