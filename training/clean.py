"""Dataset cleaning run: find what is wrong in a folder-per-identity face dataset.

Training data for an embedder is a tree ``ROOT/<identity>/<photo>``, and such trees are
noisy: photos filed under the wrong person, the same photo twice, photos without a
usable face. Every photo is detected and embedded once with facecore's pipeline (cached
by sha256, so a second run only embeds what changed), then:

- **near-duplicates**: the same bytes, or a face almost identical to another face
  (cosine >= ``dup_similarity``) in a photo that also looks the same as a whole (the
  difference hash of the downscaled photo within ``dup_hamming`` bits). The copy with
  the most pixels is kept; resized or re-encoded copies are flagged.
- **identity consensus** per folder: average-linkage clusters of all faces in the folder;
  the cluster that spans the most photos (at least two, and strictly more than any
  other) is who the folder is. A photo whose best face is far from the centroid of the
  *other* photos of that cluster is an **outlier**; if it is close to another folder's
  identity it **belongs to another identity**, which is also how a folder of two photos
  of two people is resolved. A folder with no consensus at all is **mixed**: its photos
  that nobody else claims are flagged, unless only one is left.
- **no face**: nothing detected, or the photo could not be decoded.

Output: ``manifest.csv`` (kept photos, their identity face box), ``flags.csv`` (one row per
flagged photo, with the reason and the evidence) and ``report.html`` with thumbnails.

    python -m training.clean ROOT --out DIR
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from facecore.cluster import average_linkage
from facecore.embed import embedder_version, l2_normalize
from facecore.pipeline import FacePipeline, batched
from facecore.settings import Settings
from services.indexing import find_photos

log = logging.getLogger(__name__)

# Flag names, in the order one photo's flags are reported (the first applies).
NO_FACE, DUPLICATE, OTHER_IDENTITY, MIXED, OUTLIER = "no_face", "duplicate", "other_identity", "mixed", "outlier"
REASONS = {
    NO_FACE: "no usable face (none detected, or the photo could not be read)",
    DUPLICATE: "near-duplicate of a photo that is kept",
    OTHER_IDENTITY: "the face matches another identity better than its own",
    MIXED: "the folder has no consensus identity; this photo matches no other photo",
    OUTLIER: "the face does not match the rest of its folder",
}


@dataclass
class CleanConfig:
    """Thresholds on SFace cosine similarity; defaults from LFW-dev (benchmarks/clean_lfw.py)."""

    member_similarity: float = 0.35  # best face vs the centroid of the folder's other consensus photos
    # A face this close to another identity is claimed by it. High, because it is the best
    # of thousands of comparisons: at 0.4 some stranger claims a quarter of lone photos.
    other_similarity: float = 0.60
    cluster_distance: float = 0.60  # average-linkage cut inside a folder (cosine distance)
    dup_similarity: float = 0.90
    # of the 64 bits of the difference hash: resized or re-encoded copies differ in at most
    # 4, other frames of the same scene (a burst, a press event) in 5 and more
    dup_hamming: int = 6


@dataclass
class Photo:
    rel: str  # path under ROOT with '/' separators
    identity: str
    sha256: str = ""
    size: int = 0  # bytes
    width: int = 0
    height: int = 0
    dhash: int = 0
    error: str | None = None
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


@dataclass
class Flag:
    kind: str
    detail: str = ""
    other: str = ""  # the identity claiming the photo, or the kept duplicate
    similarity: float = float("nan")


# --------------------------------------------------------------------------- embedding


def scan(root: Path) -> list[Photo]:
    """Every photo inside an identity folder (the first path component), sorted; loose
    files at the top have no identity and are left out."""
    return [Photo(rel=rel, identity=rel.split("/")[0]) for rel in find_photos(root) if "/" in rel]


def difference_hash(path: Path) -> int:
    """64-bit dHash of the photo: brightness steps between neighbours of a 9x8 grey thumbnail.

    Survives re-encoding and resizing, changes with a different shot of the same scene.
    """
    with Image.open(path) as im:
        im.draft("L", (64, 64))
        g = np.asarray(ImageOps.exif_transpose(im).convert("L").resize((9, 8), Image.LANCZOS), np.int16)
    bits = (g[:, 1:] > g[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def embed_tree(root: Path, photos: list[Photo], cache: Path, settings: Settings) -> None:
    """Fill in faces and hashes of ``photos``, reusing ``cache`` (an npz keyed by sha256,
    valid for one embedder version: vectors of another model are never mixed in)."""
    version = embedder_version(settings.embedder, settings.flip_tta, settings.embedding_head)
    known: dict[str, dict] = {}
    z: dict[str, np.ndarray] = {}
    if cache.exists():
        with np.load(cache, allow_pickle=False) as f:
            z = {k: f[k] for k in f.files}  # an NpzFile re-reads an array on every access
        if str(z.get("model_version", "")) != version:
            log.info("cache %s holds embeddings of %s, not %s: embedding again", cache, z.get("model_version"), version)
            z = {}
    if z:
        start = np.concatenate([[0], np.cumsum(z["n_faces"])])
        for i, sha in enumerate(z["sha256"]):
            a, b = start[i], start[i + 1]
            known[str(sha)] = {"width": int(z["width"][i]), "height": int(z["height"][i]), "dhash": int(z["dhash"][i]),
                               "error": str(z["error"][i]) or None, "boxes": z["boxes"][a:b],
                               "embeddings": z["embeddings"][a:b]}
    for p in photos:
        data = (root / p.rel).read_bytes()
        p.sha256, p.size = hashlib.sha256(data).hexdigest(), len(data)
    todo = [p for p in photos if p.sha256 not in known]
    log.info("%d photos, %d already embedded, %d to embed", len(photos), len(photos) - len(todo), len(todo))
    if todo:
        pipe = FacePipeline(settings)
        try:
            with tqdm(total=len(todo), unit="photo", desc="embed") as bar:
                for chunk in batched(todo, settings.batch_size):
                    for p, r in zip(chunk, pipe.process([(p.rel, root / p.rel) for p in chunk])):
                        entry = {"width": r.width, "height": r.height, "dhash": 0, "error": r.error,
                                 "boxes": np.zeros((0, 4), np.float32), "embeddings": np.zeros((0, 128), np.float32)}
                        faces = [f for f in r.faces if f.embedding is not None]
                        if r.ok:
                            entry["dhash"] = difference_hash(root / p.rel)
                            if faces:
                                entry["boxes"] = np.stack([f.box[:4] for f in faces]).astype(np.float32)
                                entry["embeddings"] = np.stack([f.embedding for f in faces]).astype(np.float32)
                        known[p.sha256] = entry
                    bar.update(len(chunk))
        finally:
            pipe.close()
        _save_cache(cache, known, version)
    for p in photos:
        e = known[p.sha256]
        p.width, p.height, p.dhash, p.error = e["width"], e["height"], e["dhash"], e["error"]
        p.boxes, p.embeddings = e["boxes"], e["embeddings"]


def _save_cache(cache: Path, known: dict[str, dict], version: str) -> None:
    shas = sorted(known)
    dim = max((known[s]["embeddings"].shape[1] for s in shas if len(known[s]["embeddings"])), default=128)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, model_version=np.array(version), sha256=np.array(shas), width=np.array([known[s]["width"] for s in shas], np.int64),
             height=np.array([known[s]["height"] for s in shas], np.int64),
             dhash=np.array([known[s]["dhash"] for s in shas], np.uint64),
             error=np.array([known[s]["error"] or "" for s in shas]),
             n_faces=np.array([len(known[s]["boxes"]) for s in shas], np.int64),
             boxes=np.concatenate([known[s]["boxes"].reshape(-1, 4) for s in shas] + [np.zeros((0, 4))]).astype(
                 np.float32),
             embeddings=np.concatenate([known[s]["embeddings"].reshape(-1, dim) for s in shas]
                                       + [np.zeros((0, dim))]).astype(np.float32))


# --------------------------------------------------------------------------- analysis


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def find_duplicates(photos: list[Photo], cfg: CleanConfig) -> dict[int, tuple[int, float]]:
    """Photo index -> (index of the kept copy, face similarity) for every copy that is not kept.

    Candidates come from a kNN search over all faces, so the work grows with the number
    of faces, not its square; photos without faces only match on identical bytes.
    """
    parent = list(range(len(photos)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best: dict[tuple[int, int], float] = {}
    by_sha: dict[str, int] = {}
    for i, p in enumerate(photos):
        if p.sha256 in by_sha:
            best[(by_sha[p.sha256], i)] = 1.0
        else:
            by_sha[p.sha256] = i
    owner = np.concatenate([np.full(len(p.embeddings), i) for i, p in enumerate(photos)] + [np.zeros(0, int)])
    if len(owner) > 1:
        x = np.ascontiguousarray(np.concatenate([p.embeddings for p in photos if len(p.embeddings)]))
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        sims, idx = index.search(x, min(8, len(x)))
        for a, (row_s, row_i) in enumerate(zip(sims, idx)):
            for s, b in zip(row_s, row_i):
                i, j = sorted((int(owner[a]), int(owner[b])))
                if b < 0 or i == j or s < cfg.dup_similarity:
                    continue
                if hamming(photos[i].dhash, photos[j].dhash) <= cfg.dup_hamming:
                    best[(i, j)] = max(best.get((i, j), 0.0), float(s))
    for i, j in best:
        parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in {k for pair in best for k in pair}:
        groups[find(i)].append(i)
    out = {}
    for members in groups.values():
        keep = min(members, key=lambda k: (-photos[k].width * photos[k].height, -photos[k].size, photos[k].rel))
        for k in members:
            if k != keep:
                out[k] = (keep, best.get(tuple(sorted((k, keep))), float("nan")))
    return out


@dataclass
class Consensus:
    """Who a folder is: the photos of its main cluster and their centroid (None without one)."""

    members: dict[int, int]  # photo index -> index of its face in the main cluster
    total: np.ndarray | None  # sum of those faces' embeddings

    @property
    def centroid(self) -> np.ndarray | None:
        return None if self.total is None else l2_normalize(self.total)

    def without(self, photos: list[Photo], i: int) -> np.ndarray:
        """The centroid of the other members: a photo is not judged against itself."""
        if i not in self.members or len(self.members) == 1:
            return self.centroid
        return l2_normalize(self.total - photos[i].embeddings[self.members[i]])


def folder_consensus(photos: list[Photo], idx: list[int], cfg: CleanConfig) -> Consensus:
    faces = [(i, k) for i in idx for k in range(len(photos[i].embeddings))]
    if not faces:
        return Consensus({}, None)
    x = np.stack([photos[i].embeddings[k] for i, k in faces])
    labels = average_linkage(x, cfg.cluster_distance)
    spans = {lab: {i for (i, _), lb in zip(faces, labels) if lb == lab} for lab in np.unique(labels)}
    ranked = sorted(spans.items(), key=lambda kv: -len(kv[1]))
    if len(ranked[0][1]) < 2 or (len(ranked) > 1 and len(ranked[1][1]) == len(ranked[0][1])):
        return Consensus({}, None)
    main = ranked[0][0]
    members: dict[int, int] = {}
    for (i, k), lab in zip(faces, labels):
        if lab == main and i not in members:
            members[i] = k
    return Consensus(members, np.sum([photos[i].embeddings[k] for i, k in members.items()], axis=0))


def subject(p: Photo) -> int:
    """Index of the face the photo is most likely about, when nothing else says who it is:
    of the faces at least half as large as the largest, the one nearest the centre."""
    b = p.boxes
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    centre = np.stack([(b[:, 0] + b[:, 2]) / 2 - p.width / 2, (b[:, 1] + b[:, 3]) / 2 - p.height / 2], axis=1)
    off = np.where(area >= area.max() / 2, (centre**2).sum(1), np.inf)
    return int(np.argmin(off))


def _references(photos: list[Photo], folders: dict[str, list[int]], consensus: dict[str, Consensus]):
    """One vector per identity that can claim photos: its consensus centroid, or for a
    folder of a single photo that photo's largest face."""
    names, vecs = [], []
    for name, idx in folders.items():
        c = consensus[name]
        if c.centroid is not None:
            names.append(name)
            vecs.append(c.centroid)
        elif len(idx) == 1:
            names.append(name)
            vecs.append(photos[idx[0]].embeddings[subject(photos[idx[0]])])
    return names, (np.stack(vecs).astype(np.float32) if vecs else np.zeros((0, 128), np.float32))


def check_identities(photos: list[Photo], skip: set[int], cfg: CleanConfig) -> tuple[dict[int, Flag], dict[int, int]]:
    """Identity flags per photo index, and the identity face chosen for each kept photo."""
    folders: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(photos):
        if i not in skip and len(p.embeddings):
            folders[p.identity].append(i)
    consensus = {name: folder_consensus(photos, idx, cfg) for name, idx in folders.items()}
    ref_names, refs = _references(photos, folders, consensus)
    index = faiss.IndexFlatIP(refs.shape[1])
    index.add(refs)

    def claimed(i: int, subject_only: bool = False) -> tuple[str, float]:
        """The best other identity for a face of photo i (any, or just its subject), with its similarity."""
        if not ref_names:
            return "", -1.0
        e = photos[i].embeddings
        if subject_only:
            e = e[subject(photos[i])][None]
        sims, ids = index.search(np.ascontiguousarray(e), min(3, len(ref_names)))
        best = ("", -1.0)
        for row_s, row_i in zip(sims, ids):
            for s, j in zip(row_s, row_i):
                if j >= 0 and ref_names[j] != photos[i].identity and s > best[1]:
                    best = (ref_names[j], float(s))
        return best

    flags: dict[int, Flag] = {}
    face_of: dict[int, int] = {}
    for name, idx in folders.items():
        c = consensus[name]
        if c.centroid is None:
            unclaimed = []
            for i in idx:
                # no consensus says which face is the identity, so a bystander must not count
                other, s = claimed(i, subject_only=True)
                if s >= cfg.other_similarity:
                    flags[i] = Flag(OTHER_IDENTITY, f"matches {other}", other, s)
                else:
                    unclaimed.append(i)
            if len(unclaimed) == 1:
                face_of[unclaimed[0]] = subject(photos[unclaimed[0]])
            else:
                for i in unclaimed:
                    flags[i] = Flag(MIXED, f"{len(idx)} photos, no two of the same person")
            continue
        for i in idx:
            sims = photos[i].embeddings @ c.without(photos, i)
            k = int(np.argmax(sims))
            if sims[k] >= cfg.member_similarity:
                face_of[i] = k
                continue
            other, s = claimed(i)
            if s >= cfg.other_similarity and s > sims[k]:
                flags[i] = Flag(OTHER_IDENTITY, f"matches {other} ({s:.2f}) better than {name} ({sims[k]:.2f})",
                                other, s)
            else:
                flags[i] = Flag(OUTLIER, f"best face {sims[k]:.2f} to the rest of {name}", "", float(sims[k]))
    return flags, face_of


@dataclass
class CleanResult:
    photos: list[Photo]
    flags: dict[int, Flag]
    face_of: dict[int, int]  # kept photo index -> identity face index
    seconds: float

    def counts(self) -> dict[str, int]:
        c = Counter(f.kind for f in self.flags.values())
        return {"photos": len(self.photos), "kept": len(self.photos) - len(self.flags),
                **{k: c.get(k, 0) for k in REASONS}}


def clean(root: Path, out: Path, cfg: CleanConfig | None = None, settings: Settings | None = None,
          cache: Path | None = None) -> CleanResult:
    """The whole run: embed (cached, by default in ``out``), flag, write manifest, flags and report into ``out``."""
    cfg = cfg or CleanConfig()
    t0 = time.perf_counter()
    # every face gets an embedding: a blurry photo is still evidence of who the folder is
    settings = settings or Settings(blur_threshold=1e-9)
    photos = scan(root)
    embed_tree(root, photos, cache or out / "faces-cache.npz", settings)
    result = analyse(photos, cfg)
    result.seconds = time.perf_counter() - t0
    write_outputs(root, out, result, cfg)
    return result


def analyse(photos: list[Photo], cfg: CleanConfig) -> CleanResult:
    """Flags for embedded photos; pure given the embeddings, so thresholds can be swept."""
    flags: dict[int, Flag] = {}
    for i, p in enumerate(photos):
        if p.error or not len(p.embeddings):
            flags[i] = Flag(NO_FACE, p.error or "no face detected")
    for i, (keep, s) in find_duplicates(photos, cfg).items():
        flags.setdefault(i, Flag(DUPLICATE, f"copy of {photos[keep].rel}", photos[keep].rel, s))
    identity_flags, face_of = check_identities(photos, set(flags), cfg)
    for i, f in identity_flags.items():
        flags.setdefault(i, f)
    return CleanResult(photos, flags, face_of, 0.0)


# --------------------------------------------------------------------------- outputs


def write_outputs(root: Path, out: Path, result: CleanResult, cfg: CleanConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    photos = result.photos
    with open(out / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["photo", "identity", "x1", "y1", "x2", "y2"])
        for i, p in enumerate(photos):
            if i not in result.flags:
                w.writerow([p.rel, p.identity, *(f"{v:.1f}" for v in p.boxes[result.face_of.get(i, 0)])])
    with open(out / "flags.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["photo", "identity", "flag", "other", "similarity", "detail"])
        for i in sorted(result.flags):
            fl = result.flags[i]
            w.writerow([photos[i].rel, photos[i].identity, fl.kind, fl.other,
                        "" if np.isnan(fl.similarity) else f"{fl.similarity:.3f}", fl.detail])
    summary = {**result.counts(), "seconds": round(result.seconds, 1), "config": cfg.__dict__}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(root, out, result, summary)


def write_report(root: Path, out: Path, result: CleanResult, summary: dict, per_kind: int = 200) -> Path:
    """report.html: the counts, then every flag kind with thumbnails; a duplicate is shown
    next to the copy that is kept, a photo claimed by another identity next to a kept
    photo of that identity, so the reader can judge the evidence at a glance."""
    from services.report import THUMB, face_thumbnail

    thumbs = out / "thumbs"
    thumbs.mkdir(exist_ok=True)
    photos = result.photos

    index_of = {p.rel: i for i, p in enumerate(photos)}
    kept_of: dict[str, int] = {}  # identity -> a kept photo of it
    for i, p in enumerate(photos):
        if i not in result.flags:
            kept_of.setdefault(p.identity, i)

    def thumb(i: int) -> str | None:
        p = photos[i]
        name = f"{hashlib.sha1(p.rel.encode()).hexdigest()[:16]}.jpg"
        if len(p.boxes):
            b = tuple(float(v) for v in p.boxes[result.face_of.get(i, 0)])
        else:
            b = (0.0, 0.0, float(p.width), float(p.height))
        ok = (thumbs / name).exists() or face_thumbnail(root / p.rel, b, thumbs / name)
        return f"thumbs/{name}" if ok else None

    def img(i: int, flag: Flag) -> str:
        src = thumb(i)
        if src is None:
            return ""
        title = html.escape(f"{photos[i].rel}: {flag.detail}")
        evidence = index_of.get(flag.other) if flag.kind == DUPLICATE else kept_of.get(flag.other)
        other = thumb(evidence) if evidence is not None else None
        pair = f'<img class=evidence src="{other}" title="{html.escape(photos[evidence].rel)}" alt="">' \
            if other else ""
        return f'<figure><img src="{src}" title="{title}" alt="">{pair}' \
               f"<figcaption>{html.escape(photos[i].rel)}</figcaption></figure>"

    parts = ["<h1>Dataset cleaning report</h1>",
             "<p>" + " · ".join(f"{v} {html.escape(k.replace('_', ' '))}" for k, v in summary.items()
                                if isinstance(v, int)) + f" · {summary['seconds']} s</p>",
             "<p>Files: <a href=manifest.csv>manifest.csv</a> (kept photos) · <a href=flags.csv>flags.csv</a></p>",
             "<p class=more>Framed thumbnails are the evidence: the copy that is kept, or a kept photo of the "
             "identity that claims the face.</p>"]
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, f in sorted(result.flags.items()):
        by_kind[f.kind].append(i)
    for kind, why in REASONS.items():
        idx = by_kind.get(kind, [])
        if not idx:
            continue
        cells = "".join(img(i, result.flags[i]) for i in idx[:per_kind])
        more = f"<p class=more>+{len(idx) - per_kind} more in flags.csv</p>" if len(idx) > per_kind else ""
        parts.append(f"<section><h2>{html.escape(kind.replace('_', ' '))} <small>{len(idx)} photos: "
                     f"{html.escape(why)}</small></h2><div class=faces>{cells}</div>{more}</section>")
    page = out / "report.html"
    page.write_text(
        "<!doctype html><meta charset=utf-8><title>cleaning report</title><style>"
        "body{font-family:sans-serif;margin:2em;background:#fafafa}h2 small{color:#888;font-weight:normal}"
        "figure{display:inline-block;margin:3px;vertical-align:top;max-width:%dpx}figure img{width:%dpx;"
        "height:%dpx;object-fit:cover;border-radius:6px}figure img.evidence{opacity:.85;margin-left:2px;"
        "outline:2px solid #9bc}figcaption{font-size:10px;color:#666;overflow-wrap:anywhere}"
        ".more{color:#888}</style>%s" % (2 * THUMB + 4, THUMB, THUMB, "\n".join(parts)))
    return page


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m training.clean", description=__doc__.split("\n\n")[0],
                                 epilog="Similarities are SFace cosines; the defaults were chosen on a corrupted "
                                 "LFW-dev (benchmarks/clean_lfw.py, docs/BENCHMARKS.md).")
    ap.add_argument("root", type=Path, help="folder-per-identity tree: ROOT/<identity>/<photo>")
    ap.add_argument("--out", type=Path, required=True, help="where manifest.csv, flags.csv, report.html go")
    d = CleanConfig()
    ap.add_argument("--member-similarity", type=float, default=d.member_similarity,
                    help="a photo below this to the rest of its folder is an outlier (default %(default)s)")
    ap.add_argument("--other-similarity", type=float, default=d.other_similarity,
                    help="a face this close to another identity is claimed by it (default %(default)s)")
    ap.add_argument("--cluster-distance", type=float, default=d.cluster_distance,
                    help="average-linkage cut inside a folder, cosine distance (default %(default)s)")
    ap.add_argument("--dup-similarity", type=float, default=d.dup_similarity,
                    help="faces at least this similar may be copies (default %(default)s)")
    ap.add_argument("--dup-hamming", type=int, default=d.dup_hamming,
                    help="...if the whole photos differ in at most this many of 64 hash bits (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="0 = all cores")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.root.is_dir():
        ap.error(f"{args.root} is not a folder")
    cfg = CleanConfig(args.member_similarity, args.other_similarity, args.cluster_distance, args.dup_similarity,
                      args.dup_hamming)
    r = clean(args.root, args.out, cfg, Settings(blur_threshold=1e-9, threads=args.threads))
    log.info("done in %.1fs: %s; report %s", r.seconds, json.dumps(r.counts()), args.out / "report.html")


if __name__ == "__main__":
    main()
