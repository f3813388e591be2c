"""Index job: a folder (or a list of uploaded objects) -> photo and face rows for one user.

Photos are read and hashed first, so bytes already indexed for this user are skipped
before any model runs; each photo is then stored in its own transaction, which makes
a re-run after a crash or a kill pick up exactly where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Callable, Iterable, Sequence

from sqlalchemy.orm import Session, sessionmaker

from facecore.decode import PhotoError, read_bytes
from facecore.pipeline import FacePipeline, batched
from facecore.types import PhotoResult

from .store import repository as repo

log = logging.getLogger(__name__)

PHOTO_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif"}


@dataclass
class IndexSummary:
    seen: int = 0
    indexed: int = 0
    skipped_existing: int = 0
    failed: int = 0
    faces: int = 0
    blurry_faces: int = 0
    trash_faces: int = 0  # detections the trash model says are not faces
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)

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
    """items: (uri, local path). Stores every photo, indexed or failed; returns what happened."""
    s = pipeline.settings
    summary = IndexSummary()
    t0 = time.perf_counter()
    with sessions() as session:
        user_id = repo.get_or_create_user(session, user_name).id
        session.commit()
    with ThreadPoolExecutor(max_workers=pipeline.threads) as pool:
        for chunk in batched(items, s.batch_size):
            datas = list(pool.map(lambda it: _read(it[1], s.max_bytes), chunk))
            todo: list[tuple[str, bytes]] = []
            results: list[PhotoResult] = []
            with sessions() as session:
                for (uri, _), data in zip(chunk, datas):
                    summary.seen += 1
                    if isinstance(data, PhotoError):
                        results.append(PhotoResult(key=uri, error=data.reason))
                        continue
                    existing = repo.find_photo(session, user_id, sha256(data).hexdigest())
                    if existing is not None and existing.status == "indexed":
                        summary.skipped_existing += 1
                        continue
                    todo.append((uri, data))
            results.extend(pipeline.process(todo))
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
            if progress:
                progress(len(chunk))
    summary.seconds = time.perf_counter() - t0
    summary.stage_seconds = dict(pipeline.timer.seconds)
    return summary


def folder_items(root: Path, names: Iterable[str] | None = None) -> list[tuple[str, Path]]:
    names = find_photos(root) if names is None else names
    return [(n, root / n) for n in names]
