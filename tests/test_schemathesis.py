"""Property-based fuzzing of the HTTP API against its own OpenAPI schema (schemathesis, in-process ASGI).

Every operation of the app's `/openapi.json` gets schema-valid (positive) and schema-violating (negative)
requests. Each response must not be a 5xx (nor an exception out of the app), must match its documented
schema and content type, and must have a documented status code. No worker listens on the Redis used here,
so a job that passed the prechecks would just stay queued. Requests go to the ASGI app in-process, and
schemathesis runs the app's lifespan (which opens Redis).

The bugs this fuzzing found (500s on odd job ids and on non-BMP characters in JSON merges, undocumented
error bodies) are fixed and pinned by the regression tests at the end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis import checks  # noqa: E402

from service.app import create_app  # noqa: E402
from workers.settings import Settings  # noqa: E402

MAX_EXAMPLES = 20  # per operation; the fuzzing takes about 15 s on 2 idle cores, plus the imports

# The schema is needed at collection time, before any fixture exists, so the app is built here with settings
# that reach nothing (Redis on port 1: a request that escaped the fixture would get a 503, and never start an
# embedded Redis); the autouse `_wire_app` fixture points it at a worker-less Redis and a temporary home.
# (Not `schemathesis.pytest.from_fixture`: schemathesis 4.32 sets `Function._nodeid`, gone in pytest 9.)
SETTINGS = Settings(
    home=Path(tempfile.gettempdir()) / "strata-schemathesis-unwired",
    redis_url="redis://127.0.0.1:1/0",
    default_model=False,
    import_roots=[],
    api_keys=None,
)
APP = create_app(SETTINGS)
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.app = APP

# FastAPI answers 400 to a body it cannot decode at all; every other error status is declared by the routes
# (service.schemas.ERROR_RESPONSES), so the check still catches any status nobody documented.
UNDOCUMENTED_BY_DESIGN = {400}


def status_code_conformance_known_gaps(ctx, response, case):
    """schemathesis' `status_code_conformance`, tolerating FastAPI's undecodable-body 400 only."""
    try:
        return checks.status_code_conformance(ctx, response, case)
    except AssertionError:
        if response.status_code in UNDOCUMENTED_BY_DESIGN:
            return None
        raise


def negative_data_rejection_or_too_large(ctx, response, case):
    """schemathesis' `negative_data_rejection`, also counting a 413 as a rejection: a schema-violating body
    over STRATA_MAX_BODY_BYTES is refused for its size before it is validated (its list default omits 413)."""
    try:
        return checks.negative_data_rejection(ctx, response, case)
    except AssertionError:
        if response.status_code == 413:
            return None
        raise


EXCLUDED_CHECKS = [
    # Replaced by the *_known_gaps and *_or_too_large versions above.
    checks.status_code_conformance,
    checks.negative_data_rejection,
    # Starlette answers 405 with an `Allow` that lists only the methods of the first route whose path
    # matches (`OPTIONS /v1/jobs/x` -> `Allow: GET`, no DELETE; `OPTIONS /v1/models/import` -> `Allow: GET`,
    # from `/v1/models/{model_id}`). A framework limitation; the 405 itself is still checked
    # (`unsupported_method`).
    checks.allow_header_conformance,
    # Schema-valid requests that name models the registry does not hold get a 422 by design (README: "422 for
    # ... a missing model"), and with an empty registry nearly every positive request names one.
    checks.positive_data_acceptance,
]


@pytest.fixture(autouse=True)
def _wire_app(tmp_path, isolated_redis_url):
    SETTINGS.home = tmp_path / "home"
    SETTINGS.redis_url = isolated_redis_url
    SETTINGS.import_roots = [tmp_path]
    yield


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_api_conforms_to_its_schema(case):
    case.call_and_validate(
        additional_checks=[status_code_conformance_known_gaps, negative_data_rejection_or_too_large],
        excluded_checks=EXCLUDED_CHECKS,
    )


# Bugs the fuzzer once found, as minimal regression cases under schemathesis' default checks (less the two
# about undocumented statuses and `Allow`, see above).
STRICT_EXCLUDED = [checks.status_code_conformance, checks.allow_header_conformance]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_job_id_outside_rq_alphabet_is_a_404_not_a_500(method):
    case = schema["/v1/jobs/{job_id}"][method].Case(path_parameters={"job_id": "0.1"})
    assert case.call_and_validate(excluded_checks=STRICT_EXCLUDED).status_code == 404


def test_422_with_a_message_detail_matches_the_documented_error_body():
    case = schema["/v1/jobs"]["POST"].Case(
        body={"kind": "variants", "base": "no-such-model"}, media_type="application/json"
    )
    response = case.call_and_validate(excluded_checks=STRICT_EXCLUDED)
    assert response.status_code == 422


def test_json_merge_with_a_non_bmp_character_is_a_422_not_a_500():
    case = schema["/v1/merges"]["POST"].Case(
        body={"merge_method": "linear", "models": [{"model": "\U0001f600", "parameters": {"weight": 1.0}}]},
        media_type="application/json",
    )
    response = case.call_and_validate(excluded_checks=STRICT_EXCLUDED)
    assert response.status_code == 422
