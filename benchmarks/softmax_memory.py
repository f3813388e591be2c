"""Peak memory and time of one training step: flat softmax head vs two-level head.

One step is forward + backward + optimizer step of the classification head alone, on a
batch of random features that stands in for the backbone's output (the features get
their gradient too, as in training). Heads, all with normalised-cosine logits (scale s):

- ``flat``: ``training.losses.NormSoftmax`` over all N identities.
- ``two-level``: ``training.two_level.TwoLevelSoftmax`` with K groups, dense weight gradient.
- ``two-level-sparse``: the same with ``sparse=True``: the weight gradient holds only the
  rows of the groups in the batch.

Every configuration runs in a fresh subprocess. The N x d weights exist for every head, so
the table gives the RSS before the step (process, data and weights), the peak during the
steps, and their difference: what a step adds (logits, their gradients, weight gradients).
The peak is the kernel's high-water mark (VmHWM), reset after setup through
/proc/self/clear_refs, so setup transients do not hide it: Linux only.

The optimizer is SGD without momentum, so it keeps no per-weight state; momentum or Adam
would add one or two more N x d tensors to every head alike. Groups are a balanced random
assignment (k-means over a million centroids would dominate the run and does not change
the memory of a step); real k-means groups are uneven and a step's cost follows the
largest group in the batch. A configuration whose peak, scaled linearly in N from the
same head's previous run, would exceed --max-mb is skipped and reported as such.

    .venv/bin/python benchmarks/softmax_memory.py --identities 10000 100000 1000000 --out out/bench/softmax_memory.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEADS = ("flat", "two-level", "two-level-sparse")


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def measure(cfg: dict) -> dict:
    """Runs in the child: build one head, take the steps, report memory and time."""
    import torch

    from training.losses import NormSoftmax
    from training.two_level import TwoLevelSoftmax

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    n, dim, batch, k = cfg["identities"], cfg["dim"], cfg["batch"], cfg["groups"]
    if cfg["head"] == "flat":
        head = NormSoftmax(n, dim, s=cfg["s"])
    else:
        assign = torch.randperm(n) % k
        head = TwoLevelSoftmax(dim, assign, s=cfg["s"], sparse=cfg["head"] == "two-level-sparse")
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    features = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(n, (batch,))

    def step() -> None:
        head(features, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        features.grad = None

    gc.collect()
    before_mb = status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()  # untimed: first calls initialise kernels
    seconds = []
    for _ in range(cfg["steps"]):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak_mb = status_mb("VmHWM")
    return {**cfg, "before_mb": before_mb, "peak_mb": peak_mb,
            "extra_mb": peak_mb - before_mb, "weights_mb": n * dim * 4 / 2**20,
            "ms_per_step": 1000 * statistics.median(seconds)}


def run_child(cfg: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg["threads"])}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        return {**cfg, "error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def estimate_mb(previous: dict, n: int) -> float:
    """Peak at n identities if everything but the process without its weights grows linearly in N."""
    fixed = previous["before_mb"] - previous["weights_mb"]
    return fixed + (previous["peak_mb"] - fixed) * n / previous["identities"]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemAvailable"))
    import torch

    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu,
            "cpus": os.cpu_count(), "mem_available_mb": int(mem) // 1024, "python": platform.python_version(),
            "torch": torch.__version__}


def table(rows: list[dict]) -> str:
    lines = ["| head | N | K | weights MB | RSS before step MB | peak MB | step extra MB | ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for r in rows:
        k = "-" if r["head"] == "flat" else r["groups"]
        start = f"| {r['head']} | {r['identities']:,} | {k} | {r['identities'] * r['dim'] * 4 / 2**20:.0f} |"
        if "estimate_mb" in r:
            lines.append(f"{start} - | ~{r['estimate_mb']:,.0f} (estimate) | - | not run |")
            notes.append(f"{r['head']} at N={r['identities']:,} not run: {r['skipped']}")
        elif "error" in r:
            lines.append(f"{start} - | - | - | failed |")
            notes.append(f"{r['head']} at N={r['identities']:,} failed: {r['error']}")
        else:
            lines.append(f"{start} {r['before_mb']:.0f} | {r['peak_mb']:.0f} | {r['extra_mb']:.0f} "
                         f"| {r['ms_per_step']:.0f} |")
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--identities", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="numbers of identities N (default: 10k 100k 1M)")
    parser.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    parser.add_argument("--dim", type=int, default=128, help="embedding size d (default 128)")
    parser.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    parser.add_argument("--groups", type=int, help="groups K for every N (default: round(sqrt(N)))")
    parser.add_argument("--s", type=float, default=30.0, help="cosine logit scale (default 30)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one untimed (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run (default 1)")
    parser.add_argument("--max-mb", type=float, default=4000,
                        help="skip a run whose peak, scaled from a smaller N, would exceed this (default 4000)")
    parser.add_argument("--out", type=Path, help="write the machine, settings and rows as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return

    info = machine()
    print(f"{info['date']}  {info['cpu']}  {info['cpus']} CPUs  {info['mem_available_mb']} MB available  "
          f"torch {info['torch']}  threads {args.threads}  d={args.dim}  batch={args.batch}  s={args.s}")
    rows, last = [], {}
    for n in sorted(args.identities):
        for head in args.heads:
            cfg = {"head": head, "identities": n, "dim": args.dim, "batch": args.batch, "s": args.s,
                   "groups": args.groups or round(math.sqrt(n)), "steps": args.steps, "threads": args.threads}
            estimate = estimate_mb(last[head], n) if head in last else 0.0
            if estimate > args.max_mb:
                reason = (f"peak ~{estimate:,.0f} MB by linear scaling from N={last[head]['identities']:,} "
                          f"> --max-mb {args.max_mb:.0f}")
                row = {**cfg, "estimate_mb": estimate, "skipped": reason}
            else:
                row = run_child(cfg)
                if "error" not in row:
                    last[head] = row
            rows.append(row)
            print(f"  {head} N={n:,}: " + (row.get("skipped") or row.get("error")
                                           or f"peak {row['peak_mb']:.0f} MB, {row['ms_per_step']:.0f} ms/step"),
                  flush=True)
    print()
    print(table(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": info, "args": {k: v for k, v in vars(args).items()
                                                                  if k not in ("out", "child")},
                                        "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
