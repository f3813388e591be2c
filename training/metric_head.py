"""Metric learning on frozen SFace outputs: a small embedding head trained with a margin softmax.

Why a head rather than fine-tuning SFace: on 2 CPU cores the backbone cannot be trained,
but its outputs can be cached once and a head on them trains in seconds. The head reads
two things the embedder computes in one forward pass of a crop: the L2-normalised 128-d
SFace embedding e and SFace's average-pooled last feature map p (1024-d, the same
feature the gender head reads), and outputs

    normalize(e + W2 relu(W1 p))

W2 starts at zero, so training starts exactly at the SFace baseline and the residual
only moves vectors where the loss gains something.

Measured with ``--evaluate`` on LFW-dev (independent scorer, person-disjoint; seeds 0, 1
and 2, which change the initialisation and the clustering halves):

- verification: SFace 0.9933 +- 0.0038, head 0.9930 / 0.9917 / 0.9923 (+- 0.004): no
  gain, a few pairs worse; ROC AUC 0.9961 -> 0.9971 and TAR@FAR1% 0.9907 -> 0.9927.
- clustering, at the shipped cut 0.56: BCubed F1 0.9894 -> 0.9909 but pairwise F1
  0.9967 -> 0.9935 (the head spreads people apart: more precision, less recall); with the
  cut re-tuned on the training half (SFace 0.54-0.56, head 0.58-0.60): BCubed F1
  0.9897 -> 0.9918, pairwise F1 0.9964 -> 0.9964.

So the head gains about 0.002 BCubed F1 only together with a looser cut, and nothing on
verification; facecore applies no head unless ``embedding_head`` is set. Variants
measured on the verification folds (seed 0; accuracy by the scorer's rule; 30 epochs
unless said), all at or below SFace: hidden 512 0.9917, hidden 128 0.9927 (10 epochs
0.9930, the default), linear residual ``e + W p`` 0.9913, linear map of e alone 0.9927,
projection of p alone (MLP, no e) 0.9523, ArcFace m=0.5 0.9920, CosFace m=0.2 0.9913, s=64
0.9917, one-photo people as classes 0.9920, lr 3e-4 0.9917, weight decay 0.05 0.9920.
The defaults were picked among these on the same folds, which if anything flatters the
head's verification figure.

Classes: the margin loss classifies the training identities, and only people with at
least ``min_photos`` (2) photos are used: a one-photo class is fitted exactly by its own
class weight, so it carries no within-person variation to learn from.

Splits are by person throughout (``training.attribute_head.person_folds``): the card's
validation figures come from people the head never saw, and ``--evaluate`` scores the
LFW-dev benchmark with the independent scorer under the same rule: each verification
fold with a head trained on people outside that fold's pairs, and clustering on two
halves of the people, each clustered with the head trained on the other half.

    python -m training.metric_head --data ../shared/data/lfw-dev --out DIR [--evaluate]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from facecore.attributes import EMBEDDING
from facecore.cluster import DEFAULT_DISTANCE, cluster
from training.attribute_head import backbone_dataset, embed_dataset, person_folds
from training.losses import ArcFace, CosFace
from training.onnx_export import finish_model, write_artifact

log = logging.getLogger(__name__)

LOSSES = {"cosface": CosFace, "arcface": ArcFace}
ONNX_INPUTS = ("embedding", "feature")
ONNX_OUTPUT = "head_embedding"
ARTIFACT = "metric_head"
THRESHOLDS = np.round(np.arange(0.40, 0.701, 0.02), 2)  # cosine-distance cuts tried when re-tuning
PAIR_CAP = 10  # photos per person in the validation pair figures


# --------------------------------------------------------------------------- data


@dataclass
class FeatureSet:
    """Frozen base-model outputs of the central face of labelled photos."""

    images: list[str]
    people: np.ndarray  # (n,) person per photo: the identity label and the unit of every split
    embeddings: np.ndarray  # (n, d) L2-normalised embeddings of single crops (no flip TTA)
    features: np.ndarray  # (n, c) the pooled feature map of the same crops
    embedder_version: str  # the base model; the head is only valid after it
    feature: str  # what ``features`` is, as facecore names it ("avgpool:<layer>")
    landmarks: np.ndarray | None = None  # (n, 5, 2) full-size pixels
    skipped: dict | None = None

    @property
    def reads(self) -> str:
        """The head's ONNX metadata ``input``: what each graph input reads, in order."""
        return f"{EMBEDDING},{self.feature}"

    def subset(self, mask: np.ndarray) -> FeatureSet:
        idx = np.flatnonzero(mask)
        return FeatureSet([self.images[i] for i in idx], self.people[idx], self.embeddings[idx],
                          self.features[idx], self.embedder_version, self.feature,
                          None if self.landmarks is None else self.landmarks[idx], self.skipped)


def load_features(data: Path, cache_dir: Path) -> FeatureSet:
    """LFW-dev central faces from the attribute job's caches (computed there on a first run)."""
    ds = embed_dataset(data, cache_dir)
    pooled = backbone_dataset(ds, data, cache_dir)
    if ds.embedder_version != pooled.embedder_version:
        raise ValueError(f"embeddings are {ds.embedder_version!r}, not single crops of {pooled.embedder_version!r}: "
                         "the head is applied to each view before flip TTA averages, so train it without flip TTA")
    return FeatureSet(ds.images, ds.people, ds.embeddings, pooled.embeddings, ds.embedder_version, pooled.input,
                      ds.landmarks, ds.skipped)


def validation_split(people: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """True for the validation photos: one of ``k`` person-disjoint folds."""
    return person_folds(people, np.zeros(len(people)), k, seed) == 0


# --------------------------------------------------------------------------- model


class MetricHead(nn.Module):
    """normalize(e + W2 relu(W1 p)), with W2 = 0 at the start: the identity on the base embedding."""

    def __init__(self, dim: int, feature_dim: int, hidden: int):
        super().__init__()
        self.hidden = nn.Linear(feature_dim, hidden)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, embedding: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return F.normalize(embedding + self.out(F.relu(self.hidden(feature))), dim=1)


@dataclass
class MetricConfig:
    hidden: int = 128
    loss: str = "cosface"
    margin: float = 0.35
    scale: float = 30.0
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 5e-4  # AdamW, on the head only (not the class weights)
    batch: int = 256
    min_photos: int = 2
    seed: int = 0


def class_labels(people: np.ndarray, min_photos: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask of photos whose person has >= min_photos photos, class index per kept photo)."""
    _, inverse, counts = np.unique(people, return_inverse=True, return_counts=True)
    keep = counts[inverse] >= min_photos
    return keep, np.unique(people[keep], return_inverse=True)[1]


def train_head(fs: FeatureSet, cfg: MetricConfig) -> MetricHead:
    """Mini-batch AdamW on the margin loss over ``fs``'s identities; deterministic for a seed.

    The class weights start at the class means of the initial outputs (the SFace
    embeddings), so the loss starts from SFace's own geometry of the classes rather than
    pulling the head towards random prototypes.
    """
    keep, y = class_labels(fs.people, cfg.min_photos)
    if not keep.any():
        raise ValueError(f"no person has {cfg.min_photos} photos to learn from")
    torch.manual_seed(cfg.seed)
    e, p = torch.from_numpy(fs.embeddings[keep]), torch.from_numpy(fs.features[keep])
    yt = torch.from_numpy(y)
    model = MetricHead(e.shape[1], p.shape[1], cfg.hidden)
    n_classes = int(y.max()) + 1
    loss_fn = LOSSES[cfg.loss](n_classes, e.shape[1], m=cfg.margin, s=cfg.scale)
    with torch.no_grad():
        loss_fn.weight.copy_(F.normalize(torch.zeros(n_classes, e.shape[1]).index_add_(0, yt, model(e, p)), dim=1))
    opt = torch.optim.AdamW([{"params": model.parameters(), "weight_decay": cfg.weight_decay},
                             {"params": loss_fn.parameters(), "weight_decay": 0.0}], lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    for epoch in range(cfg.epochs):
        total = 0.0
        for batch in torch.randperm(len(yt), generator=gen).split(cfg.batch):
            opt.zero_grad()
            loss = loss_fn(model(e[batch], p[batch]), yt[batch])
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        if epoch % 10 == 9 or epoch == cfg.epochs - 1:
            log.debug("epoch %d: loss %.4f (%d photos, %d classes)", epoch + 1, total / len(yt), len(yt), n_classes)
    return model.eval()


def apply_head(model: MetricHead, fs: FeatureSet) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(fs.embeddings), torch.from_numpy(fs.features)).numpy()


# --------------------------------------------------------------------------- metrics


def roc_auc(scores: np.ndarray, same: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    pos = int(same.sum())
    return float((ranks[same].sum() - pos * (pos + 1) / 2) / (pos * (len(same) - pos)))


def bcubed_f1(truth: np.ndarray, pred: np.ndarray) -> float:
    """BCubed F1 of a clustering against the truth (every item assigned)."""
    _, t = np.unique(truth, return_inverse=True)
    _, c = np.unique(pred, return_inverse=True)
    cell = np.unique(np.stack([t, c], 1), axis=0, return_inverse=True)[1].ravel()
    overlap = np.bincount(cell)[cell]  # per item: size of (its class & its cluster)
    precision = float(np.mean(overlap / np.bincount(c)[c]))
    recall = float(np.mean(overlap / np.bincount(t)[t]))
    return 2 * precision * recall / (precision + recall)


def first_photos(people: np.ndarray, cap: int) -> np.ndarray:
    """True for each person's first ``cap`` photos."""
    seen: dict[str, int] = {}
    keep = np.zeros(len(people), bool)
    for i, p in enumerate(people):
        keep[i] = seen.get(p, 0) < cap
        seen[p] = seen.get(p, 0) + 1
    return keep


def identity_metrics(x: np.ndarray, people: np.ndarray) -> dict:
    """Threshold-free pair figures, and BCubed F1 of clustering everything at the shipped cut.

    Pairs are formed among each person's first ``PAIR_CAP`` photos only: uncapped, one
    person with 200 photos (George W Bush) makes nine tenths of the same-person pairs.
    """
    keep = first_photos(people, PAIR_CAP)
    iu = np.triu_indices(int(keep.sum()), 1)
    sims = (x[keep] @ x[keep].T)[iu]
    same = people[keep][iu[0]] == people[keep][iu[1]]
    neg = np.sort(sims[~same])[::-1]
    return {"photos": int(len(x)), "people": int(len(np.unique(people))), "same_pairs": int(same.sum()),
            "pair_auc": roc_auc(sims, same),
            "tar_at_far_0.1pct": float(np.mean(sims[same] > neg[int(0.001 * len(neg))])),
            "bcubed_f1_at_default_cut": bcubed_f1(people, cluster(x, DEFAULT_DISTANCE))}


def validate(fs: FeatureSet, cfg: MetricConfig) -> dict:
    """Baseline and head on validation people the head never saw (person-disjoint split)."""
    val = validation_split(fs.people, seed=cfg.seed)
    model = train_head(fs.subset(~val), cfg)
    held = fs.subset(val)
    out = {"baseline": identity_metrics(held.embeddings, held.people),
           "head": identity_metrics(apply_head(model, held), held.people)}
    log.info("validation: baseline %s", out["baseline"])
    log.info("validation: head     %s", out["head"])
    return out


# --------------------------------------------------------------------------- benchmark


def read_pairs(path: Path) -> tuple[list[tuple[str, str]], np.ndarray]:
    """LFW View-2 pairs as image paths ``Name/Name_NNNN.jpg``, and the fold of each pair."""
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    n_folds, n = map(int, lines[0])
    pairs = []
    for r in lines[1:]:
        a, i, b, j = (r[0], r[1], r[0], r[2]) if len(r) == 3 else r
        pairs.append((f"{a}/{a}_{int(i):04d}.jpg", f"{b}/{b}_{int(j):04d}.jpg"))
    return pairs, np.repeat(np.arange(n_folds), 2 * n)


def cosine_scores(x: np.ndarray, images: list[str], pairs: list[tuple[str, str]]) -> np.ndarray:
    """Cosine per pair; 0 where a photo has no embedded face (the same for every method)."""
    index = {im: i for i, im in enumerate(images)}
    return np.array([float(x[index[a]] @ x[index[b]]) if a in index and b in index else 0.0 for a, b in pairs])


def run_scorer(scorer: Path, args: list[str], out: Path) -> dict:
    """Run the independent scorer, keep its output next to the scored file, return its JSON line."""
    res = subprocess.run([sys.executable, str(scorer), *args], capture_output=True, text=True, check=True)
    out.write_text(res.stdout)
    return json.loads(res.stdout.strip().splitlines()[-1])


def outside_fold(people: np.ndarray, pairs: list[tuple[str, str]], fold: np.ndarray, k: int) -> np.ndarray:
    """True for the photos of people who appear in no pair of fold ``k``: that fold's training set."""
    in_fold = {im.split("/")[0] for i in np.flatnonzero(fold == k) for im in pairs[i]}
    return ~np.isin(people, sorted(in_fold))


def evaluate_verification(fs: FeatureSet, cfg: MetricConfig, data: Path, out: Path, scorer: Path) -> dict:
    """Each fold's pairs scored by a head trained on people outside that fold's pairs."""
    pairs, fold = read_pairs(data / "pairs.txt")
    scores = {"baseline": cosine_scores(fs.embeddings, fs.images, pairs), "head": np.zeros(len(pairs))}
    for k in np.unique(fold):
        train = outside_fold(fs.people, pairs, fold, k)
        model = train_head(fs.subset(train), cfg)
        sel = np.flatnonzero(fold == k)
        scores["head"][sel] = cosine_scores(apply_head(model, fs), fs.images, [pairs[i] for i in sel])
        log.info("verification fold %d: head trained on %d of %d photos", k + 1, train.sum(), len(train))
    result = {}
    for method, s in scores.items():
        tsv = out / f"verification_{method}.tsv"
        tsv.write_text("score\n" + "".join(f"{v:.6f}\n" for v in s))
        result[method] = run_scorer(scorer, ["pairs", str(data / "pairs.txt"), str(tsv)], tsv.with_suffix(".score.txt"))
    return result


def tune_cut(fs: FeatureSet, cfg: MetricConfig, seed: int) -> dict[str, float]:
    """Cosine-distance cut per method with the best BCubed F1, chosen inside ``fs`` only.

    The head is trained on one half of ``fs``'s people and the cut is picked on the
    other: picking it on the head's own training people would favour a too-loose cut.
    """
    inner = person_folds(fs.people, np.zeros(len(fs.people)), 2, seed) == 0
    held = fs.subset(~inner)
    x = {"baseline": held.embeddings, "head": apply_head(train_head(fs.subset(inner), cfg), held)}
    return {m: float(max(THRESHOLDS, key=lambda t: bcubed_f1(held.people, cluster(v, t)))) for m, v in x.items()}


def face_boxes(landmarks: np.ndarray) -> np.ndarray:
    """A box around the five landmarks, grown to roughly the face: the scorer only needs its centre."""
    lo, hi = landmarks.min(1), landmarks.max(1)
    pad = (hi - lo).max(1, keepdims=True) * 0.6
    return np.concatenate([lo - pad, hi + pad], 1)


def write_faces(path: Path, fs: FeatureSet, person: np.ndarray) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["photo", "x1", "y1", "x2", "y2", "person"])
        for im, box, p in zip(fs.images, face_boxes(fs.landmarks), person):
            w.writerow([im, *(f"{v:.1f}" for v in box), p])


def evaluate_clustering(fs: FeatureSet, cfg: MetricConfig, data: Path, out: Path, scorer: Path) -> dict:
    """Two halves of the people; each is clustered with the head trained on the other half.

    Every method is clustered at the shipped cut and at a cut re-tuned on the training
    half (``tune_cut``); cluster ids carry the half, so no cluster spans both.
    """
    half = person_folds(fs.people, np.zeros(len(fs.people)), 2, cfg.seed)
    labels: dict[str, np.ndarray] = {}
    cuts = {}
    for h in (0, 1):
        train, test = fs.subset(half != h), fs.subset(half == h)
        tuned = tune_cut(train, cfg, cfg.seed + 1)
        x = {"baseline": test.embeddings, "head": apply_head(train_head(train, cfg), test)}
        cuts[f"half{h}"] = tuned
        for method, v in x.items():
            for name, cut in ((method, DEFAULT_DISTANCE), (f"{method}_tuned", tuned[method])):
                ids = labels.setdefault(name, np.empty(len(fs.images), object))
                ids[half == h] = [f"h{h}-{c}" for c in cluster(v, cut)]
        log.info("clustering half %d: cuts tuned on the other half %s", h, tuned)
    result = {"cuts": {"default": DEFAULT_DISTANCE, "tuned": cuts}}
    for name, ids in labels.items():
        faces = out / f"clusters_{name}.csv"
        write_faces(faces, fs, ids)
        result[name] = run_scorer(scorer, ["clusters", str(data / "images"), str(faces)],
                                  faces.with_suffix(".score.txt"))
    return result


def evaluate(fs: FeatureSet, cfg: MetricConfig, data: Path, out: Path, scorer: Path) -> dict:
    """The LFW-dev benchmark for SFace alone and with the head; files and scorer outputs go to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    result = {"verification": evaluate_verification(fs, cfg, data, out, scorer),
              "clustering": evaluate_clustering(fs, cfg, data, out, scorer)}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- export


def to_onnx(model: MetricHead, meta: dict[str, str]) -> onnx.ModelProto:
    """The head as Gemm/Relu/Gemm/Add/LpNormalization with a symbolic batch axis, built with onnx.helper."""
    w = {"w0": model.hidden.weight, "b0": model.hidden.bias, "w1": model.out.weight, "b1": model.out.bias}
    inits = [numpy_helper.from_array(t.detach().numpy().astype(np.float32), name) for name, t in w.items()]
    emb, feat = ONNX_INPUTS
    nodes = [helper.make_node("Gemm", [feat, "w0", "b0"], ["z0"], transB=1),
             helper.make_node("Relu", ["z0"], ["h0"]),
             helper.make_node("Gemm", ["h0", "w1", "b1"], ["residual"], transB=1),
             helper.make_node("Add", [emb, "residual"], ["sum"]),
             helper.make_node("LpNormalization", ["sum"], [ONNX_OUTPUT], axis=1, p=2)]
    dim, feature_dim = model.out.out_features, model.hidden.in_features
    graph = helper.make_graph(nodes, "metric_head",
                              [helper.make_tensor_value_info(emb, TensorProto.FLOAT, ["N", dim]),
                               helper.make_tensor_value_info(feat, TensorProto.FLOAT, ["N", feature_dim])],
                              [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["N", dim])], inits)
    return finish_model(graph, meta)


def export(model: MetricHead, fs: FeatureSet, cfg: MetricConfig, metrics: dict, out: Path, data_desc: dict,
           version: str) -> Path:
    """Write ``<ARTIFACT>.onnx`` and its model card ``<ARTIFACT>.json`` to ``out``; returns the onnx path."""
    meta = {"head_version": version, "embedder_version": fs.embedder_version, "input": fs.reads}
    keep, y = class_labels(fs.people, cfg.min_photos)
    card = {
        "embedder_version": fs.embedder_version,
        "input": {"names": list(ONNX_INPUTS), "reads": fs.reads.split(","),
                  "shapes": [["N", int(fs.embeddings.shape[1])], ["N", int(fs.features.shape[1])]],
                  "note": "the L2-normalised embedding and the pooled feature of one crop of embedder_version "
                          "(no flip TTA: facecore applies the head to crop and mirror, then averages)"},
        "output": {"name": ONNX_OUTPUT, "shape": ["N", int(fs.embeddings.shape[1])], "note": "L2-normalised"},
        "head": {"type": "residual: normalize(e + W2 relu(W1 p)), W2 initialised to 0", **asdict(cfg)},
        "loss": f"{cfg.loss} (training.losses) m={cfg.margin} s={cfg.scale} over the identities with >= "
                f"{cfg.min_photos} photos; class weights initialised at the class means",
        "data": {**data_desc, "photos": len(fs.images), "people": int(len(np.unique(fs.people))),
                 "photos_trained": int(keep.sum()), "classes": int(y.max()) + 1 if keep.any() else 0,
                 "skipped": fs.skipped, "labelled_face": "detected face nearest the image centre"},
        "split": {"validation": "person-disjoint: 1 of 5 folds of people (training.attribute_head.person_folds) "
                                "held out (metrics.validation)",
                  "final_model": "trained on all people after validation",
                  "benchmark": "person-disjoint per verification fold and per clustering half (metrics.lfw_dev)"},
        "metrics": metrics,
        "versioning": "facecore stores embeddings as '<embedder version>+<head file version>[+flip]'; a head "
                      "given by path is versioned '<file stem>-<first 12 hex of its sha256>'",
    }
    return write_artifact(out, ARTIFACT, to_onnx(model, meta), version, card)


def fit_and_export(fs: FeatureSet, out: Path, cfg: MetricConfig, data_desc: dict | None = None,
                   version: str = "metric-head-1", benchmark: dict | None = None) -> dict:
    """Validate on held-out people, train the final head on everyone, export; returns the card."""
    metrics = {"validation": validate(fs, cfg)}
    if benchmark is not None:
        metrics["lfw_dev"] = benchmark
    export(train_head(fs, cfg), fs, cfg, metrics, out, data_desc or {}, version)
    return json.loads((out / f"{ARTIFACT}.json").read_text())


def summary_table(benchmark: dict) -> dict:
    """The headline figures of ``evaluate``: verification accuracy and clustering F1 per method."""
    v, c = benchmark["verification"], benchmark["clustering"]
    out = {m: {"verification": f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f}", "auc": round(r["auc"], 5)}
           for m, r in v.items()}
    for name, r in c.items():
        if name != "cuts":
            out.setdefault(name, {}).update({"bcubed_f1": round(r["bcubed_f1"], 4),
                                             "pairwise_f1": round(r["pairwise_f1"], 4)})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LFW-dev root (images/, gender.tsv, pairs.txt)")
    ap.add_argument("--out", type=Path, required=True, help="where metric_head.onnx, its card and evaluation/ go")
    ap.add_argument("--cache", type=Path, default=Path("out/attributes"), help="feature cache folder")
    ap.add_argument("--evaluate", action="store_true", help="also score the LFW-dev benchmark, SFace vs head")
    ap.add_argument("--scorer", type=Path, help="lfw_score.py; default: <data>/../../bench/lfw_score.py")
    ap.add_argument("--version", default="metric-head-1")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; the head is small")
    defaults = MetricConfig()
    for name, value in asdict(defaults).items():
        kw = {"choices": sorted(LOSSES)} if name == "loss" else {}
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, **kw)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    cfg = MetricConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    fs = load_features(args.data, args.cache)
    benchmark = None
    if args.evaluate:
        scorer = args.scorer or args.data.resolve().parent.parent / "bench" / "lfw_score.py"
        benchmark = evaluate(fs, cfg, args.data, args.out / "evaluation", scorer)
    desc = {"dataset": args.data.resolve().name, "labels": "identity = folder name",
            "images_listed_in": "gender.tsv"}
    card = fit_and_export(fs, args.out, cfg, desc, args.version, benchmark)
    print(json.dumps({"validation": card["metrics"]["validation"], "sha256": card["sha256"]}, indent=2))
    if benchmark is not None:
        print(json.dumps(summary_table(benchmark), indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
