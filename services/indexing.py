"""Index job: a folder (or a list of uploaded objects) -> photo and face rows for one user.

Photos are read and hashed first, so bytes already indexed for this user are skipped
before any model runs; each photo is then stored in its own transaction, which makes
a re-run after a crash or a kill pick up exactly where it stopped. A photo indexed
before by another embedder is not skipped but re-embedded in place: its faces, and the
person links on them, stay; their embeddings, trash verdicts and attributes are made
again by the current embedder, so clustering sees the whole library in one version.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from facecore.decode import PhotoError, read_bytes
from facecore.pipeline import FacePipeline, batched
from facecore.types import PhotoResult

from .persons import service as person_service
from .store import repository as repo

log = logging.getLogger(__name__)

PHOTO_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif"}


@dataclass
class IndexSummary:
    seen: int = 0
    indexed: int = 0
    skipped_existing: int = 0
    reembedded: int = 0  # photos indexed before by another embedder, their faces embedded again
    failed: int = 0
    faces: int = 0
    blurry_faces: int = 0
    trash_faces: int = 0  # detections the trash model says are not faces
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    found: dict[str, str] = field(default_factory=dict)  # sha256 -> uri of every file read, first uri of a copy

    def reasons(self) -> Counter:
        return Counter(r for _, r in self.failures)


def find_photos(root: Path) -> list[str]:
    """Photo files under root as sorted '/'-separated relative paths; hidden files are left out."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in PHOTO_EXTENSIONS:
                out.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(out)


def _read(path: Path, max_bytes: int) -> bytes | PhotoError:
    try:
        return read_bytes(path, max_bytes)
    except PhotoError as e:
        return e


def index_items(pipeline: FacePipeline, sessions: sessionmaker[Session], user_name: str,
                items: Sequence[tuple[str, Path]], *, progress: Callable[[int], None] | None = None
                ) -> IndexSummary:
    """items: (uri, local path). Stores every photo, indexed or failed; returns what happened.

    ``settings.batches_in_flight`` batches go through the models at once while this
    thread reads the next batch and stores finished ones, in order: the models'
    Python glue (pyramids, crops, NMS) then overlaps another batch's inference.
    """
    s = pipeline.settings
    summary = IndexSummary()
    t0 = time.perf_counter()
    with sessions() as session:
        user_id = repo.get_or_create_user(session, user_name).id
        session.commit()

    def prepare(chunk: list[tuple[str, Path]], pool: ThreadPoolExecutor
                ) -> tuple[list[PhotoResult], list[tuple[str, bytes]], list[tuple[str, bytes, list]]]:
        """Read a batch; failed reads become results, bytes already indexed are skipped unless
        another embedder made their faces (then they are returned with those faces)."""
        t = time.perf_counter()
        datas = list(pool.map(lambda it: _read(it[1], s.max_bytes), chunk))
        digests = [None if isinstance(d, PhotoError) else sha256(d).hexdigest() for d in datas]
        with sessions() as session:
            indexed = repo.indexed_photo_ids(session, user_id, [d for d in digests if d])
            other_model = (repo.faces_of_other_models(session, user_id, indexed.values(), pipeline.model_version)
                           if indexed else {})  # a batch of new photos, the common case: no query
        todo: list[tuple[str, bytes]] = []
        stale: list[tuple[str, bytes, list]] = []
        results: list[PhotoResult] = []
        for (uri, _), data, digest in zip(chunk, datas, digests):
            summary.seen += 1
            if digest:
                summary.found.setdefault(digest, uri)
            if isinstance(data, PhotoError):
                results.append(PhotoResult(key=uri, error=data.reason))
            elif digest in indexed and indexed[digest] in other_model:
                stale.append((uri, data, other_model.pop(indexed[digest])))
            elif digest in indexed:
                summary.skipped_existing += 1
            else:
                todo.append((uri, data))
        own["read"] += time.perf_counter() - t
        return results, todo, stale

    def reembed(stale: list[tuple[str, bytes, list]]) -> None:
        done = pipeline.reembed([(uri, data, np.stack([lm for _, lm in faces])) for uri, data, faces in stale])
        t = time.perf_counter()  # the models' stages are the pipeline's to time
        stored = store_reembedded(sessions, user_id, [[face_id for face_id, _ in faces] for _, _, faces in stale], done)
        for r, ok in zip(done, stored):
            if ok is None:  # the same bytes decoded before; keep what is stored
                log.warning("could not re-embed %s: %s", r.key, r.error)
        summary.reembedded += sum(ok is True for ok in stored)
        own["store"] += time.perf_counter() - t

    def store(results: list[PhotoResult], size: int) -> None:
        t = time.perf_counter()
        with sessions() as session:
            for r in results:
                repo.save_photo_result(session, user_id, r.key, r)
                session.commit()  # one transaction per photo
                if r.ok:
                    summary.indexed += 1
                    summary.faces += len(r.faces)
                    summary.blurry_faces += sum(f.blurry for f in r.faces)
                    summary.trash_faces += sum(f.is_trash for f in r.faces)
                else:
                    summary.failed += 1
                    summary.failures.append((r.key, r.error or "unknown"))
                    log.warning("photo failed: %s: %s", r.key, r.error)
        own["store"] += time.perf_counter() - t
        if progress:
            progress(size)

    own = {"read": 0.0, "store": 0.0}  # this thread's stages; the models' run alongside
    in_flight = max(1, s.batches_in_flight)
    pending: deque[tuple[list[PhotoResult], Future, int]] = deque()
    with ThreadPoolExecutor(max_workers=pipeline.threads) as pool, \
            ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="models") as models:
        for chunk in batched(items, s.batch_size):
            results, todo, stale = prepare(chunk, pool)
            if stale:
                reembed(stale)
            pending.append((results, models.submit(pipeline.process, todo), len(chunk)))
            if len(pending) > in_flight:
                results, done, size = pending.popleft()
                store(results + done.result(), size)
        while pending:
            results, done, size = pending.popleft()
            store(results + done.result(), size)
    summary.seconds = time.perf_counter() - t0
    summary.stage_seconds = {**own, **pipeline.timer.seconds}
    return summary


def store_reembedded(sessions: sessionmaker[Session], user_id: int, face_ids: Sequence[Sequence[int]],
                     results: Sequence[PhotoResult]) -> list[bool | None]:
    """Rewrite the faces of each re-embedded photo (``FacePipeline.reembed``), one transaction per
    photo as for new ones. Per photo: True if stored, False if its faces were deleted meanwhile,
    None if the pipeline failed on it (its result says why; what is stored stays)."""
    out: list[bool | None] = []
    with sessions() as session:
        for ids, r in zip(face_ids, results, strict=True):
            if not r.ok:
                out.append(None)
            elif repo.update_face_vectors(session, user_id, ids, r.faces):
                session.commit()
                out.append(True)
            else:
                out.append(False)
    return out


@dataclass
class SyncSummary:
    deleted: int = 0  # photos whose files are gone: deleted with their faces and embeddings
    moved: int = 0  # photos whose bytes are now under another path: their uri follows
    deleted_faces: list[int] = field(default_factory=list)  # ids of the deleted photos' faces (for caches)


def sync_with_folder(sessions: sessionmaker[Session], user_name: str, listed: Iterable[str],
                     found: dict[str, str]) -> SyncSummary:
    """Make the user's photos follow a folder that holds the whole library: a photo whose path is
    no longer ``listed`` and whose bytes were not ``found`` (sha256 -> uri, from ``index_items``)
    under another path is deleted, faces and embeddings with it; one whose bytes moved takes the
    new path. Run it after indexing that folder, never with a subfolder."""
    listed = set(listed)
    summary = SyncSummary()
    with sessions() as session:
        user = repo.find_user(session, user_name)
        if user is None:
            return summary
        for photo_id, uri, digest in repo.photo_keys(session, user.id):
            if uri in listed:
                continue
            if digest in found:
                repo.move_photo(session, user.id, photo_id, found[digest])
                summary.moved += 1
            else:
                summary.deleted_faces += person_service.delete_photo(session, user.id, photo_id)
                summary.deleted += 1
        session.commit()
    return summary


def folder_items(root: Path, names: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    names = find_photos(root) if names is None else names
    return [(n, root / n) for n in names]
