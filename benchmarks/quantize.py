"""Quantisation study of MTCNN's three nets and SFace: fp32, bf16, fp16 and int8, one net at a time.

Every variant is a compiled OpenVINO model swapped into the real pipeline (``FacePipeline``
with an ``MTCNN`` whose ``pnet``/``rnet``/``onet`` are replaced, and an ``Embedder`` whose
compiled graph is replaced; the embedder keeps its version, so the clustering cut, trash
threshold and gender head are the shipped ones). The photos go through `facecluster index`'s
own path (``index_items`` into a fresh SQLite file, ``cluster_user``), and the scorer judges
each run like ``product.py``'s.

Precisions (OpenVINO CPU, ``INFERENCE_PRECISION_HINT``):

* fp32: f32 (the reference every other run is compared with);
* bf16: bf16 (AVX512_BF16 / AMX on CPUs that have them);
* fp16: f16, which OpenVINO's CPU plugin runs on CPUs with AVX512_FP16. This stands in for
  the GPU path's half precision for ACCURACY only: its speed is a CPU speed, not a GPU's;
* int8: NNCF post-training quantisation (default preset) of the OpenVINO model, calibrated on
  inputs the fp32 pipeline fed that net on LFW-dev photos of people OUTSIDE the evaluated
  folds; operations left in float run in f32.

Steps (each caches its outputs under --out):

    python benchmarks/quantize.py prepare            # subset tree, calibration inputs, int8 models
    python benchmarks/quantize.py run fp32 pnet=int8 sface=bf16 ...   # one index per variant
    python benchmarks/quantize.py run pnet=bf16,rnet=bf16,onet=bf16,sface=bf16 --name all-bf16
    python benchmarks/quantize.py speed --threads-list 1,2   # ms per call per net and precision
    python benchmarks/quantize.py compare            # everything against fp32 -> report.json, lists
    python benchmarks/quantize.py drift              # each net's outputs against fp32, fp16 also emulated
    python benchmarks/quantize.py tables             # the markdown tables of docs/QUANTISATION.md

    python benchmarks/quantize.py run sface=bf16 --folds all --out out/quant-full   # all of LFW-dev
    python benchmarks/quantize.py compare --folds all --out out/quant-full --reference sface-bf16

A variant is ``net=precision[,net=precision...]`` (nets pnet, rnet, onet, sface; unnamed nets
stay fp32); ``fp32`` is the reference. ``--folds`` picks whole View-2 folds of pairs.txt: the
evaluated photos are all photos of the people in those folds' pairs (folds are
person-disjoint), the verification pairs those folds' pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

NETS = ("pnet", "rnet", "onet", "sface")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
OV_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- data subset


def fold_subset(data: Path, folds: list[int], dest: Path) -> Path:
    """A data folder of the chosen folds: pairs.txt of their pairs, images/ of their people's
    photos (links to the originals), gender.tsv of those photos. Returns it."""
    lines = [l.rstrip("\n") for l in open(data / "pairs.txt") if l.strip()]
    nfold, n = map(int, lines[0].split())
    rows = lines[1:]
    chosen = [r for k in folds for r in rows[(k - 1) * 2 * n:k * 2 * n]]
    people = set()
    for r in chosen:
        f = r.split("\t") if "\t" in r else r.split()
        people.add(f[0])
        if len(f) == 4:
            people.add(f[2])
    if (dest / "done").exists():
        return dest
    (dest / "images").mkdir(parents=True, exist_ok=True)
    (dest / "pairs.txt").write_text(f"{len(folds)}\t{n}\n" + "\n".join(chosen) + "\n")
    photos = set()
    for p in sorted(people):
        (dest / "images" / p).mkdir(exist_ok=True)
        for f in sorted(os.listdir(data / "images" / p)):
            link = dest / "images" / p / f
            if not link.exists():
                link.symlink_to((data / "images" / p / f).resolve())
            photos.add(f"{p}/{f}")
    if (data / "gender.tsv").exists():
        g = open(data / "gender.tsv").read().splitlines()
        (dest / "gender.tsv").write_text("\n".join([g[0]] + [l for l in g[1:] if l.split("\t")[0] in photos]) + "\n")
    (dest / "done").write_text("")
    return dest


def eval_data(args) -> Path:
    """The folder a run indexes and is scored on: all of LFW-dev (--folds all) or the chosen folds."""
    return args.data if args.folds == "all" else fold_subset(args.data, args.folds, args.out / "data")


def subset_people(subset: Path) -> set[str]:
    return set(os.listdir(subset / "images"))


# ---------------------------------------------------------------- models


def onnx_graph(net: str, pool_layer: str | None = None) -> bytes:
    """The exact graph the pipeline compiles for this net."""
    import joblib
    import onnx

    from facecore.embed import add_pooled_output
    from facecore.models import make_batch_dynamic, resolve
    from facecore.mtcnn_onnx import BUILDERS

    if net == "sface":
        model = make_batch_dynamic(onnx.load(str(resolve("sface")[0])))
        if pool_layer:
            model, _ = add_pooled_output(model, pool_layer)
        return model.SerializeToString()
    return BUILDERS[net](joblib.load(resolve(f"mtcnn-{net}")[0])).SerializeToString()


def sface_pool_layer() -> str | None:
    """What FacePipeline asks the embedder to hand out for the shipped attribute head."""
    from facecore.attributes import head_for, head_source
    from facecore.embed import POOLED
    from facecore.models import resolve

    head = head_for(resolve("sface")[1])
    reads = head_source(head)[0] if head else None
    return reads[len(POOLED):] if reads and reads.startswith(POOLED) else None


def ov_model(net: str, precision: str, models_dir: Path):
    """The OpenVINO model of one net at one precision (int8: the NNCF model saved by ``prepare``)."""
    import openvino as ov

    core = ov.Core()
    if precision == "int8":
        xml = models_dir / f"{net}_int8.xml"
        if not xml.exists():
            raise FileNotFoundError(f"{xml}: run `quantize.py prepare` first")
        return core.read_model(str(xml))
    return core.read_model(onnx_graph(net, sface_pool_layer() if net == "sface" else None))


class OVNet:
    """An ``InferenceModel``-compatible compiled OpenVINO model (``predict``, ``version``, names)."""

    def __init__(self, model, precision: str, threads: int, version: str = "quant-study"):
        import openvino as ov

        self.precision = precision
        self.version = version
        self.backend = "openvino"
        self.on_accelerator = False
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                  "INFERENCE_PRECISION_HINT": OV_HINT[precision]}
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.effective = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        request = self.compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(batch)}, share_inputs=True)
        return [request.get_output_tensor(i).data.copy() for i in range(len(self.output_names))]


def parse_variant(spec: str) -> dict[str, str]:
    out = {n: "fp32" for n in NETS}
    if spec == "fp32":
        return out
    for part in spec.split(","):
        net, prec = part.split("=")
        if net not in NETS or prec not in PRECISIONS:
            raise SystemExit(f"bad variant part {part!r}: nets {NETS}, precisions {PRECISIONS}")
        out[net] = prec
    return out


def variant_name(spec: str) -> str:
    return spec.replace("=", "-").replace(",", "_")


def build_pipeline(settings, variant: dict[str, str], models_dir: Path, threads: int):
    """A FacePipeline whose nets are those of ``variant`` (fp32 nets exactly as the library builds them)."""
    from facecore.detect import MTCNN
    from facecore.embed import Embedder
    from facecore.pipeline import FacePipeline

    s = settings
    det = MTCNN(min_face_size=s.min_face_size, thresholds=tuple(s.det_thresholds), scale_factor=s.scale_factor,
                threads=threads, backend="openvino", precision="f32", landmark_tta=s.landmark_tta)
    emb = Embedder(s.embedder, threads=threads, flip_tta=s.flip_tta, backend="openvino",
                   pool_layer=sface_pool_layer(), precision="f32")
    for net in ("pnet", "rnet", "onet"):
        if variant[net] != "fp32":
            old = getattr(det, net)
            setattr(det, net, OVNet(ov_model(net, variant[net], models_dir), variant[net], threads, old.version))
    if variant["sface"] != "fp32":
        swap = OVNet(ov_model("sface", variant["sface"], models_dir), variant["sface"], threads)
        assert len(swap.output_names) == len(emb.output_names)
        emb.compiled = swap.compiled
    return FacePipeline(s, detector=det, embedder=emb)


# ---------------------------------------------------------------- prepare: calibration and int8


class Recorder:
    """Stands in for a net, recording every input (split into single samples) it is fed."""

    def __init__(self, net, sink: list):
        self.net, self.sink, self.version = net, sink, net.version

    def predict(self, batch: np.ndarray) -> list[np.ndarray]:
        self.sink.extend(np.array(batch[i:i + 1]) for i in range(len(batch)))
        return self.net.predict(batch)


def prepare(args) -> None:
    import nncf
    import openvino as ov

    from facecore.settings import load_settings
    from services.indexing import find_photos

    out = args.out
    subset = fold_subset(args.data, args.folds, out / "data")
    models_dir = out / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    held = subset_people(subset)
    pool = [p for p in find_photos(args.data / "images") if p.split("/")[0] not in held]
    rng = random.Random(0)
    calib = sorted(rng.sample(pool, args.calib_photos))
    (out / "calibration_photos.txt").write_text("\n".join(calib) + "\n")
    settings = load_settings(threads=args.threads)
    pipe = build_pipeline(settings, parse_variant("fp32"), models_dir, args.threads)
    seen: dict[str, list] = {n: [] for n in NETS}
    for n in ("pnet", "rnet", "onet"):
        setattr(pipe.detector, n, Recorder(getattr(pipe.detector, n), seen[n]))
    emb = pipe.embedder
    real_predict = emb.predict

    def recording_predict(batch):
        seen["sface"].extend(np.array(batch[i:i + 1]) for i in range(len(batch)))
        return real_predict(batch)

    emb.predict = recording_predict
    t = time.perf_counter()
    for i in range(0, len(calib), 32):
        pipe.process([(p, args.data / "images" / p) for p in calib[i:i + 32]])
    pipe.close()
    print(f"calibration pass over {len(calib)} photos: {time.perf_counter() - t:.1f} s; inputs seen: "
          + ", ".join(f"{n} {len(v)}" for n, v in seen.items()), flush=True)
    card = {"calibration_photos": len(calib), "from": "LFW-dev photos of people outside the evaluated folds",
            "folds_evaluated": args.folds, "samples": {}, "nncf": nncf.__version__, "openvino": ov.__version__}
    speed_inputs = {}
    for net in NETS:
        samples = seen[net]
        rng_np = np.random.default_rng(0)
        pick = rng_np.choice(len(samples), min(args.calib_samples, len(samples)), replace=False)
        data = [samples[i] for i in sorted(pick)]
        card["samples"][net] = len(data)
        # speed inputs at each net's typical batch: P-Net one photo's canvas, R-Net 48 and
        # O-Net 8 crops (LFW-dev means per photo, as engines.py), SFace 8 faces (CPU_BATCH)
        k = {"pnet": 1, "rnet": 48, "onet": 8, "sface": 8}[net]
        speed_inputs[net] = np.concatenate(samples[:k])
        xml = models_dir / f"{net}_int8.xml"
        if xml.exists() and not args.force:
            continue
        t = time.perf_counter()
        model = ov_model(net, "fp32", models_dir)
        q = nncf.quantize(model, nncf.Dataset(data), subset_size=len(data))
        ov.save_model(q, str(xml))
        print(f"{net}: int8 from {len(data)} samples in {time.perf_counter() - t:.1f} s", flush=True)
    np.savez(out / "speed_inputs.npz", **speed_inputs)
    (out / "calibration.json").write_text(json.dumps(card, indent=1))


# ---------------------------------------------------------------- run: one index per variant


def run(args) -> None:
    from services.clustering import cluster_user
    from services.indexing import folder_items, index_items

    from product import fresh_library, score_library

    subset = eval_data(args)
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for spec in args.variants:
        variant = parse_variant(spec)
        name = args.name if args.name and len(args.variants) == 1 else variant_name(spec)
        db = runs / f"{name}.db"
        settings, engine, sessions = fresh_library(db, args.threads)
        pipe = build_pipeline(settings, variant, args.models or args.out / "models", args.threads)
        items = folder_items(subset / "images")
        t = time.perf_counter()
        summary = index_items(pipe, sessions, "bench", items)
        wall = time.perf_counter() - t
        pipe.close()
        cluster_user(sessions, "bench", pipe.model_version)
        engine.dispose()
        result = score_library(settings.database_url, "bench", runs / name, subset)
        result["variant"] = variant
        result["photos"] = summary.seen
        result["faces"] = summary.faces
        result["index_ms_per_photo"] = 1000 * wall / max(summary.seen, 1)
        result["stage_ms_per_photo"] = {k: 1000 * v / max(summary.seen, 1) for k, v in summary.stage_seconds.items()}
        result["threads"] = args.threads
        (runs / f"{name}_run.json").write_text(json.dumps(result, indent=1))
        v, c = result["verification"], result["clustering"]
        print(f"{name}: acc {v['accuracy']:.4f} AUC {v['auc']:.4f} BCubed F1 {c['bcubed_f1']:.4f} "
              f"({summary.seen} photos, {summary.faces} faces, {result['index_ms_per_photo']:.1f} ms/photo)",
              flush=True)


# ---------------------------------------------------------------- compare against fp32


def load_faces(db: Path) -> tuple[dict[str, list[dict]], dict[int, np.ndarray]]:
    """photo -> its faces (box, landmarks, person, trash, blurry, id); face id -> vector."""
    import sqlalchemy as sa

    from product import load_run
    from services.store.db import make_engine, session_factory
    from services.store.models import Face, FacePerson, Photo

    _, vectors = load_run(f"sqlite:///{db}", "bench")
    engine = make_engine(f"sqlite:///{db}")
    faces: dict[str, list[dict]] = {}
    with session_factory(engine)() as s:
        q = (sa.select(Photo.uri, Face.id, Face.face_index, Face.x1, Face.y1, Face.x2, Face.y2, Face.landmarks,
                       Face.trash, Face.blurry, FacePerson.person_id)
             .join(Photo, Photo.id == Face.photo_id).outerjoin(FacePerson, FacePerson.face_id == Face.id)
             .order_by(Photo.uri, Face.face_index))
        for r in s.execute(q):
            faces.setdefault(r.uri, []).append({
                "id": r.id, "index": r.face_index, "box": np.array([r.x1, r.y1, r.x2, r.y2], float),
                "landmarks": np.asarray(r.landmarks, float).reshape(5, 2), "trash": bool(r.trash),
                "blurry": bool(r.blurry), "person": r.person_id})
    engine.dispose()
    return faces, vectors


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def match_faces(ref: list[dict], other: list[dict], min_iou: float = 0.5) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of two photos' faces by box IoU, best pairs first."""
    cand = sorted(((box_iou(a["box"], b["box"]), i, j) for i, a in enumerate(ref) for j, b in enumerate(other)),
                  reverse=True)
    used_i, used_j, out = set(), set(), []
    for iou, i, j in cand:
        if iou >= min_iou and i not in used_i and j not in used_j:
            used_i.add(i)
            used_j.add(j)
            out.append((i, j, iou))
    return out


def best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """The cosine cut with the most right decisions over the given pairs (midpoint of neighbours)."""
    order = np.argsort(scores)
    s, y = scores[order], same[order]
    # deciding "same" for everything above position k: right = different below + same above
    right = np.concatenate([[0], np.cumsum(~y)]) + np.concatenate([np.cumsum(y[::-1])[::-1], [0]])
    k = int(np.argmax(right))
    if k == 0:
        return float(s[0] - 1e-6)
    if k == len(s):
        return float(s[-1] + 1e-6)
    return float((s[k - 1] + s[k]) / 2)


def read_pairs_rows(path: Path) -> list[list[str]]:
    lines = [l.rstrip("\n") for l in open(path) if l.strip()]
    return [l.split("\t") if "\t" in l else l.split() for l in lines[1:]]


def compare(args) -> None:
    from scipy.optimize import linear_sum_assignment

    runs = args.out / "runs"
    subset = eval_data(args)
    rows = read_pairs_rows(subset / "pairs.txt")
    same = np.array([len(r) == 3 for r in rows])

    def scores(name: str) -> np.ndarray:
        return np.loadtxt(runs / f"{name}_scores.tsv", skiprows=1)

    ref_name = args.reference
    ref_faces, ref_vec = load_faces(runs / f"{ref_name}.db")
    ref_scores = scores(ref_name)
    cut = best_threshold(ref_scores, same)
    names = sorted(p.name[:-len("_run.json")] for p in runs.glob("*_run.json"))
    report = {"reference": ref_name, "pair_threshold": cut, "pairs": len(rows), "runs": {}}
    lists = args.out / "lists"
    lists.mkdir(exist_ok=True)
    for name in names:
        res = json.loads((runs / f"{name}_run.json").read_text())
        entry = {"variant": res["variant"], "accuracy": res["verification"]["accuracy"],
                 "accuracy_std": res["verification"]["accuracy_std"], "auc": res["verification"]["auc"],
                 "tar_at_far_1pct": res["verification"]["tar_at_far_1pct"],
                 "bcubed_f1": res["clustering"]["bcubed_f1"], "pairwise_f1": res["clustering"]["pairwise_f1"],
                 "clusters": res["clustering"]["clusters"], "coverage": res["clustering"]["detection_coverage"],
                 "faces": res["faces"], "index_ms_per_photo": res["index_ms_per_photo"]}
        if name != ref_name:
            sc = scores(name)
            flips = np.flatnonzero((sc > cut) != (ref_scores > cut))
            fixed = [int(i) for i in flips if (sc[i] > cut) == same[i]]
            both = (sc > -1) & (ref_scores > -1)
            delta = np.abs(sc - ref_scores)[both]
            entry["pair_score_delta_median"] = float(np.median(delta))
            entry["pair_score_delta_max"] = float(delta.max())
            entry["pairs_delta_over_0.02"] = int((delta > 0.02).sum())
            entry["pairs_missing_changed"] = int((~both & ((sc > -1) | (ref_scores > -1))).sum())
            entry["pairs_changed"] = int(len(flips))
            entry["pairs_fixed"], entry["pairs_broken"] = len(fixed), int(len(flips) - len(fixed))
            with open(lists / f"{name}_pairs.tsv", "w") as f:
                f.write("pair\tfold\tsame\tpair_text\tscore_fp32\tscore_variant\tnow\n")
                for i in flips:
                    f.write(f"{i}\t{i // 600 + 1}\t{int(same[i])}\t{' '.join(rows[i])}\t{ref_scores[i]:.4f}\t"
                            f"{sc[i]:.4f}\t{'right' if i in fixed else 'wrong'}\n")
            entry["pair_examples"] = [" ".join(rows[i]) + f" ({ref_scores[i]:.3f} -> {sc[i]:.3f}, "
                                      f"{'now right' if i in fixed else 'now wrong'})" for i in flips[:4]]
            entry.update(cross_verification(runs, ref_name, name, subset))
            entry.update(compare_faces(name, ref_faces, ref_vec, *load_faces(runs / f"{name}.db"), lists,
                                       linear_sum_assignment))
        report["runs"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if not k.endswith("examples")}), flush=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))


def cross_verification(runs: Path, a: str, b: str, subset: Path) -> dict:
    """Verification when one photo of each pair was indexed with fp32 and the other with the
    variant (a library indexed on machines of both kinds), scored by the scorer both ways."""
    from facecore.verify import read_pairs
    from product import central_faces, load_run, pair_scores
    from score import score_pairs

    central = []
    for name in (a, b):
        rows, vectors = load_run(f"sqlite:///{runs / f'{name}.db'}", "bench")
        central.append({p: vectors[f] for p, f in central_faces(rows, set(vectors), subset / "images").items()})
    pairs = read_pairs(subset / "pairs.txt")
    out = {}
    for tag, left, right in (("ref_variant", central[0], central[1]), ("variant_ref", central[1], central[0])):
        tsv = runs / f"{b}_cross_{tag}.tsv"
        tsv.write_text("score\n" + "".join(f"{s:.6f}\n" for s in pair_scores(pairs, left, right)))
        out[f"cross_accuracy_{tag}"] = score_pairs(tsv, subset)["accuracy"]
    return out


def compare_faces(name, ref_faces, ref_vec, faces, vec, lists: Path, lsa) -> dict:
    """Detection overlap, landmark error, central-face cosine and cluster changes against the reference."""
    matched, lost, new, ious, lm_mean, lm_max, cos = [], [], [], [], [], [], []
    worst = []
    for photo in sorted(set(ref_faces) | set(faces)):
        a, b = ref_faces.get(photo, []), faces.get(photo, [])
        m = match_faces(a, b)
        mi, mj = {i for i, _, _ in m}, {j for _, j, _ in m}
        lost += [(photo, a[i]["index"]) for i in range(len(a)) if i not in mi]
        new += [(photo, b[j]["index"]) for j in range(len(b)) if j not in mj]
        for i, j, iou in m:
            ra, rb = a[i], b[j]
            iod = np.linalg.norm(ra["landmarks"][0] - ra["landmarks"][1])
            err = np.linalg.norm(ra["landmarks"] - rb["landmarks"], axis=1) / max(iod, 1e-6)
            ious.append(iou)
            lm_mean.append(err.mean())
            lm_max.append(err.max())
            worst.append((err.max(), photo, ra["index"]))
            if ra["id"] in ref_vec and rb["id"] in vec:
                cos.append(float(ref_vec[ra["id"]] @ vec[rb["id"]]))
            matched.append((photo, ra, rb))
    # clusters: map each variant cluster to at most one reference cluster (most shared faces)
    ref_ids = sorted({ra["person"] for _, ra, _ in matched if ra["person"] is not None})
    var_ids = sorted({rb["person"] for _, _, rb in matched if rb["person"] is not None})
    ri, vi = {p: k for k, p in enumerate(ref_ids)}, {p: k for k, p in enumerate(var_ids)}
    table = np.zeros((len(ref_ids), len(var_ids)))
    for _, ra, rb in matched:
        if ra["person"] is not None and rb["person"] is not None:
            table[ri[ra["person"]], vi[rb["person"]]] += 1
    mapping = {}
    if table.size:
        r, c = lsa(-table)
        mapping = {var_ids[j]: ref_ids[i] for i, j in zip(r, c) if table[i, j] > 0}
    moved = []
    for photo, ra, rb in matched:
        before, after = ra["person"], rb["person"]
        if (before is None) != (after is None) or (after is not None and mapping.get(after) != before):
            moved.append((photo, ra["index"], before, after))
    # the face the scorer judges: each photo's non-trash face nearest the centre (LFW photos are 250x250)
    def central(fs: list[dict]) -> int | None:
        fs = [f for f in fs if not f["trash"]]
        return min(fs, key=lambda f: float(np.sum(((f["box"][:2] + f["box"][2:]) / 2 - 125.0) ** 2)))["index"] if fs else None

    ref_central = {p: central(fs) for p, fs in ref_faces.items()}
    var_central = {p: central(fs) for p, fs in faces.items()}
    moved_central = [m for m in moved if ref_central.get(m[0]) == m[1]]
    central_changed = [p for p in sorted(set(ref_central) | set(var_central))
                       if ref_central.get(p) is None or var_central.get(p) is None
                       or not any(ra["index"] == ref_central[p] and rb["index"] == var_central[p]
                                  for q, ra, rb in matched if q == p)]
    with open(lists / f"{name}_faces.tsv", "w") as f:
        f.write("change\tphoto\tface\tperson_fp32\tperson_variant\n")
        f.writelines(f"lost\t{p}\t{i}\t\t\n" for p, i in lost)
        f.writelines(f"new\t{p}\t{i}\t\t\n" for p, i in new)
        f.writelines(f"cluster{'_central' if (p, i, a, b) in moved_central else ''}\t{p}\t{i}\t{a}\t{b}\n"
                     for p, i, a, b in moved)
        f.writelines(f"central_face_differs\t{p}\t{ref_central.get(p)}\t\t\n" for p in central_changed)
    worst.sort(reverse=True)
    lm_mean, lm_max = np.array(lm_mean) * 100, np.array(lm_max) * 100
    cos = np.array(cos) if cos else np.array([np.nan])
    return {
        "faces_matched": len(matched), "faces_lost": len(lost), "faces_new": len(new),
        "box_iou_mean": float(np.mean(ious)), "box_iou_min": float(np.min(ious)),
        "landmark_err_pct_iod_mean": float(lm_mean.mean()), "landmark_err_pct_iod_p99": float(np.percentile(lm_max, 99)),
        "landmark_err_pct_iod_max": float(lm_max.max()),
        "cosine_to_fp32_min": float(cos.min()), "cosine_to_fp32_p1": float(np.percentile(cos, 1)),
        "cosine_to_fp32_median": float(np.median(cos)),
        "faces_changed_cluster": len(moved), "central_faces_changed_cluster": len(moved_central),
        "photos_central_face_differs": len(central_changed),
        "face_examples": [f"lost {p}#{i}" for p, i in lost[:2]] + [f"new {p}#{i}" for p, i in new[:2]]
                         + [f"moved {p}#{i}" for p, i, _, _ in moved[:4]],
        "worst_landmarks": [f"{p}#{i} {100 * e:.1f}%" for e, p, i in worst[:3] if e > 0],
    }


# ---------------------------------------------------------------- speed


def speed(args) -> None:
    inputs = np.load(args.out / "speed_inputs.npz")
    rows = []
    for net in NETS:
        x = inputs[net]
        for threads in args.threads_list:
            row = {"net": net, "batch": list(x.shape), "threads": threads}
            models = {p: OVNet(ov_model(net, p, args.out / "models"), p, threads) for p in PRECISIONS}
            times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
            for m in models.values():
                for _ in range(3):
                    m.predict(x)
            for _ in range(args.reps):  # interleaved, so a busy spell of the host hits every precision alike
                for prec, m in models.items():
                    t = time.perf_counter()
                    m.predict(x)
                    times[prec].append(1000 * (time.perf_counter() - t))
            for prec, m in models.items():
                row[prec] = round(statistics.median(times[prec]), 3)
                row[f"{prec}_effective"] = m.effective
            rows.append(row)
            print(json.dumps(row), flush=True)
    (args.out / f"speed{args.tag}.json").write_text(json.dumps(
        {"rows": rows, "loadavg_at_end": os.getloadavg(), "reps": args.reps, "platform": platform.platform()},
        indent=1))


def tables(args) -> None:
    """Markdown tables of report.json (and speed*.json) for docs/QUANTISATION.md."""
    rep = json.loads((args.out / "report.json").read_text())
    print(f"pair threshold (the reference run's best on these pairs): {rep['pair_threshold']:.4f}, {rep['pairs']} pairs\n")
    print("| run | LFW acc | AUC | BCubed F1 | pairwise F1 | clusters | cross acc fp32/variant | pairs changed "
          "(fixed/broken) | faces changed cluster (labelled) | face cosine to fp32 min / p1 / median |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rep["runs"].items():
        cross = (f"{r['cross_accuracy_ref_variant']:.4f} / {r['cross_accuracy_variant_ref']:.4f}"
                 if "cross_accuracy_ref_variant" in r else "—")
        print(f"| {name} | {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} | {r['auc']:.5f} | {r['bcubed_f1']:.4f} | "
              f"{r['pairwise_f1']:.4f} | {r['clusters']} | {cross} | "
              + (f"{r['pairs_changed']} ({r['pairs_fixed']}/{r['pairs_broken']}) | "
                 f"{r['faces_changed_cluster']} ({r['central_faces_changed_cluster']}) | "
                 f"{r['cosine_to_fp32_min']:.4f} / {r['cosine_to_fp32_p1']:.4f} / {r['cosine_to_fp32_median']:.5f} |"
                 if "pairs_changed" in r else "— | — | — |"))
    print("\n| run | pair score change median / max | pairs moved > 0.02 | pairs with a face only in one run |")
    print("|---|---|---|---|")
    for name, r in rep["runs"].items():
        if "pair_score_delta_max" in r:
            print(f"| {name} | {r['pair_score_delta_median']:.4f} / {r['pair_score_delta_max']:.4f} | "
                  f"{r['pairs_delta_over_0.02']} | {r['pairs_missing_changed']} |")
    print("\n| run | faces | matched | lost | new | box IoU mean / min | landmark error % IOD mean / p99 / max |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rep["runs"].items():
        if "faces_matched" in r:
            print(f"| {name} | {r['faces']} | {r['faces_matched']} | {r['faces_lost']} | {r['faces_new']} | "
                  f"{r['box_iou_mean']:.4f} / {r['box_iou_min']:.3f} | {r['landmark_err_pct_iod_mean']:.3f} / "
                  f"{r['landmark_err_pct_iod_p99']:.2f} / {r['landmark_err_pct_iod_max']:.2f} |")
    for name, r in rep["runs"].items():
        ex = r.get("pair_examples", []) + r.get("face_examples", []) + r.get("worst_landmarks", [])
        if ex:
            print(f"\n{name}: " + "; ".join(ex))
    for f in sorted(args.out.glob("speed*.json")):
        sp = json.loads(f.read_text())
        print(f"\n{f.name} (median of {sp['reps']}, load average at end {sp['loadavg_at_end']})\n")
        print("| net, batch | threads | fp32 | bf16 | fp16 (CPU, AVX512_FP16) | int8 |")
        print("|---|---|---|---|---|---|")
        for r in sp["rows"]:
            print(f"| {r['net']} {r['batch']} | {r['threads']} | " + " | ".join(f"{r[p]:.2f}" for p in PRECISIONS) + " |")


def fp16_emulated(graph: bytes) -> bytes:
    """The graph with half-precision storage and float32 arithmetic: float weights rounded to
    float16, and every tensor rounded to float16 after each node (Cast pairs). This is what a
    GPU's half precision does when it accumulates in float32 (tensor cores). Graph outputs are
    left in float32, so a softmax output is not rounded here."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load_from_string(graph)
    for init in m.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            a = numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(a, init.name))
    nodes = []
    rename = {}

    def rounded(name: str) -> str:
        nodes.append(helper.make_node("Cast", [name], [name + "__h"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", [name + "__h"], [name + "__r"], to=TensorProto.FLOAT))
        return name + "__r"

    rename[m.graph.input[0].name] = rounded(m.graph.input[0].name)
    outputs = {o.name for o in m.graph.output}
    for node in m.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        nodes.append(node)
        for o in node.output:
            if o not in outputs and node.op_type not in ("Shape", "Constant", "Reshape", "Flatten", "Transpose"):
                rename[o] = rounded(o)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m.SerializeToString()


def drift(args) -> None:
    """Each net's outputs at every precision against fp32 on inputs the fp32 pipeline fed it on
    --drift-photos photos of the evaluated folds; fp16 both as OpenVINO runs it on this CPU and
    emulated (half storage, float32 arithmetic, on ONNX Runtime)."""
    import onnxruntime as ort

    from facecore.settings import load_settings
    from services.indexing import find_photos

    subset = fold_subset(args.data, args.folds, args.out / "data")
    photos = find_photos(subset / "images")[::max(1, len(find_photos(subset / "images")) // args.drift_photos)]
    pipe = build_pipeline(load_settings(threads=args.threads), parse_variant("fp32"), args.out / "models", args.threads)
    seen: dict[str, list] = {n: [] for n in NETS}
    for n in ("pnet", "rnet", "onet"):
        setattr(pipe.detector, n, Recorder(getattr(pipe.detector, n), seen[n]))
    real_predict = pipe.embedder.predict
    pipe.embedder.predict = lambda b: (seen["sface"].extend(np.array(b[i:i + 1]) for i in range(len(b))),
                                       real_predict(b))[1]
    for i in range(0, len(photos), 32):
        pipe.process([(p, subset / "images" / p) for p in photos[i:i + 32]])
    pipe.close()
    rng = np.random.default_rng(1)
    report = {"photos": len(photos)}
    for net in NETS:
        xs = [seen[net][i] for i in sorted(rng.choice(len(seen[net]), min(200, len(seen[net])), replace=False))]
        graph = onnx_graph(net, sface_pool_layer() if net == "sface" else None)
        emu = ort.InferenceSession(fp16_emulated(graph), providers=["CPUExecutionProvider"])
        runners = {p: OVNet(ov_model(net, p, args.out / "models"), p, args.threads).predict for p in PRECISIONS}
        runners["fp16-emulated"] = lambda x, s=emu: s.run(None, {s.get_inputs()[0].name: x})
        ref = [runners["fp32"](x) for x in xs]
        row = {"samples": len(xs)}
        for p, fn in runners.items():
            if p == "fp32":
                continue
            got = [fn(x) for x in xs]
            if net == "sface":
                a = np.concatenate([r[0].reshape(1, -1) for r in ref])
                b = np.concatenate([g[0].reshape(1, -1) for g in got])
                cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                row[p] = {"cosine_min": float(cos.min()), "cosine_median": float(np.median(cos))}
            else:
                # prob is the last output; O-Net landmarks (fractions of the crop) the second
                dp = np.concatenate([np.abs(g[-1][:, 1] - r[-1][:, 1]).ravel() for g, r in zip(got, ref)])
                ones = np.concatenate([(g[-1][:, 1] >= 1.0).ravel() for g in got])
                row[p] = {"face_prob_absdiff_median": float(np.median(dp)), "face_prob_absdiff_max": float(dp.max()),
                          "face_prob_exactly_1": float(ones.mean())}
                if net == "onet":
                    dl = np.concatenate([np.abs(g[1] - r[1]).ravel() for g, r in zip(got, ref)]) * 48
                    row[p].update({"landmark_px48_median": float(np.median(dl)), "landmark_px48_max": float(dl.max())})
        report[net] = row
        print(net, json.dumps(row), flush=True)
    (args.out / "drift.json").write_text(json.dumps(report, indent=1))


def machine(args) -> None:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    flags = open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n")[0].split()
    keep = [f for f in flags if f.startswith(("avx512", "amx", "avx_vnni"))]
    print(json.dumps({"model": model, "nproc": os.cpu_count(), "flags": keep}))


def main() -> None:
    from score import DEFAULT_DATA

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "run", "speed", "compare", "tables", "drift", "machine"])
    ap.add_argument("variants", nargs="*", help="run: variants, e.g. fp32 pnet=int8 rnet=bf16,sface=bf16")
    ap.add_argument("--name", help="run: the run's name (one variant only)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "quant")
    ap.add_argument("--folds", type=lambda s: s if s == "all" else [int(k) for k in s.split(",")], default=[1, 2],
                    help="View-2 folds to evaluate on (comma-separated), or 'all': every LFW-dev photo and pair")
    ap.add_argument("--reference", default="fp32", help="compare: the run every other is compared with")
    ap.add_argument("--models", type=Path, help="run: folder of the int8 models (default OUT/models)")
    ap.add_argument("--threads", type=int, default=1, help="prepare/run: threads per model")
    ap.add_argument("--threads-list", type=lambda s: [int(k) for k in s.split(",")], default=[1, 2],
                    help="speed: thread counts")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--tag", default="")
    ap.add_argument("--calib-photos", type=int, default=300)
    ap.add_argument("--calib-samples", type=int, default=300)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--drift-photos", type=int, default=100)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    {"prepare": prepare, "run": run, "speed": speed, "compare": compare, "tables": tables, "drift": drift,
     "machine": machine}[args.step](args)


if __name__ == "__main__":
    main()
