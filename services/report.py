"""A static HTML page per run: every person album with face thumbnails, and what failed."""

from __future__ import annotations

import html
import logging
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageOps
from sqlalchemy.orm import Session, sessionmaker

from .store import repository as repo

log = logging.getLogger(__name__)

THUMB = 96
MAX_FACES_PER_PERSON = 36


def face_thumbnail(src: Path, box: tuple[float, float, float, float], dst: Path) -> bool:
    try:
        with Image.open(src) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            x1, y1, x2, y2 = box
            m = 0.25 * max(x2 - x1, y2 - y1)
            crop = im.crop((int(x1 - m), int(y1 - m), int(x2 + m), int(y2 + m)))
            crop.thumbnail((THUMB, THUMB))
            crop.save(dst, quality=85)
        return True
    except (OSError, ValueError) as e:
        log.debug("no thumbnail for %s: %s", src, e)
        return False


def write_report(sessions: sessionmaker[Session], user_name: str, root: Path, out_dir: Path,
                 index_summary=None, cluster_summary=None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    thumbs = out_dir / "faces"
    thumbs.mkdir(exist_ok=True)
    with sessions() as session:
        user = repo.get_or_create_user(session, user_name)
        rows = list(repo.export_rows(session, user.id))
        trash = list(repo.export_rows(session, user.id, trash=True))
        failed = repo.failed_photos(session, user.id)
    by_person: dict[str, list[dict]] = defaultdict(list)
    hidden = set()
    for r in rows:
        if r["person_hidden"]:
            hidden.add(r["person"])
        else:
            by_person[r["person"] or ""].append(r)
    persons = sorted((p for p in by_person if p), key=lambda p: -len(by_person[p]))
    parts = [f"<h1>facecluster: {html.escape(user_name)}</h1>"]
    stats = [f"{len(rows)} faces", f"{len(persons)} persons" + (f" ({len(hidden)} more hidden)" if hidden else ""),
             f"{sum(1 for r in rows if r.get('blurry'))} blurry faces left out",
             f"{len(trash)} detections rejected as not faces"]
    if index_summary is not None:
        reembedded = f"{index_summary.reembedded} re-embedded, " if index_summary.reembedded else ""
        stats.insert(0, f"{index_summary.indexed} photos indexed, {index_summary.skipped_existing} already known, "
                        f"{reembedded}{index_summary.failed} failed in {index_summary.seconds:.1f}s")
    parts.append("<p>" + " · ".join(html.escape(s) for s in stats) + "</p>")

    def face_imgs(faces: list[dict]) -> str:
        cells = []
        for r in faces[:MAX_FACES_PER_PERSON]:
            name = f"{r['face_id']}.jpg"
            box = (r["x1"], r["y1"], r["x2"], r["y2"])
            ok = (thumbs / name).exists() or face_thumbnail(root / r["photo"], box, thumbs / name)
            title = html.escape(f"face {r['face_id']}: {r['photo']} (score {r['score']:.2f}, blur {r['blur']:.1f})")
            cells.append(f'<img src="faces/{name}" title="{title}" alt="">' if ok else "")
        more = f"<span class=more>+{len(faces) - MAX_FACES_PER_PERSON} more</span>" if len(
            faces) > MAX_FACES_PER_PERSON else ""
        return "".join(cells) + more

    singles = [p for p in persons if len(by_person[p]) == 1]
    for p in persons:
        faces = by_person[p]
        if len(faces) == 1:
            continue
        label = html.escape(faces[0]["person_name"] or f"Person {p}")
        parts.append(f"<section><h2>{label} <small>{len(faces)} faces · person {p}</small></h2>"
                     f"<div class=faces>{face_imgs(faces)}</div></section>")
    if singles:
        parts.append(f"<section><h2>Seen once <small>{len(singles)} persons with one face each</small></h2>"
                     f"<div class=faces>{face_imgs([by_person[p][0] for p in singles])}</div></section>")
    if by_person.get(""):
        parts.append(f"<section><h2>Not in any album <small>{len(by_person[''])} faces (blurry or unassigned)"
                     f"</small></h2><div class=faces>{face_imgs(by_person[''])}</div></section>")
    if trash:
        parts.append(f"<section><h2>Not faces <small>{len(trash)} detections the trash model rejected "
                     f"(kept out of albums and export)</small></h2><div class=faces>{face_imgs(trash)}</div></section>")
    if failed:
        items = "".join(f"<li><code>{html.escape(u)}</code>: {html.escape(e or '')}</li>" for u, e in failed)
        parts.append(f"<section><h2>Photos that failed <small>{len(failed)}</small></h2><ul>{items}</ul></section>")
    page = out_dir / "index.html"
    page.write_text(
        "<!doctype html><meta charset=utf-8><title>facecluster report</title><style>"
        "body{font-family:sans-serif;margin:2em;background:#fafafa}section{margin:1.5em 0}"
        "h2 small{color:#888;font-weight:normal}.faces img{width:%dpx;height:%dpx;object-fit:cover;margin:2px;"
        "border-radius:6px}.more{color:#888;margin-left:.5em}</style>%s" % (THUMB, THUMB, "\n".join(parts)))
    return page
