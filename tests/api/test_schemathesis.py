"""Property tests of the API against its own OpenAPI document: schemathesis generates requests
for every operation (valid ones and, as often, invalid ones) and sends them with a valid token to
the live server on the real PostgreSQL. Whatever it sends, the answer is never a 5xx, its status
code is one the document lists, and its content type and body are the documented ones.

Generated ids rarely exist, so half of the examples draw the user's real person, face and photo
ids instead and reach past the 404s. Examples are derandomized: a failure repeats, run after run.
"""

from __future__ import annotations

import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from services.store.db import make_engine
from services.store.models import Face, Person, Photo

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = 30  # per operation: ~22 operations stay within a CI minute or two
ID_KINDS = {"person": "persons", "face": "faces", "photo": "photos", "cover_face": "faces"}


def kind_of(name: str) -> str | None:
    for prefix, kind in ID_KINDS.items():
        if name in (f"{prefix}_id", f"{prefix}_ids"):
            return kind
    return None


def run_order(op) -> tuple:
    """Deleting runs after everything else, and deleting the caller last of all."""
    return (op.method.upper() == "DELETE" and op.path == "/api/v1/me", op.method.upper() == "DELETE", op.label)


@pytest.mark.cloud
@pytest.mark.parametrize("api_db", ["postgres"], indirect=True)
def test_the_api_keeps_its_openapi_document(seeded):
    api = seeded.api
    engine = make_engine(api.db_url)
    try:
        with engine.connect() as c:
            real = {kind: sorted(c.scalars(sa.select(model.id).where(model.user_id == seeded.ann.user_id)))
                    for kind, model in (("persons", Person), ("faces", Face), ("photos", Photo))}
    finally:
        engine.dispose()
    assert all(real.values()), real

    schema = schemathesis.openapi.from_url(api.url + "/openapi.json", timeout=30)
    operations = sorted((result.ok() for result in schema.get_all_operations()), key=run_order)
    labels = [op.label for op in operations]
    assert len(operations) >= 20 and "DELETE /api/v1/me" == labels[-1], labels
    headers = {"Authorization": f"Bearer {seeded.ann_token}"}

    def with_real_ids(case, data) -> None:
        """Sometimes put the caller's real ids where ids go (path and body)."""
        for name in list(case.path_parameters or {}):
            kind = kind_of(name)
            if kind and data.draw(st.booleans(), label=f"real {name}"):
                case.path_parameters[name] = data.draw(st.sampled_from(real[kind]), label=name)
        if isinstance(case.body, dict):
            for name, value in list(case.body.items()):
                kind = kind_of(name)
                if kind and data.draw(st.booleans(), label=f"real {name}"):
                    ids = st.sampled_from(real[kind])
                    case.body[name] = data.draw(st.lists(ids, min_size=1, max_size=3) if isinstance(value, list)
                                                else ids, label=name)

    failures = []
    for op in operations:
        modes = [op.as_strategy(generation_mode=GenerationMode.POSITIVE)]
        if op.path_parameters or op.query or op.headers or op.body:
            modes.append(op.as_strategy(generation_mode=GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
                  phases=[Phase.explicit, Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
        @given(case=st.one_of(modes), data=st.data())
        def check(case, data):
            with_real_ids(case, data)
            case.call_and_validate(base_url=api.url, headers=headers, checks=CHECKS, timeout=30)

        try:
            check()
        except (Exception, BaseExceptionGroup) as e:  # every operation gets its turn; all failures are reported
            failures.append(f"--- {op.label}\n{e}")
    assert not failures, "\n\n".join(failures)
