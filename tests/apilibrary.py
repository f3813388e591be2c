"""A small synthetic photo library for API tests: real JPEG files on disk and rows made through
the same repository and rules layer the pipeline's results go through.

Each person has a base direction in embedding space and each face is that direction plus a
little noise, so merge suggestions and "least sure" faces have a known right answer. (Model
output is not needed to test the API: these rows have the shape the pipeline stores.)
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sqlalchemy.orm import Session

from facecore.types import FaceRecord, PhotoResult
from services.persons import service as person_service
from services.store import repository as repo

MODEL = "sface-2021dec"
DIM = 128
SIZE = (320, 240)
BOX = (100.0, 60.0, 220.0, 180.0)


@dataclass
class Library:
    user_id: int
    photo_ids: list[int] = field(default_factory=list)
    face_ids: list[int] = field(default_factory=list)
    truth: dict[int, int] = field(default_factory=dict)  # face id -> true person index
    person_of: dict[int, int] = field(default_factory=dict)  # true person index -> person id


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", SIZE, tuple(int(v) for v in rng.integers(40, 200, 3)))
    draw = ImageDraw.Draw(img)
    draw.ellipse(BOX, fill=tuple(int(v) for v in rng.integers(120, 255, 3)))
    draw.ellipse((130, 95, 145, 110), fill=(20, 20, 20))
    draw.ellipse((175, 95, 190, 110), fill=(20, 20, 20))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=80)
    return out.getvalue()


def seed_library(session: Session, user_name: str, root: Path, *, persons: int = 4, faces_per_person: int = 3,
                 seed: int = 0) -> Library:
    """Write ``persons * faces_per_person`` one-face photos under ``root`` and store them for
    ``user_name``, clustered into their true persons; commits."""
    rng = np.random.default_rng(seed)
    bases = rng.standard_normal((persons, DIM)).astype(np.float32)
    user = repo.get_or_create_user(session, user_name)
    repo.set_library_root(session, user.id, str(root.resolve()))
    lib = Library(user.id)
    root.mkdir(parents=True, exist_ok=True)
    for p in range(persons):
        for k in range(faces_per_person):
            name = f"{user_name}/p{p}_{k}.jpg"
            data = _jpeg(seed * 100_000 + p * 1000 + k)
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
            v = bases[p] + 0.35 * rng.standard_normal(DIM).astype(np.float32)
            face = FaceRecord(index=0, box=np.array(BOX, np.float32), landmarks=np.zeros((5, 2), np.float32),
                              det_score=0.99 - 0.01 * k, blur=0.8, blurry=False, trash_score=0.1, is_trash=False,
                              embedding=v / np.linalg.norm(v), model_version=MODEL, attributes={})
            result = PhotoResult(key=name, sha256=hashlib.sha256(data).hexdigest(), width=SIZE[0], height=SIZE[1],
                                 faces=[face])
            saved = repo.save_photo_result(session, user.id, name, result)
            lib.photo_ids.append(saved.id)
            lib.face_ids.append(saved.face_ids[0])
            lib.truth[saved.face_ids[0]] = p
    labels = person_service.apply_clustering(session, user.id, lib.truth)
    lib.person_of = dict(labels)
    session.commit()
    return lib
