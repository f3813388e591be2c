"""Every endpoint of the person-album API as a client meets it: HTTP against a live server
(uvicorn) on SQLite and on the real PostgreSQL.

Starting a server costs seconds, so one serves each backend for the whole module, and every
test seeds two fresh users of its own (ann: 4 persons x 3 faces, bob: 3 x 2) into that server's
database; everything the API does is scoped to the caller, so tests cannot see each other.
"""

from __future__ import annotations

import base64
import io
import json
import math
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from PIL import Image

from apilibrary import BOX, SIZE, Library, seed_library
from apiserver import LiveApi, start_api, stop_api
from services import tokens
from services.persons import service as person_service
from services.store.db import make_engine, migrate, session_factory
from services.store.models import (ApiToken, Face, FacePerson, FaceRejection, Person, PersonEdit, Photo,
                                   User)
from testdb import scratch_pg_database

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.cloud)]
PERSON_KEYS = {"id", "name", "hidden", "favorite", "confirmed", "face_count", "cover_face_id", "created_at"}
FACE_KEYS = {"id", "photo_id", "person_id", "box", "det_score", "blur", "blurry", "trash"}
MISSING = 10**12  # an id nobody has


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", params=BACKENDS)
def live(request, tmp_path_factory):
    """A live API on a migrated database of its own, for the whole module."""
    tmp = tmp_path_factory.mktemp(f"api-{request.param}")
    env = {"FACECLUSTER_OBJECT_STORE": str(tmp / "objects")}  # photos are read from the library folder only
    if request.param == "sqlite":
        path = tmp / "api.db"
        path.write_bytes(request.getfixturevalue("sqlite_template").read_bytes())
        url = f"sqlite:///{path}"
        proc, api = start_api(url, tmp, env=env)
        try:
            yield api
        finally:
            stop_api(proc)
        return
    with scratch_pg_database(request.getfixturevalue("pg_url")) as url:
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()
        proc, api = start_api(url, tmp, env=env)
        try:
            yield api
        finally:
            stop_api(proc)


@pytest.fixture(scope="module")
def db(live) -> Iterator[sa.Engine]:
    engine = make_engine(live.db_url)
    yield engine
    engine.dispose()


@dataclass
class World:
    api: LiveApi
    db: sa.Engine
    ann: Library
    bob: Library
    ann_name: str
    bob_name: str
    ann_token: str
    bob_token: str
    a: httpx.Client  # ann's client
    b: httpx.Client  # bob's client
    root: Path  # the library folder

    @property
    def P(self) -> list[int]:
        """ann's person ids by true person."""
        return [self.ann.person_of[p] for p in range(4)]

    @property
    def F(self) -> list[list[int]]:
        """ann's face ids by true person, in seeding order (the first is each person's cover)."""
        return [[f for f in self.ann.face_ids if self.ann.truth[f] == p] for p in range(4)]

    def photo_of(self, face_id: int) -> int:
        lib = self.ann if face_id in self.ann.truth else self.bob
        return lib.photo_ids[lib.face_ids.index(face_id)]


@pytest.fixture
def w(live, db) -> Iterator[World]:
    tag = uuid.uuid4().hex[:8]
    ann_name, bob_name = f"ann-{tag}", f"bob-{tag}"
    root = live.cache.parent / "photos"
    with session_factory(db)() as session:
        ann = seed_library(session, ann_name, root, persons=4, faces_per_person=3, seed=1)
        bob = seed_library(session, bob_name, root, persons=3, faces_per_person=2, seed=2)
        _, ann_token = tokens.create(session, ann_name)
        _, bob_token = tokens.create(session, bob_name)
        session.commit()
    with live.client(ann_token) as a, live.client(bob_token) as b:
        yield World(live, db, ann, bob, ann_name, bob_name, ann_token, bob_token, a, b, root)


# ------------------------------------------------------------------------------ helpers


def ok(r: httpx.Response, status: int = 200):
    assert r.status_code == status, f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text[:800]}"
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    return r


def problem(r: httpx.Response, status: int, *words: str):
    """The error answer: exactly ``{"detail": ...}`` with ``words`` in it."""
    assert r.status_code == status, \
        f"{r.request.method} {r.request.url} -> {r.status_code}, not {status}: {r.text[:800]}"
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"detail"} and body["detail"], body
    text = json.dumps(body["detail"]).lower()
    for word in words:
        assert word.lower() in text, f"{word!r} not in {body['detail']!r}"
    return body["detail"]


def person(c: httpx.Client, person_id: int) -> dict:
    return ok(c.get(f"/api/v1/people/{person_id}"))


def face(c: httpx.Client, face_id: int) -> dict:
    return ok(c.get(f"/api/v1/faces/{face_id}"))


def people(c: httpx.Client, **params) -> list[dict]:
    page = ok(c.get("/api/v1/people", params={"limit": 500, **params}))
    assert page["next_cursor"] is None
    return page["items"]


def ids(items: list[dict]) -> list[int]:
    return [item["id"] for item in items]


def walk(c: httpx.Client, path: str, **params) -> tuple[list[dict], int]:
    """Every item of a paginated list, following next_cursor; (items, pages)."""
    items, cursor, pages = [], None, 0
    while True:
        page = ok(c.get(path, params={**params, **({"cursor": cursor} if cursor else {})}))
        assert set(page) == {"items", "next_cursor"}
        items += page["items"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages
        assert page["items"], "a page with a next_cursor must not be empty"
        assert pages < 1000


def cursor_of(key) -> str:
    """A cursor made by hand the way a client could forge one (base64 of JSON)."""
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def face_ids_of(c: httpx.Client, person_id: int) -> list[int]:
    return ids(ok(c.get(f"/api/v1/people/{person_id}/faces", params={"limit": 500}))["items"])


def db_state(engine: sa.Engine, user_id: int) -> dict:
    """What an edit changes and its undo must put back exactly: person rows, links, rejections."""
    with engine.connect() as c:
        persons = [dict(r._mapping) for r in c.execute(
            sa.select(Person.id, Person.name, Person.hidden, Person.favorite, Person.user_confirmed,
                      Person.cover_face_id, Person.face_count, Person.created_at)
            .where(Person.user_id == user_id).order_by(Person.id))]
        links = [tuple(r) for r in c.execute(
            sa.select(FacePerson.face_id, FacePerson.person_id, FacePerson.source)
            .join(Face, Face.id == FacePerson.face_id).where(Face.user_id == user_id).order_by(FacePerson.face_id))]
        rejections = [tuple(r) for r in c.execute(
            sa.select(FaceRejection.face_id, FaceRejection.person_id)
            .where(FaceRejection.user_id == user_id).order_by(FaceRejection.face_id, FaceRejection.person_id))]
    return {"persons": persons, "links": links, "rejections": rejections}


def jpeg_size(data: bytes) -> tuple[int, int]:
    assert data[:3] == b"\xff\xd8\xff", data[:16]
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG"
        return im.size


# ------------------------------------------------------------------------------ probes and auth


def test_probes_need_no_token(live, db):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        assert ok(c.get("/healthz")) == {"status": "ok"}
        with db.connect() as conn:
            head = conn.scalar(sa.text("SELECT version_num FROM alembic_version"))
        assert ok(c.get("/readyz")) == {"status": "ready", "schema": head}
        doc = ok(c.get("/openapi.json"))
        assert "/api/v1/people" in doc["paths"]


def test_a_token_is_needed_and_checked(w):
    with httpx.Client(base_url=w.api.url, timeout=30) as c:
        r = c.get("/api/v1/me")
        problem(r, 401, "bearer", "token create")
        assert r.headers["www-authenticate"] == "Bearer"
        for header in ("Bearer nope", "Bearer", f"Basic {w.ann_token}", w.ann_token, "Bearer " + "x" * 500,
                       f"Bearer {w.ann_token}x", f"Bearer {w.ann_token[:-1]}"):
            problem(c.get("/api/v1/me", headers={"Authorization": header}), 401, "bearer")
        assert ok(c.get("/api/v1/me", headers={"Authorization": f"Bearer {w.ann_token}"}))["user"] == w.ann_name
        assert ok(c.get("/api/v1/me", headers={"Authorization": f"bearer {w.bob_token}"}))["user"] == w.bob_name


def test_me(w):
    me = ok(w.a.get("/api/v1/me"))
    assert me == {"user": w.ann_name, "photos": {"pending": 0, "indexed": 12, "failed": 0}, "faces": 12,
                  "embedded": 12, "blurry": 0, "trash": 0, "persons": 4, "named_persons": 0, "hidden_persons": 0,
                  "assigned_faces": 12}
    ok(w.a.patch(f"/api/v1/people/{w.P[0]}", json={"name": "Ann", "hidden": True}))
    ok(w.a.delete(f"/api/v1/people/{w.P[1]}/faces/{w.F[1][0]}"))
    me = ok(w.a.get("/api/v1/me"))
    assert (me["named_persons"], me["hidden_persons"], me["assigned_faces"]) == (1, 1, 11)
    assert ok(w.b.get("/api/v1/me"))["faces"] == 6


def test_openapi_documents_what_the_api_answers(live):
    """Every answer a client can get is in the document, so generated clients know it."""
    doc = httpx.get(live.url + "/openapi.json", timeout=30).json()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path.startswith("/api/v1/"):
                assert {"401", "422"} <= set(op["responses"]), (method, path)
                assert op.get("security"), f"{method} {path} does not say it needs a bearer token"
    for path in ("/api/v1/people", "/api/v1/people/{person_id}/faces", "/api/v1/people/{person_id}/photos"):
        assert "400" in doc["paths"][path]["get"]["responses"], f"GET {path} answers 400 to a bad cursor"
    bodies = [(m, p) for p, ops in doc["paths"].items() for m, op in ops.items() if "requestBody" in op]
    assert len(bodies) >= 4
    for method, path in bodies:  # a body that is not even text answers 400
        assert "400" in doc["paths"][path][method]["responses"], f"{method} {path} answers 400 to a body of bytes"


# ------------------------------------------------------------------------------ the people list


def test_people_filters_and_orders(w):
    P, F = w.P, w.F
    split = ok(w.a.post("/api/v1/people", json={"face_ids": [F[3][2]]}), 201)["id"]
    ok(w.a.patch(f"/api/v1/people/{P[0]}", json={"name": "zoe", "favorite": True}))
    ok(w.a.patch(f"/api/v1/people/{P[1]}", json={"name": "Adam", "hidden": True, "favorite": True}))
    ok(w.a.patch(f"/api/v1/people/{P[3]}", json={"name": "bea_50%"}))
    # faces: P0 3 zoe fav, P1 3 Adam hidden fav, P2 3 unnamed, P3 2 bea_50%, split 1 unnamed

    items = people(w.a)
    assert ids(items) == [P[0], P[2], P[3], split]  # most faces first, ties by id; hidden left out
    assert all(set(p) == PERSON_KEYS for p in items)
    assert [p["face_count"] for p in items] == [3, 3, 2, 1]
    assert ids(people(w.a, hidden="true")) == [P[1]]
    assert ids(people(w.a, hidden="all")) == [P[0], P[1], P[2], P[3], split]
    assert ids(people(w.a, hidden="all", min_faces=2)) == [P[0], P[1], P[2], P[3]]
    assert ids(people(w.a, hidden="all", min_faces=3)) == [P[0], P[1], P[2]]
    assert ids(people(w.a, hidden="all", min_faces=4)) == []
    assert ids(people(w.a, min_faces=0)) == [P[0], P[2], P[3], split]
    assert ids(people(w.a, hidden="all", q="ADAM")) == [P[1]]  # case-insensitive
    assert ids(people(w.a, q="adam")) == []  # Adam is hidden
    assert ids(people(w.a, hidden="all", q="a")) == [P[1], P[3]]
    assert ids(people(w.a, hidden="all", q="_")) == [P[3]]  # LIKE wildcards are literal
    assert ids(people(w.a, hidden="all", q="%")) == [P[3]]
    assert ids(people(w.a, hidden="all", q="0%")) == [P[3]]
    assert ids(people(w.a, hidden="all", q="zz")) == []
    assert ids(people(w.a, q="")) == [P[0], P[2], P[3], split]
    assert ids(people(w.a, hidden="all", order="name")) == [P[1], P[3], P[0], P[2], split]  # unnamed last, by id
    assert ids(people(w.a, order="name")) == [P[3], P[0], P[2], split]
    assert ids(people(w.a, hidden="all", order="newest")) == [split, P[3], P[2], P[1], P[0]]
    assert ids(people(w.a, favorite="true")) == [P[0]]
    assert ids(people(w.a, favorite="true", hidden="all")) == [P[0], P[1]]
    assert ids(people(w.a, favorite="false", hidden="all")) == [P[0], P[1], P[2], P[3], split]
    assert ids(people(w.b, hidden="all")) == [w.bob.person_of[p] for p in range(3)]  # only bob's

    for params in ({"order": "size"}, {"hidden": "maybe"}, {"limit": 0}, {"limit": 501}, {"min_faces": -1},
                   {"q": "a\x01"}, {"q": "x" * 256}, {"favorite": "maybe"}, {"limit": "ten"}):
        problem(w.a.get("/api/v1/people", params=params), 422)


def test_people_cursor_paging(w):
    P, F = w.P, w.F
    s1 = ok(w.a.post("/api/v1/people", json={"face_ids": [F[0][1]]}), 201)["id"]
    s2 = ok(w.a.post("/api/v1/people", json={"face_ids": [F[0][2]]}), 201)["id"]
    s3 = ok(w.a.post("/api/v1/people", json={"face_ids": [F[1][1], F[1][2]]}), 201)["id"]
    for pid, name in ((P[0], "same"), (s1, "same"), (s3, "alpha")):
        ok(w.a.patch(f"/api/v1/people/{pid}", json={"name": name}))
    ok(w.a.patch(f"/api/v1/people/{P[3]}", json={"hidden": True}))
    # faces: P2 3, P3 3 (hidden), s3 2 alpha, P0 1 same, P1 1, s1 1 same, s2 1
    expected = {
        ("faces", "all"): [P[2], P[3], s3, P[0], P[1], s1, s2],
        ("faces", "false"): [P[2], s3, P[0], P[1], s1, s2],
        ("name", "all"): [s3, P[0], s1, P[1], P[2], P[3], s2],
        ("name", "false"): [s3, P[0], s1, P[1], P[2], s2],
        ("newest", "all"): [s3, s2, s1, P[3], P[2], P[1], P[0]],
        ("newest", "false"): [s3, s2, s1, P[2], P[1], P[0]],
    }
    for (order, hidden), want in expected.items():
        assert ids(people(w.a, order=order, hidden=hidden)) == want, (order, hidden)
        for limit in (1, 2, 3, 7):
            items, pages = walk(w.a, "/api/v1/people", order=order, hidden=hidden, limit=limit)
            assert ids(items) == want, (order, hidden, limit)  # no duplicates, no gaps, same order
            assert pages == math.ceil(len(want) / limit), (order, hidden, limit)

    # a deep page: the 6th one-person page, reached by its cursor, again and again
    cursor = None
    for _ in range(5):
        cursor = ok(w.a.get("/api/v1/people", params={"order": "name", "hidden": "all", "limit": 1,
                                                       **({"cursor": cursor} if cursor else {})}))["next_cursor"]
    for _ in range(2):
        page = ok(w.a.get("/api/v1/people", params={"order": "name", "hidden": "all", "limit": 1, "cursor": cursor}))
        assert ids(page["items"]) == [P[3]]
    rest = ok(w.a.get("/api/v1/people", params={"order": "name", "hidden": "all", "limit": 5, "cursor": cursor}))
    assert ids(rest["items"]) == [P[3], s2] and rest["next_cursor"] is None

    bad = ["!!!", "bm90IGpzb24", cursor_of({"a": 1}), cursor_of([1]), cursor_of([True, 1]), cursor_of([2**64, 1]),
           cursor_of([1.5, 1]), cursor_of(["same", P[0]]), cursor_of([1, 2, 3]), cursor_of(None)]
    for cursor in bad:
        problem(w.a.get("/api/v1/people", params={"cursor": cursor}), 400, "cursor", "next_cursor")
    for cursor in (cursor_of([3, P[0]]), cursor_of(["a\x00b", 1]), cursor_of(["\ud800", 1]), cursor_of(["a\n", 1]),
                   cursor_of([None, "x"])):
        problem(w.a.get("/api/v1/people", params={"order": "name", "cursor": cursor}), 400, "cursor")
    problem(w.a.get("/api/v1/people", params={"order": "newest", "cursor": cursor_of([2**63])}), 400, "cursor")
    problem(w.a.get("/api/v1/people", params={"cursor": "x" * 513}), 422)


# ------------------------------------------------------------------------------ one person


def test_get_and_patch_person(w):
    P, F = w.P, w.F
    url = f"/api/v1/people/{P[0]}"
    p = person(w.a, P[0])
    assert set(p) == PERSON_KEYS
    assert (p["id"], p["name"], p["hidden"], p["favorite"], p["confirmed"], p["face_count"], p["cover_face_id"]) == \
        (P[0], None, False, False, False, 3, F[0][0])

    assert ok(w.a.patch(url, json={"name": "  Ann Smith  "}))["name"] == "Ann Smith"
    assert person(w.a, P[0])["name"] == "Ann Smith"
    assert ok(w.a.patch(url, json={"name": None}))["name"] is None
    ok(w.a.patch(url, json={"name": "Ann"}))
    assert ok(w.a.patch(url, json={"name": ""}))["name"] is None
    ok(w.a.patch(url, json={"name": "Ann"}))
    assert ok(w.a.patch(url, json={"name": "   "}))["name"] is None
    assert ok(w.a.patch(url, json={"name": "é" * 255}))["name"] == "é" * 255

    assert ok(w.a.patch(url, json={"hidden": True}))["hidden"] is True
    assert person(w.a, P[0])["hidden"] is True
    assert P[0] not in ids(people(w.a)) and P[0] in ids(people(w.a, hidden="true"))
    assert ok(w.a.patch(url, json={"hidden": False}))["hidden"] is False
    assert P[0] in ids(people(w.a))

    assert ok(w.a.patch(url, json={"favorite": True}))["favorite"] is True
    assert ids(people(w.a, favorite="true")) == [P[0]]
    assert ok(w.a.patch(url, json={"favorite": False}))["favorite"] is False

    assert ok(w.a.patch(url, json={"cover_face_id": F[0][2]}))["cover_face_id"] == F[0][2]
    assert person(w.a, P[0])["cover_face_id"] == F[0][2]
    problem(w.a.patch(url, json={"cover_face_id": F[1][0]}), 409, f"face {F[1][0]}", "not a face of person")
    problem(w.a.patch(url, json={"cover_face_id": w.bob.face_ids[0]}), 404, "face")
    problem(w.a.patch(url, json={"cover_face_id": MISSING}), 404, "face")
    assert person(w.a, P[0])["cover_face_id"] == F[0][2]

    both = ok(w.a.patch(url, json={"name": "Zed", "hidden": True, "favorite": True}))
    assert (both["name"], both["hidden"], both["favorite"]) == ("Zed", True, True)
    edits = ok(w.a.get("/api/v1/edits", params={"limit": 200}))
    assert edits[0]["kind"] == "update" and "Zed" in edits[0]["summary"] and "hidden" in edits[0]["summary"]
    assert ok(w.a.patch(url, json={})) == person(w.a, P[0])  # nothing to change: no edit either
    assert ok(w.a.patch(url, json={"name": "Zed"}))["name"] == "Zed"
    assert len(ok(w.a.get("/api/v1/edits", params={"limit": 200}))) == len(edits)

    for body in ({"nmae": "x"}, {"name": "x" * 256}, {"name": "a\nb"}, {"name": "a\x00"}, {"name": 12},
                 {"hidden": "maybe"}, {"cover_face_id": 0}, {"cover_face_id": "one"}, {"cover_face_id": 2**63}, []):
        problem(w.a.patch(url, json=body), 422)
    problem(w.a.patch(url, content=b"{not json", headers={"content-type": "application/json"}), 422)
    problem(w.a.patch(url, content=b"{\"name\": \"\xff\"}", headers={"content-type": "application/json"}), 400, "body")
    assert person(w.a, P[0])["name"] == "Zed"

    problem(w.a.get(f"/api/v1/people/{MISSING}"), 404, f"person {MISSING}")
    problem(w.a.patch(f"/api/v1/people/{MISSING}", json={"name": "x"}), 404, "person")
    for bad in ("0", "-1", str(2**63), "abc", "1.5"):
        problem(w.a.get(f"/api/v1/people/{bad}"), 422)


# ------------------------------------------------------------------------------ corrections


def test_merge(w):
    P, F = w.P, w.F
    ok(w.a.patch(f"/api/v1/people/{P[1]}", json={"name": "Bea"}))
    ok(w.a.patch(f"/api/v1/people/{P[2]}", json={"name": "Cy"}))
    out = ok(w.a.post(f"/api/v1/people/{P[0]}/merge", json={"person_ids": [P[1], P[2]]}))
    assert out["results"] == [{"person_id": P[1], "merged": True, "faces": 3},
                              {"person_id": P[2], "merged": True, "faces": 3}]
    assert out["person"]["id"] == P[0]
    assert out["person"]["name"] == "Bea"  # the unnamed target takes the first merged person's name
    assert out["person"]["face_count"] == 9 and out["person"]["confirmed"] is True
    assert out["person"] == person(w.a, P[0])
    for gone in (P[1], P[2]):
        problem(w.a.get(f"/api/v1/people/{gone}"), 404, f"person {gone}")
    assert sorted(face_ids_of(w.a, P[0])) == sorted(F[0] + F[1] + F[2])
    assert ids(people(w.a, hidden="all")) == [P[0], P[3]]
    assert all(face(w.a, f)["person_id"] == P[0] for f in F[1] + F[2])

    ok(w.a.patch(f"/api/v1/people/{P[3]}", json={"name": "Dee"}))
    out = ok(w.a.post(f"/api/v1/people/{P[3]}/merge", json={"person_ids": [P[0], P[0]]}))
    assert out["results"] == [{"person_id": P[0], "merged": True, "faces": 9}]
    assert (out["person"]["name"], out["person"]["face_count"]) == ("Dee", 12)  # a named target keeps its name

    split = ok(w.a.post("/api/v1/people", json={"face_ids": [F[0][0]]}), 201)["id"]
    before = people(w.a, hidden="all")
    problem(w.a.post(f"/api/v1/people/{P[3]}/merge", json={"person_ids": [P[3]]}), 409, "itself")
    problem(w.a.post(f"/api/v1/people/{P[3]}/merge", json={"person_ids": [split, P[3]]}), 409, "itself")
    problem(w.a.post(f"/api/v1/people/{P[3]}/merge", json={"person_ids": [split, MISSING]}), 404, f"person {MISSING}")
    problem(w.a.post(f"/api/v1/people/{P[3]}/merge", json={"person_ids": [w.bob.person_of[0]]}), 404, "person")
    problem(w.a.post(f"/api/v1/people/{MISSING}/merge", json={"person_ids": [split]}), 404, "person")
    for body in ({"person_ids": []}, {"person_ids": list(range(1, 102))}, {"person_ids": [0]}, {"ids": [split]}, {}):
        problem(w.a.post(f"/api/v1/people/{P[3]}/merge", json=body), 422)
    assert people(w.a, hidden="all") == before  # nothing changed


def test_move_faces(w):
    P, F = w.P, w.F
    out = ok(w.a.post(f"/api/v1/people/{P[1]}/faces", json={"face_ids": [F[0][0]]}))
    assert (out["id"], out["face_count"]) == (P[1], 4)
    assert face(w.a, F[0][0])["person_id"] == P[1]
    p0 = person(w.a, P[0])
    assert (p0["face_count"], p0["cover_face_id"]) == (2, F[0][1])  # the cover that left is replaced
    assert ok(w.a.post(f"/api/v1/people/{P[1]}/faces", json={"face_ids": [F[0][0], F[1][0]]}))["face_count"] == 4

    # a face the user said is not P2 can be put back into P2 by hand
    ok(w.a.delete(f"/api/v1/people/{P[2]}/faces/{F[2][0]}"))
    assert ok(w.a.post(f"/api/v1/people/{P[2]}/faces", json={"face_ids": [F[2][0]]}))["face_count"] == 3

    # an automatic person left without faces is gone; a named one stays, empty
    ok(w.a.post(f"/api/v1/people/{P[3]}/faces", json={"face_ids": F[2]}))
    problem(w.a.get(f"/api/v1/people/{P[2]}"), 404)
    ok(w.a.patch(f"/api/v1/people/{P[0]}", json={"name": "Ann"}))
    ok(w.a.post(f"/api/v1/people/{P[3]}/faces", json={"face_ids": F[0][1:]}))
    p0 = person(w.a, P[0])
    assert (p0["name"], p0["face_count"], p0["cover_face_id"]) == ("Ann", 0, None)
    assert person(w.a, P[3])["face_count"] == 8

    before = people(w.a, hidden="all")
    problem(w.a.post(f"/api/v1/people/{P[1]}/faces", json={"face_ids": [F[3][0], w.bob.face_ids[0]]}), 404, "face")
    problem(w.a.post(f"/api/v1/people/{P[1]}/faces", json={"face_ids": [F[3][0], MISSING]}), 404, f"face {MISSING}")
    problem(w.a.post(f"/api/v1/people/{MISSING}/faces", json={"face_ids": [F[3][0]]}), 404, "person")
    problem(w.a.post(f"/api/v1/people/{w.bob.person_of[0]}/faces", json={"face_ids": [F[3][0]]}), 404, "person")
    for body in ({"face_ids": []}, {"face_ids": list(range(1, 1002))}, {"face_ids": ["x"]}, {"face_ids": [0]},
                 {"face_ids": F[3][0]}, {"face_ids": [F[3][0]], "extra": 1}):
        problem(w.a.post(f"/api/v1/people/{P[1]}/faces", json=body), 422)
    assert people(w.a, hidden="all") == before
    assert face(w.a, F[3][0])["person_id"] == P[3]


def test_split(w):
    P, F = w.P, w.F
    r = w.a.post("/api/v1/people", json={"face_ids": [F[0][1], F[1][1]]})
    new = ok(r, 201)
    assert set(new) == PERSON_KEYS
    assert (new["name"], new["confirmed"], new["face_count"], new["hidden"]) == (None, True, 2, False)
    assert new["cover_face_id"] in (F[0][1], F[1][1])
    assert new["id"] not in P and new == person(w.a, new["id"])
    assert sorted(face_ids_of(w.a, new["id"])) == sorted([F[0][1], F[1][1]])
    assert [person(w.a, p)["face_count"] for p in P] == [2, 2, 3, 3]

    ok(w.a.delete(f"/api/v1/people/{P[2]}/faces/{F[2][0]}"))  # a face in no person can be split off too
    assert ok(w.a.post("/api/v1/people", json={"face_ids": [F[2][0]]}), 201)["face_count"] == 1

    before = people(w.a, hidden="all")
    problem(w.a.post("/api/v1/people", json={"face_ids": [F[3][0], w.bob.face_ids[0]]}), 404, "face")
    problem(w.a.post("/api/v1/people", json={"face_ids": [MISSING]}), 404, f"face {MISSING}")
    for body in ({"face_ids": []}, {"face_ids": list(range(1, 1002))}, {}, {"face_ids": [F[3][0]], "name": "x"}):
        problem(w.a.post("/api/v1/people", json=body), 422)
    assert people(w.a, hidden="all") == before


def test_not_this_person_survives_reclustering(w, db):
    P, F = w.P, w.F
    gone = F[0][1]
    out = ok(w.a.delete(f"/api/v1/people/{P[0]}/faces/{gone}"))
    assert (out["id"], out["face_count"]) == (P[0], 2)
    assert face(w.a, gone)["person_id"] is None
    assert face_ids_of(w.a, P[0]) == [F[0][0], F[0][2]]
    problem(w.a.delete(f"/api/v1/people/{P[0]}/faces/{gone}"), 404, f"face {gone}")  # not in it any more
    problem(w.a.delete(f"/api/v1/people/{P[0]}/faces/{F[1][0]}"), 404, f"face {F[1][0]}")  # another person's
    assert person(w.a, P[1])["face_count"] == 3

    def recluster(labels: dict[int, int]) -> dict[int, int]:
        with session_factory(db)() as session:
            out = person_service.apply_clustering(session, w.ann.user_id, labels)
            session.commit()
        return out

    # the clustering drops another face, then a re-clustering puts everything where it belongs
    recluster({**w.ann.truth, F[2][0]: -1})
    assert face(w.a, F[2][0])["person_id"] is None
    labels = recluster(dict(w.ann.truth))  # `gone` labelled into P0's cluster again
    assert labels == {p: P[p] for p in range(4)}  # person ids are stable
    assert face(w.a, gone)["person_id"] is None  # ... but it is not put back into P0
    assert face_ids_of(w.a, P[0]) == [F[0][0], F[0][2]]
    assert face(w.a, F[2][0])["person_id"] == P[2]  # while the other face is placed
    for p in (1, 2, 3):
        assert face_ids_of(w.a, P[p]) == F[p]

    # the rejection is about P0 only: clustered on its own, the face gets a person
    labels = recluster({**w.ann.truth, gone: 9})
    assert face(w.a, gone)["person_id"] == labels[9] not in P
    # and the user's hand may put it back into P0, which then holds
    ok(w.a.post(f"/api/v1/people/{P[0]}/faces", json={"face_ids": [gone]}))
    recluster(dict(w.ann.truth))
    assert face_ids_of(w.a, P[0]) == F[0]

    # the last face of an automatic person: it leaves and the person with it (undo brings both back)
    before = person(w.a, P[3])
    for f in F[3][:2]:
        ok(w.a.delete(f"/api/v1/people/{P[3]}/faces/{f}"))
    last = ok(w.a.delete(f"/api/v1/people/{P[3]}/faces/{F[3][2]}"))
    assert (last["id"], last["face_count"], last["cover_face_id"]) == (P[3], 0, None)
    problem(w.a.get(f"/api/v1/people/{P[3]}"), 404)
    assert ok(w.a.post("/api/v1/edits/undo"))["kind"] == "reject"
    assert person(w.a, P[3]) == {**before, "face_count": 1, "cover_face_id": F[3][2]}

    problem(w.a.delete(f"/api/v1/people/{P[1]}/faces/{w.bob.face_ids[0]}"), 404, "face")
    problem(w.a.delete(f"/api/v1/people/{MISSING}/faces/{F[1][0]}"), 404, "person")
    problem(w.a.delete(f"/api/v1/people/{P[1]}/faces/0"), 422)


# ------------------------------------------------------------------------------ a person's faces and photos


def test_person_faces_and_photos_pages(w):
    P, F = w.P, w.F
    ok(w.a.post(f"/api/v1/people/{P[0]}/merge", json={"person_ids": [P[1], P[2]]}))
    want_faces = sorted(F[0] + F[1] + F[2])
    want_photos = sorted(w.photo_of(f) for f in want_faces)
    for limit in (1, 2, 4, 9, 100):
        items, pages = walk(w.a, f"/api/v1/people/{P[0]}/faces", limit=limit)
        assert ids(items) == want_faces and pages == math.ceil(9 / limit)
        items, pages = walk(w.a, f"/api/v1/people/{P[0]}/photos", limit=limit)
        assert ids(items) == want_photos and pages == math.ceil(9 / limit)
    faces = ok(w.a.get(f"/api/v1/people/{P[0]}/faces"))["items"]
    assert all(set(f) == FACE_KEYS and f["person_id"] == P[0] and f["photo_id"] == w.photo_of(f["id"])
               for f in faces)
    photos = ok(w.a.get(f"/api/v1/people/{P[0]}/photos"))["items"]
    assert all(set(p) == {"id", "uri", "status", "width", "height", "created_at"} for p in photos)
    assert {p["uri"] for p in photos} == {f"{w.ann_name}/p{t}_{k}.jpg" for t in range(3) for k in range(3)}

    ok(w.a.patch(f"/api/v1/people/{P[3]}", json={"name": "Dee"}))
    ok(w.a.post("/api/v1/people", json={"face_ids": F[3]}), 201)
    for what in ("faces", "photos"):
        assert ok(w.a.get(f"/api/v1/people/{P[3]}/{what}")) == {"items": [], "next_cursor": None}
        problem(w.a.get(f"/api/v1/people/{P[0]}/{what}", params={"cursor": "!!"}), 400, "cursor")
        problem(w.a.get(f"/api/v1/people/{P[0]}/{what}", params={"cursor": cursor_of(["x"])}), 400, "cursor")
        problem(w.a.get(f"/api/v1/people/{P[0]}/{what}", params={"cursor": cursor_of([1, 2])}), 400, "cursor")
        for limit in (0, 501):
            problem(w.a.get(f"/api/v1/people/{P[0]}/{what}", params={"limit": limit}), 422)
        problem(w.a.get(f"/api/v1/people/{MISSING}/{what}"), 404, "person")
        problem(w.a.get(f"/api/v1/people/{w.bob.person_of[0]}/{what}"), 404, "person")


# ------------------------------------------------------------------------------ questions to ask


def test_suggestions_rank_the_split_off_part_first(w):
    P, F = w.P, w.F
    part = ok(w.a.post("/api/v1/people", json={"face_ids": [F[0][2]]}), 201)["id"]
    out = ok(w.a.get(f"/api/v1/people/{P[0]}/suggestions"))
    assert [s["person"]["id"] for s in out][0] == part
    assert sorted(s["person"]["id"] for s in out) == sorted([P[1], P[2], P[3], part])
    sims = [s["similarity"] for s in out]
    assert sims == sorted(sims, reverse=True)
    assert sims[0] > 0.7 and max(sims[1:]) < 0.5, sims  # the synthetic persons are far apart
    assert all(set(s) == {"person", "similarity"} and set(s["person"]) == PERSON_KEYS for s in out)
    assert out[0]["person"] == person(w.a, part)

    back = ok(w.a.get(f"/api/v1/people/{part}/suggestions"))
    assert back[0]["person"]["id"] == P[0] and part not in [s["person"]["id"] for s in back]
    assert [s["person"]["id"] for s in ok(w.a.get(f"/api/v1/people/{P[0]}/suggestions", params={"limit": 1}))] == \
        [part]

    ok(w.a.patch(f"/api/v1/people/{P[3]}", json={"name": "Dee"}))
    ok(w.a.post("/api/v1/people", json={"face_ids": F[3]}), 201)
    assert ok(w.a.get(f"/api/v1/people/{P[3]}/suggestions")) == []  # no faces, nothing to compare
    for limit in (0, 101):
        problem(w.a.get(f"/api/v1/people/{P[0]}/suggestions", params={"limit": limit}), 422)
    problem(w.a.get(f"/api/v1/people/{MISSING}/suggestions"), 404, "person")


def test_uncertain_faces_puts_the_misplaced_face_first(w):
    P, F = w.P, w.F
    out = ok(w.a.get("/api/v1/faces/uncertain"))
    assert len(out) == 10
    assert all(set(u) == {"face", "person_id", "margin"} and set(u["face"]) == FACE_KEYS for u in out)
    assert all(u["margin"] > 0 and u["face"]["person_id"] == u["person_id"] == w.P[w.ann.truth[u["face"]["id"]]]
               for u in out), out  # every face is where it belongs

    ok(w.a.post(f"/api/v1/people/{P[1]}/faces", json={"face_ids": [F[0][0]]}))  # a wrong move
    out = ok(w.a.get("/api/v1/faces/uncertain", params={"limit": 3}))
    assert len(out) == 3
    first = out[0]
    assert (first["face"]["id"], first["person_id"], first["face"]["person_id"]) == (F[0][0], P[1], P[1])
    assert first["margin"] < 0 < out[1]["margin"]
    margins = [u["margin"] for u in out]
    assert margins == sorted(margins)
    for limit in (0, 101):
        problem(w.a.get("/api/v1/faces/uncertain", params={"limit": limit}), 422)
    assert {u["face"]["id"] for u in ok(w.b.get("/api/v1/faces/uncertain", params={"limit": 100}))} == \
        set(w.bob.face_ids)


# ------------------------------------------------------------------------------ faces, photos, images


def test_face_and_photo(w):
    P, F = w.P, w.F
    f = face(w.a, F[0][1])
    assert f["id"] == F[0][1] and f["photo_id"] == w.photo_of(F[0][1]) and f["person_id"] == P[0]
    assert f["box"] == list(BOX)
    assert f["det_score"] == pytest.approx(0.98) and f["blur"] == pytest.approx(0.8)
    assert (f["blurry"], f["trash"]) == (False, False)
    assert set(f) == FACE_KEYS

    photo = ok(w.a.get(f"/api/v1/photos/{f['photo_id']}"))
    assert set(photo) == {"id", "uri", "status", "width", "height", "created_at", "faces"}
    assert (photo["id"], photo["uri"], photo["status"], photo["width"], photo["height"]) == \
        (f["photo_id"], f"{w.ann_name}/p0_1.jpg", "indexed", *SIZE)
    assert photo["faces"] == [f]
    ok(w.a.delete(f"/api/v1/people/{P[0]}/faces/{F[0][1]}"))
    assert ok(w.a.get(f"/api/v1/photos/{f['photo_id']}"))["faces"] == [{**f, "person_id": None}]

    problem(w.a.get(f"/api/v1/faces/{MISSING}"), 404, f"face {MISSING}")
    problem(w.a.get(f"/api/v1/photos/{MISSING}"), 404, f"photo {MISSING}")
    problem(w.a.get("/api/v1/faces/0"), 422)
    problem(w.a.get("/api/v1/photos/x"), 422)


def test_thumbnails_and_covers(w):
    P, F = w.P, w.F
    url = f"/api/v1/faces/{F[0][1]}/thumbnail"
    r = ok(w.a.get(url))
    assert r.headers["content-type"] == "image/jpeg"
    assert jpeg_size(r.content) == (160, 160)  # the 120 px box and its margin, scaled to 160
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10
    cached = w.api.cache / str(w.ann.user_id) / f"{F[0][1]}-160-{etag.strip(chr(34))}.jpg"
    assert cached.read_bytes() == r.content
    assert ok(w.a.get(url)).content == r.content

    for header in (etag, f"W/{etag}", f'"nope", {etag}', etag.strip('"')):
        r304 = w.a.get(url, headers={"If-None-Match": header})
        assert r304.status_code == 304 and r304.content == b"" and r304.headers["etag"] == etag, header
    assert ok(w.a.get(url, headers={"If-None-Match": '"nope"'})).content == r.content

    small = ok(w.a.get(url, params={"size": 64}))
    assert jpeg_size(small.content) == (64, 64) and small.headers["etag"] != etag
    assert (w.api.cache / str(w.ann.user_id) / f"{F[0][1]}-64-{small.headers['etag'].strip(chr(34))}.jpg").is_file()
    for size in (31, 513, "big"):
        problem(w.a.get(url, params={"size": size}), 422)
    problem(w.a.get(url, headers={"If-None-Match": "x" * 201}), 422)

    cover = ok(w.a.get(f"/api/v1/people/{P[0]}/cover"))  # the cover is the first face
    assert cover.headers["content-type"] == "image/jpeg"
    assert cover.headers["etag"] == ok(w.a.get(f"/api/v1/faces/{F[0][0]}/thumbnail")).headers["etag"]
    ok(w.a.patch(f"/api/v1/people/{P[0]}", json={"cover_face_id": F[0][1]}))
    cover = ok(w.a.get(f"/api/v1/people/{P[0]}/cover"))
    assert (cover.headers["etag"], cover.content) == (etag, r.content)
    assert w.a.get(f"/api/v1/people/{P[0]}/cover", headers={"If-None-Match": etag}).status_code == 304
    assert jpeg_size(ok(w.a.get(f"/api/v1/people/{P[0]}/cover", params={"size": 32})).content) == (32, 32)

    ok(w.a.patch(f"/api/v1/people/{P[3]}", json={"name": "Dee"}))
    ok(w.a.post("/api/v1/people", json={"face_ids": F[3]}), 201)
    problem(w.a.get(f"/api/v1/people/{P[3]}/cover"), 404, "cover", "no faces")

    (w.root / w.ann_name / "p1_2.jpg").unlink()  # the photo's file is gone
    problem(w.a.get(f"/api/v1/faces/{F[1][2]}/thumbnail"), 404, "neither the object store nor the library folder")
    problem(w.a.get(f"/api/v1/faces/{MISSING}/thumbnail"), 404, "face")
    problem(w.a.get(f"/api/v1/people/{MISSING}/cover"), 404, "person")


def test_delete_photo(w):
    P, F = w.P, w.F
    f, photo = F[0][0], w.photo_of(F[0][0])
    folder = w.api.cache / str(w.ann.user_id)
    for size in (160, 64):
        ok(w.a.get(f"/api/v1/faces/{f}/thumbnail", params={"size": size}))
    ok(w.a.get(f"/api/v1/faces/{F[0][1]}/thumbnail"))
    assert len(list(folder.glob(f"{f}-*.jpg"))) == 2

    r = w.a.delete(f"/api/v1/photos/{photo}")
    assert r.status_code == 204 and r.content == b"", r.text
    problem(w.a.get(f"/api/v1/photos/{photo}"), 404, f"photo {photo}")
    problem(w.a.get(f"/api/v1/faces/{f}"), 404, f"face {f}")
    problem(w.a.get(f"/api/v1/faces/{f}/thumbnail"), 404, "face")
    assert list(folder.glob(f"{f}-*.jpg")) == []  # its cached thumbnails are gone
    assert len(list(folder.glob(f"{F[0][1]}-*.jpg"))) == 1  # other faces' stay
    p0 = person(w.a, P[0])
    assert (p0["face_count"], p0["cover_face_id"]) == (2, F[0][1])
    assert face_ids_of(w.a, P[0]) == F[0][1:]
    me = ok(w.a.get("/api/v1/me"))
    assert (me["photos"]["indexed"], me["faces"], me["assigned_faces"]) == (11, 11, 11)
    problem(w.a.delete(f"/api/v1/photos/{photo}"), 404, f"photo {photo}")

    for g in F[3]:  # every photo of an automatic person: the person goes too
        assert w.a.delete(f"/api/v1/photos/{w.photo_of(g)}").status_code == 204
    problem(w.a.get(f"/api/v1/people/{P[3]}"), 404)
    problem(w.a.delete(f"/api/v1/photos/{w.bob.photo_ids[0]}"), 404, "photo")
    problem(w.a.delete("/api/v1/photos/0"), 422)
    assert ok(w.b.get("/api/v1/me"))["faces"] == 6


def test_delete_me(w, db):
    ok(w.a.get(f"/api/v1/faces/{w.F[0][0]}/thumbnail"))
    ok(w.b.get(f"/api/v1/faces/{w.bob.face_ids[0]}/thumbnail"))
    ok(w.a.patch(f"/api/v1/people/{w.P[0]}", json={"name": "Ann"}))
    ok(w.a.delete(f"/api/v1/people/{w.P[1]}/faces/{w.F[1][0]}"))
    ann_cache, bob_cache = (w.api.cache / str(lib.user_id) for lib in (w.ann, w.bob))
    assert ann_cache.is_dir() and bob_cache.is_dir()
    bob_files = sorted(p.name for p in bob_cache.iterdir())
    bob_before = ok(w.b.get("/api/v1/me")), people(w.b, hidden="all")

    r = w.a.delete("/api/v1/me")
    assert r.status_code == 204 and r.content == b"", r.text
    for method, path in (("GET", "/api/v1/me"), ("GET", "/api/v1/people"), ("DELETE", "/api/v1/me"),
                         ("GET", f"/api/v1/people/{w.P[0]}")):
        problem(w.a.request(method, path), 401, "bearer")
    assert not ann_cache.exists()
    uid = w.ann.user_id
    with db.connect() as c:
        assert c.scalar(sa.select(sa.func.count()).select_from(User).where(User.id == uid)) == 0
        assert c.scalar(sa.select(sa.func.count()).select_from(User).where(User.name == w.ann_name)) == 0
        for table in (ApiToken, Photo, Face, Person, FaceRejection, PersonEdit):
            assert c.scalar(sa.select(sa.func.count()).select_from(table).where(table.user_id == uid)) == 0, table
        assert c.scalar(sa.select(sa.func.count()).select_from(FacePerson)
                        .where(FacePerson.face_id.in_(w.ann.face_ids))) == 0
    assert (ok(w.b.get("/api/v1/me")), people(w.b, hidden="all")) == bob_before
    assert sorted(p.name for p in bob_cache.iterdir()) == bob_files


# ------------------------------------------------------------------------------ edits and undo


def test_every_edit_is_undone_exactly(w, db):
    P, F = w.P, w.F
    uid = w.ann.user_id

    def snapshot():
        return db_state(db, uid), people(w.a, hidden="all", order="newest", min_faces=0)

    bob_before = db_state(db, w.bob.user_id)
    states, made = [snapshot()], {}
    steps = [
        ("update", lambda: w.a.patch(f"/api/v1/people/{P[0]}", json={"name": "Ann"}), 200),
        ("update", lambda: w.a.patch(f"/api/v1/people/{P[1]}", json={"hidden": True, "cover_face_id": F[1][2]}), 200),
        ("reject", lambda: w.a.delete(f"/api/v1/people/{P[3]}/faces/{F[3][0]}"), 200),
        ("merge", lambda: w.a.post(f"/api/v1/people/{P[0]}/merge", json={"person_ids": [P[3]]}), 200),
        ("move", lambda: w.a.post(f"/api/v1/people/{P[2]}/faces", json={"face_ids": [F[1][0], F[3][1]]}), 200),
        ("split", lambda: w.a.post("/api/v1/people", json={"face_ids": [F[2][0], F[2][1], F[0][0]]}), 201),
        ("reject", lambda: w.a.delete(f"/api/v1/people/{P[0]}/faces/{F[0][1]}"), 200),
    ]
    for kind, call, status in steps:
        made[kind] = ok(call(), status)
        states.append(snapshot())
        assert states[-1] != states[-2], f"{kind} changed nothing"
    assert (F[3][0], P[0]) in states[4][0]["rejections"]  # the merge carried P3's rejection over

    edits = ok(w.a.get("/api/v1/edits"))
    assert [e["kind"] for e in edits] == [k for k, _, _ in reversed(steps)]
    assert all(set(e) == {"id", "kind", "summary", "created_at", "undone"} and not e["undone"] and e["summary"]
               for e in edits)
    assert [e["id"] for e in edits] == sorted((e["id"] for e in edits), reverse=True)
    assert "Ann" in edits[-1]["summary"]
    assert len(ok(w.a.get("/api/v1/edits", params={"limit": 2}))) == 2
    for limit in (0, 201):
        problem(w.a.get("/api/v1/edits", params={"limit": limit}), 422)
    problem(w.b.post("/api/v1/edits/undo"), 409, "nothing to undo")  # bob has none; ann's are not his

    for i, edit in enumerate(edits):
        undone = ok(w.a.post("/api/v1/edits/undo"))
        assert undone == {**edit, "undone": True}
        assert snapshot() == states[len(steps) - 1 - i], f"undoing {edit['kind']} ({edit['summary']})"
    assert db_state(db, uid) == states[0][0]
    problem(w.a.post("/api/v1/edits/undo"), 409, "nothing to undo")
    assert all(e["undone"] for e in ok(w.a.get("/api/v1/edits")))
    problem(w.a.get(f"/api/v1/people/{made['split']['id']}"), 404)  # the split's person is gone again
    assert db_state(db, w.bob.user_id) == bob_before


def test_undo_after_the_cover_face_was_deleted(w):
    """Undo puts a person's row back, but a cover face deleted since stays deleted: the best face left."""
    P, F = w.P, w.F
    ok(w.a.patch(f"/api/v1/people/{P[0]}", json={"name": "Ann"}))
    assert w.a.delete(f"/api/v1/photos/{w.photo_of(F[0][0])}").status_code == 204  # P0's cover
    assert ok(w.a.post("/api/v1/edits/undo"))["kind"] == "update"
    p0 = person(w.a, P[0])
    assert (p0["name"], p0["face_count"], p0["cover_face_id"]) == (None, 2, F[0][1])

    ok(w.a.post(f"/api/v1/people/{P[2]}/merge", json={"person_ids": [P[1]]}))
    assert w.a.delete(f"/api/v1/photos/{w.photo_of(F[1][0])}").status_code == 204  # P1's cover
    assert ok(w.a.post("/api/v1/edits/undo"))["kind"] == "merge"
    p1 = person(w.a, P[1])
    assert (p1["face_count"], p1["cover_face_id"]) == (2, F[1][1])
    assert face_ids_of(w.a, P[1]) == F[1][1:] and face_ids_of(w.a, P[2]) == F[2]


def test_undo_after_a_rejected_face_was_deleted(w, db):
    """An undo that puts rejections back leaves out those of faces deleted since."""
    P, F = w.P, w.F
    ok(w.a.delete(f"/api/v1/people/{P[0]}/faces/{F[0][0]}"))
    ok(w.a.delete(f"/api/v1/people/{P[0]}/faces/{F[0][1]}"))  # its undo state holds (F00, P0)
    assert w.a.delete(f"/api/v1/photos/{w.photo_of(F[0][0])}").status_code == 204
    assert ok(w.a.post("/api/v1/edits/undo"))["kind"] == "reject"
    assert face_ids_of(w.a, P[0]) == F[0][1:]
    assert db_state(db, w.ann.user_id)["rejections"] == []
    assert ok(w.a.post("/api/v1/edits/undo"))["kind"] == "reject"  # the deleted face's own: nothing to put back
    assert face_ids_of(w.a, P[0]) == F[0][1:]


def test_undo_brings_back_a_person_whose_id_another_user_got_meanwhile(w):
    """A merge frees the merged person's id; if the next person anyone makes took it (SQLite
    reuses the largest rowid unless the table is AUTOINCREMENT), undoing the merge would collide."""
    part = ok(w.a.post("/api/v1/people", json={"face_ids": [w.F[0][2]]}), 201)["id"]
    before = db_state(w.db, w.ann.user_id)
    ok(w.a.post(f"/api/v1/people/{w.P[0]}/merge", json={"person_ids": [part]}))
    bobs = ok(w.b.post("/api/v1/people", json={"face_ids": [w.bob.face_ids[1]]}), 201)
    assert ok(w.a.post("/api/v1/edits/undo"))["kind"] == "merge"
    assert db_state(w.db, w.ann.user_id) == before
    assert person(w.b, bobs["id"]) == bobs


# ------------------------------------------------------------------------------ tokens on the command line


def facecluster(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("facecluster")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)


def test_token_command_line(live):
    user = f"carol-{uuid.uuid4().hex[:8]}"
    made = facecluster("token", "create", "--user", user, "--label", "laptop", "--db", live.db_url)
    assert made.returncode == 0, made.stderr
    lines = made.stdout.strip().splitlines()
    token = lines[-1]
    assert token.startswith(tokens.PREFIX) and " " not in token and len(token) > 30
    assert token not in made.stderr
    token_id = int(lines[-2].split()[1])
    with live.client(token) as c:
        assert ok(c.get("/api/v1/me"))["user"] == user

        for args in (("--user", user), ()):
            listed = facecluster("token", "list", *args, "--db", live.db_url)
            assert listed.returncode == 0, listed.stderr
            assert token not in listed.stdout + listed.stderr and token[len(tokens.PREFIX):] not in listed.stdout
            row = next(line for line in listed.stdout.splitlines() if line.split()[0] == str(token_id))
            assert user in row and "laptop" in row

        revoked = facecluster("token", "revoke", str(token_id), "--db", live.db_url)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
        problem(c.get("/api/v1/me"), 401, "bearer")
        again = facecluster("token", "revoke", str(token_id), "--db", live.db_url)
        assert again.returncode != 0 and f"no token {token_id}" in again.stderr
