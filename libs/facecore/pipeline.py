"""Photos in, face records out: decode -> detect -> align -> blur -> embed.

Work is batched across photos: one detector call per batch of photos and one
embedder call over the faces of the whole batch. Each photo fails on its own; a
bad photo never takes its batch down with it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from . import decode as dec
from .align import align_faces
from .attributes import EMBEDDING, AttributeHead, head_for, head_source, vector_version
from .detect import MTCNN
from .embed import POOLED, Embedder
from .models import choose_backend, resolve
from .quality import DEFAULT_BLUR_THRESHOLD, blur_scores
from .settings import Settings
from .trash import TrashModel
from .types import FaceRecord, PhotoResult

log = logging.getLogger(__name__)


@dataclass
class StageTimer:
    """Time per stage, for the run summary and benchmarks.

    With several batches in flight the stages of different batches overlap, so the
    stage times add up to more than the wall time.
    """

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        with self.lock:
            self.seconds[stage] += now - t0
        return now


class FacePipeline:
    """Decode, detect, align, filter and embed; ``process`` may run from several threads at once."""

    def __init__(self, settings: Settings | None = None, *, detector: MTCNN | None = None,
                 embedder: Embedder | None = None):
        self.settings = s = settings or Settings()
        threads = s.threads or os.cpu_count() or 1
        self.threads = threads
        backend = choose_backend(s.backend, s.providers)
        self.detector = detector or MTCNN(min_face_size=s.min_face_size, thresholds=tuple(s.det_thresholds),
                                          scale_factor=s.scale_factor, providers=s.providers, threads=threads,
                                          backend=backend, landmark_tta=s.landmark_tta,
                                          min_face_fraction=s.min_face_fraction)
        # the attribute head trained on this model decides what the embedder also hands out;
        # a model without one need not have any known layer at all
        head = head_for(embedder.base_version if embedder else resolve(s.embedder)[1])
        reads = head_source(head)[0] if head else None
        pool = reads[len(POOLED):] if reads and reads.startswith(POOLED) else None
        self.embedder = embedder or Embedder(s.embedder, providers=s.providers, threads=threads,
                                             flip_tta=s.flip_tta, backend=backend, pool_layer=pool,
                                             head=s.embedding_head or None, precision=s.precision)
        self.attributes = None  # no head for this embedder: faces simply get no attributes
        if head is None:
            log.info("no face attributes: no shipped head was trained on %s", self.embedder.base_version)
        elif reads == EMBEDDING:
            self.attributes = AttributeHead.for_vectors(self.embedder.version, name_or_path=head)
        elif self.embedder.feature_name == reads:
            self.attributes = AttributeHead.for_vectors(vector_version(self.embedder.base_version, reads),
                                                        name_or_path=head)
        else:
            log.info("no face attributes: the head reads %s, which this embedder does not give", reads)
        self.blur_threshold = s.blur_threshold or DEFAULT_BLUR_THRESHOLD
        self.trash = TrashModel.for_embedder(self.embedder.version, threshold=s.trash_threshold)
        self.timer = StageTimer()
        self._pool = ThreadPoolExecutor(max_workers=threads)

    @property
    def model_version(self) -> str:
        return self.embedder.version

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _load(self, source: str | os.PathLike | bytes) -> dec.DecodedPhoto | dec.PhotoError:
        s = self.settings
        try:
            if isinstance(source, bytes):
                if len(source) > s.max_bytes:
                    raise dec.PhotoError(f"file too large ({len(source)} bytes > limit {s.max_bytes})")
                return dec.decode(source, max_pixels=s.max_pixels, max_side=s.max_side)
            return dec.load(source, max_bytes=s.max_bytes, max_pixels=s.max_pixels, max_side=s.max_side)
        except dec.PhotoError as e:
            return e
        except MemoryError:
            return dec.PhotoError("out of memory while decoding")

    def process(self, items: Sequence[tuple[str, str | os.PathLike | bytes]]) -> list[PhotoResult]:
        """items: (key, path or raw bytes) pairs -> one PhotoResult per item, same order."""
        t = time.perf_counter()
        results, good = self._decode(items)
        t = self.timer.add("decode", t)
        if not good:
            return results
        dets = self.detector.detect([d.rgb for _, d in good])
        t = self.timer.add("detect", t)
        crops, owners = [], []
        for (r, d), det in zip(good, dets):
            self._add_faces(r, d, det.landmarks, det.boxes, det.scores, crops, owners)
        t = self.timer.add("align+blur", t)
        self._embed(owners, crops)
        self.timer.add("embed", t)
        return results

    def reembed(self, items: Sequence[tuple[str, str | os.PathLike | bytes, np.ndarray]]) -> list[PhotoResult]:
        """items: (key, path or bytes, (n, 5, 2) landmarks of its stored faces, full-size pixels)
        -> one PhotoResult per item whose faces, in the given order, carry this pipeline's
        embeddings, trash verdicts and attributes.

        For a change of embedder: the faces stay the ones found before (detection does not
        depend on the embedder), so whatever points at them, a user's person links above
        all, stays valid; only what the embedder decides is made again. Boxes and detection
        scores are not (NaN here): the stored ones stand.
        """
        t = time.perf_counter()
        results, good = self._decode([(key, src) for key, src, _ in items])
        t = self.timer.add("decode", t)
        marks = {key: np.asarray(lm, np.float32).reshape(-1, 5, 2) for key, _, lm in items}
        crops, owners = [], []
        for r, d in good:
            lm = marks[r.key] / d.scale
            nan = np.full(len(lm), np.nan, np.float32)
            self._add_faces(r, d, lm, np.full((len(lm), 4), np.nan, np.float32), nan, crops, owners)
        t = self.timer.add("align+blur", t)
        self._embed(owners, crops)
        self.timer.add("embed", t)
        return results

    def _decode(self, items: Sequence[tuple[str, str | os.PathLike | bytes]]
                ) -> tuple[list[PhotoResult], list[tuple[PhotoResult, dec.DecodedPhoto]]]:
        """One result per item (failures with their reason), and the decoded ones with theirs."""
        decoded = list(self._pool.map(self._load, [src for _, src in items]))
        results: list[PhotoResult] = []
        good: list[tuple[PhotoResult, dec.DecodedPhoto]] = []
        for (key, _), d in zip(items, decoded):
            if isinstance(d, dec.PhotoError):
                results.append(PhotoResult(key=key, error=d.reason))
            else:
                r = PhotoResult(key=key, sha256=d.sha256, width=d.width, height=d.height)
                results.append(r)
                good.append((r, d))
        return results, good

    def _add_faces(self, r: PhotoResult, d: dec.DecodedPhoto, landmarks: np.ndarray, boxes: np.ndarray,
                   scores: np.ndarray, crops: list[np.ndarray], owners: list[FaceRecord]) -> None:
        """Faces of one photo (landmarks and boxes in ``d.rgb`` pixels) aligned, blur-scored and
        added to ``r``; the sharp ones' crops join ``crops``/``owners`` for the embedder."""
        if not len(landmarks):
            return
        c = align_faces(d.rgb, landmarks)
        blur = blur_scores(c)
        for i in range(len(landmarks)):
            face = FaceRecord(index=i, box=boxes[i] * d.scale, landmarks=landmarks[i] * d.scale,
                              det_score=float(scores[i]), blur=float(blur[i]),
                              blurry=bool(blur[i] < self.blur_threshold), trash_score=None, is_trash=False,
                              embedding=None, model_version=self.embedder.version)
            r.faces.append(face)
            if not face.blurry:
                crops.append(c[i])
                owners.append(face)

    def _embed(self, owners: list[FaceRecord], crops: list[np.ndarray]) -> None:
        """Embeddings, trash verdicts and attributes of aligned sharp crops, set on their faces."""
        if not crops:
            return
        emb, feats = self.embedder.embed_with_features(np.stack(crops))
        for face, e in zip(owners, emb):
            face.embedding = e
        if self.trash is not None:
            for face, score, trash in zip(owners, *self.trash.classify(emb)):
                face.trash_score, face.is_trash = float(score), bool(trash)
        if self.attributes is not None:
            vectors = emb if self.attributes.input == EMBEDDING else feats
            for face, a in zip(owners, self.attributes.predict_attributes(vectors)):
                face.attributes.update(a)


def batched(items: Iterable, n: int) -> Iterable[list]:
    chunk: list = []
    for it in items:
        chunk.append(it)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
