"""Person albums from `facecluster run`: a person is in a photo once."""

from __future__ import annotations

import sqlalchemy as sa
from PIL import Image

from badinput import lfw_dev
from services.cli import main
from services.store.models import Face, FacePerson, Photo


def test_one_person_is_in_a_photo_once(tmp_path):
    """A photo showing one face twice (a mirror, a poster behind its subject) gives two persons,
    the face that fits the person's other photos staying with them."""
    folder = tmp_path / "photos"
    folder.mkdir()
    person = sorted((lfw_dev() / "images" / "Colin_Powell").iterdir())[:4]
    for f in person[1:]:
        Image.open(f).save(folder / f.name)
    with Image.open(person[0]) as im:
        twice = Image.new("RGB", (2 * im.width, im.height))
        twice.paste(im, (0, 0))
        twice.paste(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (im.width, 0))  # the mirror
        twice.save(folder / "mirror.jpg", quality=95)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["run", str(folder), "--db", url, "--report", str(tmp_path / "report"), "--threads", "2"]) == 0
    engine = sa.create_engine(url)
    with engine.connect() as c:
        links = c.execute(sa.select(Photo.uri, FacePerson.person_id)
                          .join(Face, Face.photo_id == Photo.id).join(FacePerson, FacePerson.face_id == Face.id)).all()
    engine.dispose()
    in_mirror = [p for uri, p in links if uri == "mirror.jpg"]
    others = {p for uri, p in links if uri != "mirror.jpg"}
    assert len(in_mirror) >= 2 and len(set(in_mirror)) == len(in_mirror)  # never one person twice
    assert len(others) == 1 and others & set(in_mirror)  # one of the two is filed with the others
