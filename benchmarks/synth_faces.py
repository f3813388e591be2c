"""Synthetic faces for the scale benchmarks, drawn to look like SFace vectors on LFW-dev.

Model (all fitted on LFW-dev's labelled faces, one per photo, and stored in
benchmarks/synth_faces.json, so no LFW data is needed to generate):

* persons: their faces-per-person counts come from a discretised lognormal,
  ``max(1, round(exp(mu + sigma * z)))``, fitted to LFW-dev's counts (71 % of
  persons have one photo, the largest 236); a user of N faces gets persons until
  the counts reach N, so persons per user grow with N in LFW-dev's proportion.
* a person's centre: Gaussian with LFW-dev's mean person centre and the covariance
  of person centres (top components plus an isotropic rest), which carries the
  between-person similarity (mean cosine ~0.11, not 0).
* a face: ``normalise(centre + s_p * r)``, r Gaussian with the pooled within-person
  residual covariance and s_p a per-person lognormal spread (some persons vary
  more than others), which carries the within-person cosine distribution.
* photos: faces are grouped into photos of 1..5 faces with LFW-dev's sizes, never
  one person twice in a photo, so the one-person-per-photo rule has work to do.

    python benchmarks/synth_faces.py extract --db LIBRARY.db --out out/scale/lfw_dev_sface.npz
    python benchmarks/synth_faces.py fit --vectors out/scale/lfw_dev_sface.npz   # rewrites the JSON
    python benchmarks/synth_faces.py stats --faces 10000 --seed 0                 # quantiles of a draw
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARAMS = Path(__file__).with_name("synth_faces.json")
RANK = 24  # covariance components kept; the rest is isotropic


@dataclass
class SynthFaces:
    x: np.ndarray        # (n, d) float32, unit rows
    person: np.ndarray   # (n,) int64 identity (the truth)
    photo: np.ndarray    # (n,) int64 photo id


def _lowrank(cov: np.ndarray, rank: int = RANK) -> dict:
    w, v = np.linalg.eigh(cov)
    w, v = w[::-1], v[:, ::-1]
    rest = float(w[rank:].mean())
    return {"vecs": np.round(v[:, :rank].T, 6).tolist(), "sd": np.round(np.sqrt(np.maximum(w[:rank] - rest, 0)), 6).tolist(),
            "iso_sd": round(float(np.sqrt(max(rest, 0))), 6)}


def _draw(rng, comp: dict, n: int) -> np.ndarray:
    vecs = np.asarray(comp["vecs"], np.float64)
    sd = np.asarray(comp["sd"])
    z = rng.standard_normal((n, len(sd))) * sd
    return z @ vecs + rng.standard_normal((n, vecs.shape[1])) * comp["iso_sd"]


def extract(db: Path, out: Path) -> int:
    """The sharp, non-trash faces with an embedding of a ``facecluster index`` SQLite database
    of LFW-dev (one user) -> an .npz with x (unit rows), uri, face, box, score, blur, photo."""
    import sqlite3
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows = con.execute(
        "select p.uri, f.face_index, f.x1, f.y1, f.x2, f.y2, f.det_score, f.blur, f.embedding, f.photo_id"
        " from faces f join photos p on p.id = f.photo_id"
        " where f.embedding is not null and f.blurry = 0 and f.trash = 0 order by f.id").fetchall()
    x = np.stack([np.frombuffer(r[8], np.float32) for r in rows])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.savez(out, x=x, uri=np.array([r[0] for r in rows]), face=np.array([r[1] for r in rows]),
             box=np.array([r[2:6] for r in rows]), score=np.array([r[6] for r in rows]),
             blur=np.array([r[7] for r in rows]), photo=np.array([r[9] for r in rows]))
    return len(rows)


def central_faces(d) -> dict[str, int]:
    """Photo uri -> the row of its face nearest the 250x250 LFW image's centre (the face its
    folder names, as lfw_score.py picks it), in an ``extract``-ed .npz."""
    centre = (d["box"][:, :2] + d["box"][:, 2:]) / 2
    dist = ((centre - 125) ** 2).sum(1)
    best: dict[str, int] = {}
    for i, u in enumerate(d["uri"]):
        if u not in best or dist[i] < dist[best[u]]:
            best[u] = i
    return best


def labelled_faces(npz: Path) -> tuple[np.ndarray, np.ndarray]:
    """LFW-dev's labelled faces (the one nearest each 250x250 image's centre): (x, person name)."""
    d = np.load(npz)
    idx = np.array(sorted(central_faces(d).values()))
    return d["x"][idx], np.array([u.split("/")[0] for u in d["uri"][idx]])


def fit(x: np.ndarray, names: np.ndarray, photo_sizes: list[int]) -> dict:
    _, lab, counts = np.unique(names, return_inverse=True, return_counts=True)
    d = x.shape[1]
    centres = np.zeros((len(counts), d))
    np.add.at(centres, lab, x)
    centres /= counts[:, None]
    resid = x - centres[lab]
    multi = counts[lab] > 1
    # pooled within covariance, unbiased per person
    cw = (resid[multi].T @ resid[multi]) / (multi.sum() - (counts > 1).sum())
    # per-person spread: mean squared residual relative to the pooled one
    per = np.zeros(len(counts))
    np.add.at(per, lab, (resid ** 2).sum(1))
    ok = counts >= 3
    ratio = per[ok] / (counts[ok] - 1) / np.trace(cw)
    log_s = 0.5 * np.log(ratio)
    # person centres' covariance less the noise their finite means carry
    cb = np.cov(centres.T) - cw * float(np.mean(1.0 / counts))
    w, v = np.linalg.eigh(cb)
    cb = (v * np.maximum(w, 1e-6)) @ v.T
    # faces per person: discretised lognormal matched on P(1), median of the rest, and the tail
    best = None
    rng = np.random.default_rng(0)
    z = rng.standard_normal(200_000)
    qs = [0.5, 0.75, 0.9, 0.95, 0.99]
    target = np.r_[(counts == 1).mean(), np.quantile(counts, qs)]
    for mu in np.linspace(-2, 1, 61):
        for sigma in np.linspace(0.5, 3, 51):
            sim = np.maximum(1, np.round(np.exp(mu + sigma * z)))
            got = np.r_[(sim == 1).mean(), np.quantile(sim, qs)]
            err = abs(got[0] - target[0]) * 20 + np.abs(np.log(got[1:]) - np.log(target[1:])).sum()
            if best is None or err < best[0]:
                best = (err, mu, sigma)
    sizes = np.bincount(photo_sizes)[1:]
    params = {
        "source": "SFace (sface-2021dec) on LFW-dev, one labelled face per photo",
        "dim": d, "faces": int(len(x)), "persons": int(len(counts)),
        "centre_mean": np.round(centres.mean(0), 6).tolist(),
        "centre_cov": _lowrank(cb), "within_cov": _lowrank(cw),
        "spread_log_mu": round(float(log_s.mean()), 6), "spread_log_sigma": round(float(log_s.std()), 6),
        "count_log_mu": round(float(best[1]), 4), "count_log_sigma": round(float(best[2]), 4),
        "count_max": int(counts.max()),
        "photo_size_p": np.round(sizes / sizes.sum(), 6).tolist(),
    }
    # the per-person spread's lognormal lowers the median within-person cosine a little:
    # shift its mu until a draw of LFW-dev's size has LFW-dev's median within-person cosine
    same = lab[:, None] == lab[None]
    target_within = float(np.median((x @ x.T)[np.triu(same, 1)]))
    lo, hi = params["spread_log_mu"] - 0.5, params["spread_log_mu"] + 0.5
    for _ in range(12):
        params["spread_log_mu"] = (lo + hi) / 2
        g = generate(len(x), seed=0, params=params)
        gs = g.person[:, None] == g.person[None]
        got = float(np.median((g.x @ g.x.T)[np.triu(gs, 1)]))
        lo, hi = (params["spread_log_mu"], hi) if got > target_within else (lo, params["spread_log_mu"])
    params["spread_log_mu"] = round((lo + hi) / 2, 6)
    return params


def load_params(path: Path = PARAMS) -> dict:
    return json.loads(Path(path).read_text())


def person_counts(rng, n_faces: int, p: dict) -> np.ndarray:
    """Faces per person for a user of n_faces faces (sums to n_faces exactly)."""
    out, total = [], 0
    while total < n_faces:
        c = np.maximum(1, np.round(np.exp(p["count_log_mu"] + p["count_log_sigma"] * rng.standard_normal(4096))))
        c = np.minimum(c, max(p["count_max"], int(p["count_max"] * n_faces / p["faces"]))).astype(np.int64)
        out.append(c)
        total += int(c.sum())
    c = np.concatenate(out)
    cs = np.cumsum(c)
    k = int(np.searchsorted(cs, n_faces))
    c = c[:k + 1].copy()
    c[-1] -= int(cs[k] - n_faces)
    return c[c > 0]


def generate(n_faces: int, seed: int = 0, params: dict | None = None) -> SynthFaces:
    p = params or load_params()
    rng = np.random.default_rng(seed)
    counts = person_counts(rng, n_faces, p)
    n_persons = len(counts)
    centres = np.asarray(p["centre_mean"]) + _draw(rng, p["centre_cov"], n_persons)
    spread = np.exp(p["spread_log_mu"] + p["spread_log_sigma"] * rng.standard_normal(n_persons))
    person = np.repeat(np.arange(n_persons), counts)
    x = np.empty((n_faces, p["dim"]), np.float32)
    for s in range(0, n_faces, 65536):  # in blocks, so float64 temporaries stay small
        pe = person[s:s + 65536]
        v = centres[pe] + spread[pe, None] * _draw(rng, p["within_cov"], len(pe))
        x[s:s + 65536] = v / np.linalg.norm(v, axis=1, keepdims=True)
    # photos: faces in random order, cut into groups of LFW-dev's sizes; a second face of a
    # person already in the photo starts a new photo
    order = rng.permutation(n_faces)
    psz = np.asarray(p["photo_size_p"]) / np.sum(p["photo_size_p"])
    sizes = rng.choice(np.arange(1, len(psz) + 1), size=n_faces, p=psz)
    photo = np.empty(n_faces, np.int64)
    pid, left, seen = 0, int(sizes[0]), set()
    for j, f in enumerate(order):
        pf = int(person[f])
        if left == 0 or pf in seen:
            pid += 1
            left, seen = int(sizes[pid % n_faces]), set()
        photo[f] = pid
        seen.add(pf)
        left -= 1
    return SynthFaces(x=x, person=person, photo=photo)


def pair_stats(x: np.ndarray, person: np.ndarray, max_faces: int = 8000, seed: int = 0) -> dict:
    """Quantiles of within- and between-person cosine and of each face's nearest-neighbour cosine."""
    rng = np.random.default_rng(seed)
    if len(x) > max_faces:
        keep = np.sort(rng.choice(len(x), max_faces, replace=False))
        x, person = x[keep], person[keep]
    s = x @ x.T
    iu = np.triu_indices(len(x), 1)
    same = (person[:, None] == person[None])[iu]
    sv = s[iu]
    np.fill_diagonal(s, -2)
    nn = s.max(1)
    same_nn = person[s.argmax(1)] == person
    qs = [0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99]
    _, counts = np.unique(person, return_counts=True)
    return {"within": np.quantile(sv[same], qs).round(4).tolist(),
            "between": np.quantile(sv[~same], qs).round(4).tolist(),
            "nn": np.quantile(nn, qs).round(4).tolist(),
            "nn_same_person": round(float(same_nn.mean()), 4),
            "faces_per_person": np.quantile(counts, qs).round(1).tolist(),
            "persons": int(len(counts)), "singleton_persons": round(float((counts == 1).mean()), 4),
            "max_faces_per_person": int(counts.max()), "quantiles": qs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract", help="real vectors from an indexed LFW-dev SQLite database into an .npz")
    e.add_argument("--db", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("fit", help="fit the parameters on real vectors (an .npz with x, uri, box, photo)")
    f.add_argument("--vectors", type=Path, required=True)
    f.add_argument("--out", type=Path, default=PARAMS)
    s = sub.add_parser("stats", help="statistics of a synthetic draw (and of the real vectors with --vectors)")
    s.add_argument("--faces", type=int, default=6156)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vectors", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "extract":
        print(f"{extract(args.db, args.out)} faces -> {args.out}")
    elif args.cmd == "fit":
        x, names = labelled_faces(args.vectors)
        _, sizes = np.unique(np.load(args.vectors)["photo"], return_counts=True)
        args.out.write_text(json.dumps(fit(x, names, sizes.tolist())) + "\n")
        print(f"wrote {args.out}")
    else:
        g = generate(args.faces, args.seed)
        print(json.dumps({"synthetic": pair_stats(g.x, g.person)}))
        if args.vectors:
            x, names = labelled_faces(args.vectors)
            print(json.dumps({"lfw_dev": pair_stats(x, np.unique(names, return_inverse=True)[1])}))


if __name__ == "__main__":
    main()
