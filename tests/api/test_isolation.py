"""Every operation of the API is scoped to the caller, found from the live OpenAPI document.

User B calls every /api/v1 operation with user A's real ids (persons, faces, photos) in every
place an id goes, the path or the body, one place at a time with B's own ids elsewhere, and all
at once: each must answer 404 exactly as for an id that does not exist, and show nothing of A's.
Without a token every operation answers 401. Afterwards A's rows are exactly as before.

The operations come from /openapi.json, so a new endpoint is walked without anyone adding it
here; one this test cannot fill (a parameter or body field it does not know) fails it, and so
does a new operation without ids until it is listed in NO_IDS with what it answers B.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from services.store.db import make_engine
from services.store.models import ApiToken, Face, FacePerson, FaceRejection, Person, PersonEdit, Photo, User

PREFIX = "/api/v1/"
METHODS = {"get", "put", "post", "patch", "delete", "head", "options", "trace"}
MISSING = 10**12  # an id nobody has
# Operations outside /api/v1, open to anyone.
PUBLIC = {("get", "/healthz"), ("get", "/readyz")}
# Operations that take no id, and what they answer B: B's own things (checked to hold none of
# A's), or nothing. DELETE /me deletes B, so it runs last.
NO_IDS = {
    ("get", "/api/v1/people"): 200,
    ("get", "/api/v1/faces/uncertain"): 200,
    ("get", "/api/v1/edits"): 200,
    ("get", "/api/v1/me"): 200,
    ("post", "/api/v1/edits/undo"): 409,  # B has made no edit; A's are not B's to undo
    ("delete", "/api/v1/me"): 204,
}
KIND_OF_NAME = {"person": "persons", "face": "faces", "photo": "photos", "cover_face": "faces"}
ID_NAME = re.compile(r"^(person|face|photo|cover_face)_ids?$")
SECRET = "Secret Ann"


def kind_of(name: str) -> str | None:
    """'persons' / 'faces' / 'photos' for a parameter or field that carries such ids."""
    m = ID_NAME.match(name)
    return KIND_OF_NAME[m.group(1)] if m else None


# ------------------------------------------------------------------------------ the document


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def mentions_ids(doc: dict, schema: dict, seen: frozenset = frozenset()) -> bool:
    """Whether a schema has an id-like property anywhere inside (refs followed)."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return name not in seen and mentions_ids(doc, resolve(doc, schema), seen | {name})
    if any(kind_of(p) or p.endswith(("_id", "_ids")) for p in schema.get("properties", {})):
        return True
    subs = [*schema.get("properties", {}).values(), *(schema.get(k) for k in ("items", "additionalProperties"))]
    subs += [s for k in ("anyOf", "oneOf", "allOf") for s in schema.get(k, [])]
    return any(isinstance(s, dict) and mentions_ids(doc, s, seen) for s in subs)


class Operation:
    """One method and path, with where its ids go: ('path'|'query'|'header'|'body', name, kind, is_list)."""

    def __init__(self, doc: dict, method: str, path: str, op: dict, shared: list[dict]):
        self.method, self.path = method, path
        self.slots: list[tuple[str, str, str, bool]] = []
        self.body: dict | None = None
        where = f"{method.upper()} {path}"
        for p in [*shared, *op.get("parameters", [])]:
            p = resolve(doc, p)
            schema = resolve(doc, p.get("schema", {}))
            kind = kind_of(p["name"])
            if kind:
                self.slots.append((p["in"], p["name"], kind, schema.get("type") == "array"))
            elif p["in"] == "path" or p.get("required"):
                pytest.fail(f"{where}: this test does not know how to fill the {p['in']} parameter {p['name']!r}; "
                            f"teach it (an id of another user must answer 404)")
            elif p["name"].endswith(("_id", "_ids")):
                pytest.fail(f"{where}: the {p['in']} parameter {p['name']!r} looks like an id of a kind this test "
                            f"does not know; teach it (an id of another user must answer 404)")
        if "requestBody" in op:
            content = op["requestBody"].get("content", {})
            if "application/json" not in content:
                pytest.fail(f"{where}: a request body of {sorted(content)}; this test only fills JSON bodies")
            schema = resolve(doc, content["application/json"]["schema"])
            if schema.get("type") != "object":
                pytest.fail(f"{where}: a body that is not a JSON object: {schema}")
            self.body = {}
            for name, field in schema.get("properties", {}).items():
                field = resolve(doc, field)
                kinds = [resolve(doc, s) for s in field.get("anyOf", [field])]
                if kind_of(name):
                    self.slots.append(("body", name, kind_of(name), any(s.get("type") == "array" for s in kinds)))
                elif name in schema.get("required", []) or mentions_ids(doc, field):
                    pytest.fail(f"{where}: this test does not know how to fill the body field {name!r}; teach it "
                                f"(an id of another user must answer 404)")

    def __repr__(self) -> str:
        return f"{self.method.upper()} {self.path}"

    def request(self, c: httpx.Client, values: dict[tuple[str, str], object]) -> httpx.Response:
        """Call with ``values`` for the slots ((where, name) -> id or list of ids)."""
        path = re.sub(r"\{(\w+)\}", lambda m: str(values[("path", m.group(1))]), self.path)
        params = {n: v for (w, n), v in values.items() if w == "query"}
        headers = {n: str(v) for (w, n), v in values.items() if w == "header"}
        body = None if self.body is None else {**self.body, **{n: v for (w, n), v in values.items() if w == "body"}}
        return c.request(self.method.upper(), path, params=params, headers=headers,
                         **({} if body is None else {"json": body}))


def operations(doc: dict) -> tuple[list[Operation], list[tuple[str, str]]]:
    """(operations with ids, those without) under /api/v1; fails on an unknown public one."""
    with_ids, without = [], []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method not in METHODS:
                continue
            if not path.startswith(PREFIX):
                assert (method, path) in PUBLIC, f"{method.upper()} {path} is outside {PREFIX}: is it for anyone?"
                continue
            o = Operation(doc, method, path, op, item.get("parameters", []))
            if o.slots:
                with_ids.append(o)
            else:
                assert (method, path) in NO_IDS, (
                    f"{o} takes no id: add it to NO_IDS with what it answers a user who has none of another's")
                without.append((method, path))
    assert set(NO_IDS) <= set(without), f"NO_IDS lists operations the API does not have: {set(NO_IDS) - set(without)}"
    return with_ids, without


# ------------------------------------------------------------------------------ what a user has


def user_rows(engine: sa.Engine, user_id: int) -> dict:
    """Every row of the user in every table, every column: nothing may change them."""
    def rows(query) -> list[tuple]:
        return sorted((tuple(r) for r in c.execute(query)), key=repr)

    with engine.connect() as c:
        return {
            "users": rows(sa.select(User).where(User.id == user_id)),
            "tokens": rows(sa.select(ApiToken.__table__).where(ApiToken.user_id == user_id)),
            "photos": rows(sa.select(Photo.__table__).where(Photo.user_id == user_id)),
            "faces": rows(sa.select(Face.__table__).where(Face.user_id == user_id)),
            "persons": rows(sa.select(Person.__table__).where(Person.user_id == user_id)),
            "links": rows(sa.select(FacePerson.__table__).join(Face, Face.id == FacePerson.face_id)
                          .where(Face.user_id == user_id)),
            "rejections": rows(sa.select(FaceRejection.__table__).where(FaceRejection.user_id == user_id)),
            "edits": rows(sa.select(PersonEdit.__table__).where(PersonEdit.user_id == user_id)),
        }


def user_ids(engine: sa.Engine, user_id: int) -> dict[str, set[int]]:
    with engine.connect() as c:
        return {kind: set(c.scalars(sa.select(model.id).where(model.user_id == user_id)))
                for kind, model in (("persons", Person), ("faces", Face), ("photos", Photo), ("edits", PersonEdit))}


def api_view(c: httpx.Client) -> dict:
    def get(path, **params):
        r = c.get(path, params=params)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.json()

    return {"people": get("/api/v1/people", hidden="all", min_faces=0, limit=500), "edits": get("/api/v1/edits"),
            "me": get("/api/v1/me")}


OBJECT_KINDS = [("face_count", "persons"), ("det_score", "faces"), ("uri", "photos"), ("summary", "edits")]


def ids_in(value, kind: str | None = None) -> Iterator[tuple[str, int]]:
    """(kind, id) of every id in a JSON answer; an object with an id of a kind not known fails."""
    if isinstance(value, list):
        for v in value:
            yield from ids_in(v, kind)
    elif isinstance(value, dict):
        for key, v in value.items():
            if key == "id":
                own = next((k for marker, k in OBJECT_KINDS if marker in value), None)
                assert own, f"an object with an id of unknown kind: {value}"
                yield own, v
            elif kind_of(key):
                yield from ((kind_of(key), i) for i in (v if isinstance(v, list) else [v]) if i is not None)
            elif key.endswith(("_id", "_ids")):
                pytest.fail(f"an id field {key!r} of unknown kind in {value}")
            else:
                yield from ids_in(v)


# ------------------------------------------------------------------------------ the test


def test_every_operation_is_scoped_to_the_caller(seeded):
    api, ann, bob = seeded.api, seeded.ann, seeded.bob
    engine = make_engine(api.db_url)
    a, b = api.client(seeded.ann_token), api.client(seeded.bob_token)
    nobody, stranger = api.client(), api.client("fc_not-a-token")
    try:
        # A: named persons, a hidden one, a "not this person", edits to undo, a cached thumbnail
        P = [ann.person_of[p] for p in range(4)]
        for i, p in enumerate(P):
            assert a.patch(f"/api/v1/people/{p}", json={"name": f"{SECRET} {i}"}).status_code == 200
        assert a.patch(f"/api/v1/people/{P[3]}", json={"hidden": True}).status_code == 200
        a_faces = [f for f in ann.face_ids if ann.truth[f] == 0]
        assert a.delete(f"/api/v1/people/{P[0]}/faces/{a_faces[2]}").status_code == 200
        assert a.get(f"/api/v1/faces/{a_faces[0]}/thumbnail").status_code == 200
        a_cache = sorted(p.name for p in (api.cache / str(ann.user_id)).iterdir())

        b_faces = [f for f in bob.face_ids if bob.truth[f] == 0]
        # ids that would make each request succeed were it not scoped: in the path a person and a
        # face of it, in a body another person (merging a person into itself is a 409 of its own)
        A = {"path": {"persons": P[0], "faces": a_faces[0], "photos": ann.photo_ids[ann.face_ids.index(a_faces[0])]},
             "body": {"persons": P[1], "faces": a_faces[1], "photos": ann.photo_ids[ann.face_ids.index(a_faces[1])]}}
        B = {"path": {"persons": bob.person_of[0], "faces": b_faces[0],
                      "photos": bob.photo_ids[bob.face_ids.index(b_faces[0])]},
             "body": {"persons": bob.person_of[1], "faces": b_faces[1],
                      "photos": bob.photo_ids[bob.face_ids.index(b_faces[1])]}}
        a_ids = user_ids(engine, ann.user_id)
        a_rows, a_view = user_rows(engine, ann.user_id), api_view(a)
        assert a_view["me"]["user"] == "ann" and ann.user_id != bob.user_id
        a_words = [SECRET, seeded.ann_token, "ann/p"]  # A's names, token, photo uris

        def value(slot, ids: dict, others: dict | None = None):
            """The slot's value from ``ids`` (who -> place -> kind -> id); a list slot also gets
            ``others``' id first, so a list of B's own ids with one of A's is tried too."""
            where, _, kind, is_list = slot
            place = "body" if where == "body" else "path"
            if not is_list:
                return ids[place][kind]
            return [others[place][kind], ids[place][kind]] if others else [ids[place][kind]]

        doc = httpx.get(api.url + "/openapi.json", timeout=30).json()
        with_ids, without = operations(doc)
        assert len(with_ids) >= 14, with_ids  # the document is the app's, not an empty one

        def check_not_leaked(r: httpx.Response, what: str):
            for word in a_words:
                assert word not in r.text, f"{what} answered with A's {word!r}: {r.text[:500]}"

        # 1. no token, or a wrong one: 401 everywhere, before anything else is looked at
        everything = [(o, {(w, n): value(s, A) for s in o.slots for w, n in [s[:2]]}) for o in with_ids]
        everything += [(Operation(doc, m, p, doc["paths"][p][m], []), {}) for m, p in without]
        for o, values in everything:
            for c in (nobody, stranger):
                r = o.request(c, values)
                assert r.status_code == 401, f"{o} without a valid token -> {r.status_code}: {r.text[:300]}"
                assert set(r.json()) == {"detail"} and "bearer" in r.json()["detail"].lower(), r.text
                check_not_leaked(r, f"{o} without a token")

        # 2. B with A's ids: in each place alone (B's own ids elsewhere), and everywhere at once
        for o in with_ids:
            variants = [("A's ids everywhere", {s[:2]: value(s, A) for s in o.slots}, None)]
            for i, slot in enumerate(o.slots):
                values = {s[:2]: value(s, B) for s in o.slots}
                values[slot[:2]] = value(slot, A, B)
                nothing = {place: {slot[2]: MISSING} for place in ("path", "body")}
                missing = {**values, slot[:2]: value(slot, nothing, B)}
                a_id = A["body" if slot[0] == "body" else "path"][slot[2]]
                variants.append((f"A's {slot[2]} in {slot[0]} {slot[1]}", values, (missing, a_id)))
            for label, values, compare in variants:
                what = f"{o} as B with {label} {values}"
                r = o.request(b, values)
                assert r.status_code == 404, f"{what} -> {r.status_code}, not 404: {r.text[:500]}"
                assert r.headers["content-type"].startswith("application/json") and set(r.json()) == {"detail"}, \
                    f"{what}: {r.text[:500]}"
                check_not_leaked(r, what)
                if compare:  # exactly what an id that does not exist gets
                    missing, a_id = compare
                    m = o.request(b, missing)
                    assert m.status_code == 404, f"{o} as B with a missing id -> {m.status_code}: {m.text[:300]}"
                    said = re.sub(rf"\b{a_id}\b", "<id>", r.json()["detail"])
                    assert said == re.sub(rf"\b{MISSING}\b", "<id>", m.json()["detail"]), \
                        f"{what}: {r.json()['detail']!r} is not what a missing id gets: {m.json()['detail']!r}"

        # 3. the operations without ids answer B with B's own things, and none of A's
        b_ids = user_ids(engine, bob.user_id)
        for method, path in sorted(without, key=lambda op: (op == ("delete", "/api/v1/me"), op[0] != "get", op)):
            r = b.request(method.upper(), path)
            assert r.status_code == NO_IDS[(method, path)], f"{method.upper()} {path} as B -> {r.status_code}: {r.text}"
            check_not_leaked(r, f"{method.upper()} {path} as B")
            if r.content:
                for kind, i in ids_in(r.json()):
                    assert i in b_ids[kind] and i not in a_ids[kind], \
                        f"{method.upper()} {path} as B answered {kind} {i}, which is not B's: {r.text[:500]}"
                if path == "/api/v1/me":
                    assert r.json()["user"] != a_view["me"]["user"]
        assert b.get("/api/v1/me").status_code == 401  # B is gone (DELETE /me ran last)

        # 4. A is exactly as before
        assert user_rows(engine, ann.user_id) == a_rows
        assert api_view(a) == a_view
        assert sorted(p.name for p in (api.cache / str(ann.user_id)).iterdir()) == a_cache
        assert not list(api.cache.glob(f"{bob.user_id}/{a_faces[0]}-*"))
    finally:
        for c in (a, b, nobody, stranger):
            c.close()
        engine.dispose()


def test_the_walk_fails_on_what_it_cannot_fill():
    """The guard above is real: an operation with a parameter or body field it does not know
    fails the walk, and so does one without ids that NO_IDS does not list."""
    doc = {"paths": {}, "components": {"schemas": {
        "Body": {"type": "object", "properties": {"album_id": {"type": "integer"}}, "required": ["album_id"]}}}}

    def walk(path: str, method: str, op: dict):
        operations({**doc, "paths": {path: {method: {"responses": {}, **op}}}})

    with pytest.raises(pytest.fail.Exception, match="album_id"):
        walk("/api/v1/albums/{album_id}", "get", {"parameters": [
            {"name": "album_id", "in": "path", "required": True, "schema": {"type": "integer"}}]})
    with pytest.raises(pytest.fail.Exception, match="album_id"):
        walk("/api/v1/albums", "post", {"requestBody": {"content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Body"}}}}})
    with pytest.raises(pytest.fail.Exception, match="album_id"):
        walk("/api/v1/search", "get", {"parameters": [
            {"name": "album_id", "in": "query", "schema": {"type": "integer"}}]})
    with pytest.raises(AssertionError, match="NO_IDS"):
        walk("/api/v1/everyone", "get", {})
    with pytest.raises(AssertionError, match="outside"):
        walk("/admin/users", "get", {})
    body = {"type": "object", "properties": {"person_ids": {"type": "array", "items": {"type": "integer"}},
                                             "note": {"type": "string"}}}
    known = {
        "post": {"parameters": [{"name": "face_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                 "requestBody": {"content": {"application/json": {"schema": body}}}, "responses": {}}}
    paths = {"/api/v1/faces/{face_id}/x": known}
    for method, path in NO_IDS:
        paths.setdefault(path, {})[method] = {"responses": {}}
    with_ids, _ = operations({**doc, "paths": paths})
    assert [o.slots for o in with_ids] == [[("path", "face_id", "faces", False),
                                            ("body", "person_ids", "persons", True)]]
