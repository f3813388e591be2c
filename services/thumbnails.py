"""Face thumbnails: cut from the stored photo, kept in a disk cache, and removed with the photo.

The cache is keyed by user and face, and each file's name carries the ETag (a digest of the
photo's bytes key, the box and the size), so a stale entry is never served and an HTTP client
can revalidate without the server reading the photo again.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageOps

from .publish import object_key

MARGIN = 0.25  # of the box's longer side, around the face


class PhotoUnavailable(LookupError):
    """The photo's bytes are in neither the object store nor the library folder."""


def etag(sha256: str, box: tuple[float, float, float, float], size: int) -> str:
    key = f"{sha256}:{','.join(f'{v:.1f}' for v in box)}:{size}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def photo_path(object_store: Path, library_root: str | None, uri: str, sha256: str) -> Path:
    """Where the photo's bytes are: the object store (cloud, by sha256) or the library folder."""
    stored = object_store / object_key(sha256)
    if stored.is_file():
        return stored
    if library_root:
        root = Path(library_root).resolve()
        path = (root / uri).resolve()
        if path.is_relative_to(root) and path.is_file():
            return path
    raise PhotoUnavailable(f"the file of photo {uri!r} is in neither the object store nor the library folder")


def crop_jpeg(path: Path, box: tuple[float, float, float, float], size: int) -> bytes:
    """The face and a margin around it, upright, at most ``size`` px square, as JPEG."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            x1, y1, x2, y2 = box
            m = MARGIN * max(x2 - x1, y2 - y1)
            crop = im.crop((int(x1 - m), int(y1 - m), int(x2 + m), int(y2 + m)))
            crop.thumbnail((size, size))
            out = io.BytesIO()
            crop.save(out, "JPEG", quality=85)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise PhotoUnavailable(f"the photo could not be read: {e}") from e


class ThumbnailCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def _path(self, user_id: int, face_id: int, size: int, tag: str) -> Path:
        return self.root / str(int(user_id)) / f"{int(face_id)}-{int(size)}-{tag}.jpg"

    def get(self, user_id: int, face_id: int, size: int, tag: str) -> bytes | None:
        try:
            return self._path(user_id, face_id, size, tag).read_bytes()
        except OSError:
            return None

    def put(self, user_id: int, face_id: int, size: int, tag: str, data: bytes) -> None:
        """Written under a temporary name and renamed, so a reader never sees half a file."""
        path = self._path(user_id, face_id, size, tag)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            pass  # a cache that cannot be written costs time, not correctness

    def forget_faces(self, user_id: int, face_ids: Iterable[int]) -> int:
        """Delete every cached size of these faces; returns the files removed."""
        folder = self.root / str(int(user_id))
        removed = 0
        for face_id in face_ids:
            for path in folder.glob(f"{int(face_id)}-*.jpg"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def forget_user(self, user_id: int) -> None:
        shutil.rmtree(self.root / str(int(user_id)), ignore_errors=True)
