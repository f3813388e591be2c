"""Face attributes (gender for now) from a small head on frozen embedder features.

Why a head on the embedder rather than a model per attribute: one shared, frozen
backbone already encodes most of what attributes need, so a single multi-task head (one
logit per attribute) costs almost nothing at indexing time. The head is tied to one
embedder version; it is useless on any other.

Heads on a good backbone feature are reported to land within a tenth of a point of each
other, but SFace's 128-d identity embedding is not such a feature: on LFW-dev a linear
head on it gets about 76% gender accuracy and a 256-unit MLP about 93%, while a linear
head on SFace's average-pooled last feature map (``--features backbone``, the default)
gets about 98.7%. The embedder hands that pooled map out from the same forward pass, so
the shipped head is the linear one on it.

Class imbalance (LFW is about three quarters male) is handled by balanced BCE: the
training logit gets the log prior ratio log(pi) - log(1 - pi) added, so the raw logit
that is exported estimates the log-odds under equal priors and 0.5 is a fair threshold.

Validation is split by person, stratified by label: the same person on both sides would
let the head recognise people rather than their gender.

    python -m training.attribute_head --data ../shared/data/lfw-dev --out DIR [--embedder w600k-mbf]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from training.onnx_export import finish_model, write_artifact

log = logging.getLogger(__name__)

# attribute -> (label of target 0, label of target 1); the logit is the log-odds of target 1
ATTRIBUTES: dict[str, tuple[str, str]] = {"gender": ("M", "F")}
ONNX_INPUT, ONNX_OUTPUT = "embedding", "p"
ARTIFACT = "gender_head"


# --------------------------------------------------------------------------- data


@dataclass
class EmbeddedSet:
    """Central-face features of labelled photos; ``targets`` is (n, attributes), NaN = unlabelled."""

    images: list[str]
    people: np.ndarray  # (n,) person name per photo, the unit of the split
    embeddings: np.ndarray  # (n, dim) float32: the pipeline's embeddings, or backbone features
    targets: np.ndarray  # (n, len(ATTRIBUTES)) float32 in {0, 1, nan}
    embedder_version: str  # what produced ``embeddings``; the head is only valid on the same
    skipped: dict[str, int]
    landmarks: np.ndarray | None = None  # (n, 5, 2) of the central face, full-size pixels
    input: str = "embedding"  # what ``embeddings`` holds, as heads name their input (facecore.attributes)


def read_gender_tsv(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {row["image"]: row["gender"] for row in csv.DictReader(f, delimiter="\t")}


def central_face(faces, width: int, height: int):
    """The labelled LFW face: the detection whose box centre is nearest the image centre."""
    if not faces:
        return None
    d = [float((((f.box[:2] + f.box[2:4]) / 2 - [width / 2, height / 2]) ** 2).sum()) for f in faces]
    return faces[int(np.argmin(d))]


def embed_dataset(data: Path, cache_dir: Path, batch: int = 32, embedder: str | None = None) -> EmbeddedSet:
    """Embed every labelled photo with facecore's pipeline (``embedder``, default: the
    settings'), caching the result per embedder version.

    Photos whose central face is missing or too blurry to embed are skipped (and counted):
    the pipeline gives such faces no embedding, so the head never sees them in use either.
    """
    from facecore.pipeline import FacePipeline, batched
    from facecore.settings import Settings

    labels = read_gender_tsv(data / "gender.tsv")
    images = sorted(labels)
    pipe = FacePipeline(Settings(embedder=embedder) if embedder else None)
    version = pipe.model_version
    cache = cache_dir / f"lfw-dev-central-{version}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if list(z["all_images"]) == images:
            pipe.close()
            return _labelled_set(labels, list(z["images"]), z["embeddings"], version,
                                 json.loads(str(z["skipped"])), z["landmarks"])
        log.info("cache %s is for another image list, re-embedding", cache)
    kept, embs, marks, skipped = [], [], [], {"no face": 0, "blurry": 0, "decode error": 0}
    try:
        for i, chunk in enumerate(batched(images, batch)):
            for r in pipe.process([(name, data / "images" / name) for name in chunk]):
                face = central_face(r.faces, r.width, r.height) if r.ok else None
                if not r.ok:
                    skipped["decode error"] += 1
                elif face is None:
                    skipped["no face"] += 1
                elif face.embedding is None:
                    skipped["blurry"] += 1
                else:
                    kept.append(r.key)
                    embs.append(face.embedding)
                    marks.append(face.landmarks)
            if i % 20 == 0:
                log.info("embedded %d / %d photos", min((i + 1) * batch, len(images)), len(images))
    finally:
        pipe.close()
    emb, lm = np.stack(embs).astype(np.float32), np.stack(marks).astype(np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, all_images=np.array(images), images=np.array(kept), embeddings=emb, landmarks=lm,
             skipped=json.dumps(skipped))
    return _labelled_set(labels, kept, emb, version, skipped, lm)


def _labelled_set(labels: dict[str, str], images: list[str], emb: np.ndarray, version: str,
                  skipped: dict[str, int], landmarks: np.ndarray | None = None) -> EmbeddedSet:
    neg, pos = ATTRIBUTES["gender"]
    y = np.array([[1.0 if labels[i] == pos else 0.0 if labels[i] == neg else np.nan] for i in images], np.float32)
    people = np.array([i.split("/")[0] for i in images])
    return EmbeddedSet(images, people, emb, y, version, skipped, landmarks)


# Per embedder version: its registry name and its last feature map before the projection
# to the embedding (SFace 2021dec: 1024 x 7 x 7 before 128-d; w600k-mbf: 512 x 7 x 7 before
# its global depthwise conv and 512-d).
BACKBONE_LAYERS = {"sface-2021dec": ("sface", "conv_14_relu"), "w600k-mbf": ("w600k-mbf", "509")}


def artifact_name(embedder: str) -> str:
    """``gender_head`` for SFace's head, ``gender_head_<registry name>`` for another embedder's."""
    return ARTIFACT if embedder == "sface" else f"{ARTIFACT}_{embedder.replace('-', '_')}"


def backbone_dataset(ds: EmbeddedSet, data: Path, cache_dir: Path, batch: int = 64) -> EmbeddedSet:
    """The same faces as ``ds``, described by their embedder's average-pooled last feature
    map (SFace: 1024-d).

    The 128-d identity embedding is trained to keep only what tells people apart, while
    the feature map before it still carries more of what an attribute needs. Crops are
    re-made from the cached landmarks exactly as the pipeline makes them, and the
    features come from the pipeline's own embedder asked for that layer
    (``Embedder(pool_layer=...)``), which is what facecore runs for a head whose input
    is this feature.
    """
    from facecore import decode as dec
    from facecore.align import align_faces
    from facecore.embed import Embedder
    from facecore.settings import Settings

    if ds.embedder_version not in BACKBONE_LAYERS:
        raise ValueError(f"no backbone layer is known for {ds.embedder_version}; add it to BACKBONE_LAYERS")
    name, layer = BACKBONE_LAYERS[ds.embedder_version]
    embedder = Embedder(name, flip_tta=False, pool_layer=layer)
    feature = embedder.feature_name
    cache = cache_dir / f"lfw-dev-central-{embedder.base_version}-{feature.replace(':', '-')}.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if list(z["images"]) == ds.images:
            return EmbeddedSet(ds.images, ds.people, z["features"], ds.targets, embedder.base_version, ds.skipped,
                               ds.landmarks, feature)
    s = Settings()
    feats = []
    for i in range(0, len(ds.images), batch):
        crops = []
        for name, lm in zip(ds.images[i : i + batch], ds.landmarks[i : i + batch]):
            d = dec.load(data / "images" / name, max_bytes=s.max_bytes, max_pixels=s.max_pixels)
            crops.append(align_faces(d.rgb, lm[None] / d.scale)[0])
        feats.append(embedder.embed_with_features(np.stack(crops), batch)[1])
        if i % (20 * batch) == 0:
            log.info("backbone features %d / %d", i + len(crops), len(ds.images))
    features = np.concatenate(feats).astype(np.float32)
    np.savez(cache, images=np.array(ds.images), features=features)
    return EmbeddedSet(ds.images, ds.people, features, ds.targets, embedder.base_version, ds.skipped, ds.landmarks,
                       feature)


def person_folds(people: np.ndarray, y: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold index per sample: every person in exactly one fold, classes spread evenly.

    People are taken largest first (ties shuffled by ``seed``) and each goes to the fold
    that so far holds the fewest photos of that person's majority class, which keeps
    every fold's class mix close to the whole set's.
    """
    names, inverse = np.unique(people, return_inverse=True)
    counts = np.bincount(inverse)
    pos = np.bincount(inverse, weights=np.nan_to_num(y, nan=0.0))
    cls = (pos * 2 > counts).astype(int)
    order = np.random.default_rng(seed).permutation(len(names))
    order = order[np.argsort(-counts[order], kind="stable")]
    load = np.zeros((k, 2))
    fold_of = np.empty(len(names), int)
    for p in order:
        f = int(np.argmin(load[:, cls[p]] + 1e-6 * load.sum(1)))
        fold_of[p] = f
        load[f, cls[p]] += counts[p]
    return fold_of[inverse]


# --------------------------------------------------------------------------- model


def log_prior_ratio(targets: torch.Tensor) -> torch.Tensor:
    """log(pi) - log(1 - pi) per attribute, pi = share of positives among labelled samples."""
    mask = ~torch.isnan(targets)
    pi = torch.nan_to_num(targets, nan=0.0).sum(0) / mask.sum(0).clamp(min=1)
    pi = pi.clamp(1e-4, 1 - 1e-4)
    return torch.log(pi) - torch.log1p(-pi)


def balanced_bce(logits: torch.Tensor, targets: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """BCE on ``logits + offset`` over labelled entries (NaN targets are ignored).

    With offset = log prior ratio the head's own logit learns the balanced log-odds:
    the prior is absorbed by the offset, which is dropped at inference.
    """
    mask = ~torch.isnan(targets)
    z = (logits + offset)[mask]
    return F.binary_cross_entropy_with_logits(z, targets[mask])


class AttributeMLP(nn.Module):
    """Embedding -> one logit per attribute; ``hidden=0`` is a plain linear head."""

    def __init__(self, dim: int, n_attributes: int, hidden: int = 0):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_attributes))
        else:
            self.net = nn.Sequential(nn.Linear(dim, n_attributes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class HeadConfig:
    hidden: int = 0  # 0 = linear; on the 128-d embeddings a linear head is far behind, use 256 there
    l2: float = 1e-5  # penalty on the weights (not biases), per sample
    max_iter: int = 500
    seed: int = 0


def train_head(x: np.ndarray, y: np.ndarray, cfg: HeadConfig) -> AttributeMLP:
    """Full-batch L-BFGS on balanced BCE + L2: deterministic, and no learning rate to tune.

    A few thousand 128-d vectors fit in one batch; for the linear head this is plain
    L2-regularised logistic regression solved to convergence.
    """
    torch.manual_seed(cfg.seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model = AttributeMLP(x.shape[1], y.shape[1], cfg.hidden)
    offset = log_prior_ratio(yt)
    weights = [m.weight for m in model.net if isinstance(m, nn.Linear)]
    opt = torch.optim.LBFGS(model.parameters(), max_iter=cfg.max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = balanced_bce(model(xt), yt, offset) + cfg.l2 * sum((w**2).sum() for w in weights)
        loss.backward()
        return loss

    model.train()
    opt.step(closure)
    return model.eval()


def predict_proba(model: AttributeMLP, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(torch.from_numpy(x))).numpy()


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """Accuracy and balanced accuracy (mean of per-class recalls) at threshold 0.5."""
    pred = p >= 0.5
    y = y.astype(bool)
    recalls = [float((pred[y == c] == c).mean()) for c in (False, True)]
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()), "balanced_accuracy": float(np.mean(recalls)),
            "recall_" + ATTRIBUTES["gender"][0]: recalls[0], "recall_" + ATTRIBUTES["gender"][1]: recalls[1]}


def cross_validate(ds: EmbeddedSet, cfg: HeadConfig, k: int) -> dict:
    """Person-disjoint k-fold figures for attribute 0 (gender): per fold and pooled out-of-fold.

    Photos without a gender label still train (other attributes may use them) but are
    not scored.
    """
    folds = person_folds(ds.people, ds.targets[:, 0], k, cfg.seed)
    scored = ~np.isnan(ds.targets[:, 0])
    oof = np.full(len(ds.images), np.nan, np.float32)
    per_fold = []
    for f in range(k):
        te = folds == f
        model = train_head(ds.embeddings[~te], ds.targets[~te], cfg)
        oof[te] = predict_proba(model, ds.embeddings[te])[:, 0]
        te &= scored
        m = binary_metrics(ds.targets[te, 0], oof[te])
        m["people"] = int(len(np.unique(ds.people[te])))
        per_fold.append(m)
        log.info("fold %d: acc %.4f  balanced acc %.4f  (%d photos, %d people)", f, m["accuracy"],
                 m["balanced_accuracy"], m["n"], m["people"])
    pooled = binary_metrics(ds.targets[scored, 0], oof[scored])
    mean = {key: float(np.mean([m[key] for m in per_fold])) for key in ("accuracy", "balanced_accuracy")}
    return {"folds": per_fold, "mean": mean, "pooled_out_of_fold": pooled}


# --------------------------------------------------------------------------- export


def to_onnx(model: AttributeMLP, meta: dict[str, str]) -> onnx.ModelProto:
    """The head as Gemm(/Relu/Gemm)/Sigmoid with a symbolic batch axis, built directly with onnx.helper.

    ``meta`` goes into the file's metadata, so what the head needs at run time (the
    embedder version it was trained on, its attribute names) is pinned with its sha256.
    """
    linears = [m for m in model.net if isinstance(m, nn.Linear)]
    inits, nodes, x = [], [], ONNX_INPUT
    for i, lin in enumerate(linears):
        w, b = f"w{i}", f"b{i}"
        inits += [numpy_helper.from_array(lin.weight.detach().numpy().astype(np.float32), w),
                  numpy_helper.from_array(lin.bias.detach().numpy().astype(np.float32), b)]
        nodes.append(helper.make_node("Gemm", [x, w, b], [f"z{i}"], transB=1))
        x = f"z{i}"
        if i < len(linears) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
            x = f"h{i}"
    nodes.append(helper.make_node("Sigmoid", [x], [ONNX_OUTPUT]))
    dim, n_out = linears[0].in_features, linears[-1].out_features
    graph = helper.make_graph(nodes, "attribute_head",
                              [helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["N", dim])],
                              [helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["N", n_out])], inits)
    return finish_model(graph, meta)


def export(model: AttributeMLP, ds: EmbeddedSet, cfg: HeadConfig, cv: dict, k: int, out: Path,
           data_desc: dict, version: str, name: str = ARTIFACT) -> Path:
    """Write ``<name>.onnx`` and its model card ``<name>.json`` to ``out``; returns the onnx path."""
    attrs = list(ATTRIBUTES)
    meta = {"head_version": version, "embedder_version": ds.embedder_version, "input": ds.input,
            "attributes": json.dumps(ATTRIBUTES)}
    y = ds.targets[:, 0]
    card = {
        "embedder_version": ds.embedder_version,
        "input": {"name": ONNX_INPUT, "shape": ["N", int(ds.embeddings.shape[1])], "reads": ds.input,
                  "note": "vectors 'reads' of embedder_version above (facecore.attributes.vector_version), "
                          "nothing else"},
        "output": {"name": ONNX_OUTPUT, "shape": ["N", len(attrs)], "attributes": attrs,
                   "note": "sigmoid of the balanced logit: P(target 1) under equal class priors; "
                           "target labels per attribute are [label of 0, label of 1]"},
        "labels": ATTRIBUTES,
        "head": {"type": "mlp" if cfg.hidden else "linear", **cfg.__dict__},
        "loss": "balanced BCE: BCE(logit + log(pi) - log(1 - pi)), pi = training share of target 1",
        "data": {**data_desc, "photos_used": len(ds.images), "people": int(len(np.unique(ds.people))),
                 "share_target_1": float(np.nanmean(y)), "skipped": ds.skipped,
                 "labelled_face": "detected face nearest the image centre"},
        "split": {"method": f"{k}-fold, person-disjoint, stratified by gender (training.attribute_head.person_folds)",
                  "seed": cfg.seed, "final_model": "trained on all people after cross-validation"},
        "metrics": {"gender": cv},
    }
    return write_artifact(out, name, to_onnx(model, meta), version, card)


def fit_and_export(ds: EmbeddedSet, out: Path, cfg: HeadConfig, k: int = 5, data_desc: dict | None = None,
                   version: str = "gender-head-2", name: str = ARTIFACT) -> dict:
    """Cross-validate by person, train the final head on everyone, export as ``name``; returns the card."""
    cv = cross_validate(ds, cfg, k)
    model = train_head(ds.embeddings, ds.targets, cfg)
    export(model, ds, cfg, cv, k, out, data_desc or {}, version, name)
    return json.loads((out / f"{name}.json").read_text())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="LFW-dev root (gender.tsv, images/)")
    ap.add_argument("--out", type=Path, required=True, help="where gender_head[_<embedder>].onnx and .json go")
    ap.add_argument("--embedder", default="sface", help="registry name of the embedder whose features the head reads")
    ap.add_argument("--cache", type=Path, default=Path("out/attributes"), help="embedding cache folder")
    ap.add_argument("--features", choices=["embedding", "backbone"], default="backbone",
                    help="backbone: the embedder's pooled last feature map (default); embedding: the "
                    "pipeline's vectors (for SFace's 128-d ones it needs --hidden 256 to be any good)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--hidden", type=int, default=HeadConfig.hidden, help="0 = linear head")
    ap.add_argument("--l2", type=float, default=HeadConfig.l2, help="weight penalty")
    ap.add_argument("--max-iter", type=int, default=HeadConfig.max_iter, help="L-BFGS iterations")
    ap.add_argument("--seed", type=int, default=HeadConfig.seed)
    ap.add_argument("--version", default="gender-head-2", help="e.g. gender-head-w600k-mbf-1 for another embedder")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ds = embed_dataset(args.data, args.cache, embedder=args.embedder)
    if args.features == "backbone":
        ds = backbone_dataset(ds, args.data, args.cache)
    torch.set_num_threads(1)  # the head is tiny; more threads only contend on a shared machine
    cfg = HeadConfig(args.hidden, args.l2, args.max_iter, args.seed)
    desc = {"dataset": args.data.resolve().name, "labels": "gender.tsv",
            "labels_sha256": hashlib.sha256((args.data / "gender.tsv").read_bytes()).hexdigest()}
    card = fit_and_export(ds, args.out, cfg, args.folds, desc, args.version, artifact_name(args.embedder))
    m = card["metrics"]["gender"]
    print(json.dumps({"mean": m["mean"], "pooled_out_of_fold": m["pooled_out_of_fold"], "sha256": card["sha256"]},
                     indent=2))


if __name__ == "__main__":
    main()
