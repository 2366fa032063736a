"""Property-based API checks: schemathesis walks every operation of the server's own OpenAPI
document with generated valid and invalid inputs, and no answer may be a server error.

The frontend under test has no Triton behind it (its Triton URL points at a port where nothing
listens, and it does not wait for one), so every job it accepts ends at once as ERROR with a
reason. That keeps the run short whatever sizes and step counts the generated bodies ask for,
while validation, job creation, queries, history and every response shape are still exercised.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import served_frontend

# Per operation; CONTRACT_FUZZ_EXAMPLES=200 (say) for a deeper run.
MAX_EXAMPLES = int(os.environ.get("CONTRACT_FUZZ_EXAMPLES", "15"))
# Documented answers of routes whose models are not served (a JSON body names the feature).
NOT_IMPLEMENTED = {"/v1/tools/describe-image", "/v1/tools/generate_mask"}


@pytest.fixture(scope="module")
def offline_frontend(tmp_path_factory):
    # A port held by a socket that never listens: connections are refused, and no server started
    # later in the session can take the port.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        with served_frontend(f"127.0.0.1:{dead.getsockname()[1]}", tmp_path_factory.mktemp("schemathesis"),
                             triton_ready_timeout_s=0, queue_size=100_000, concurrency=8) as frontend:
            yield frontend


def app_openapi() -> dict:
    """The OpenAPI document the frontend serves, built from the app itself: tests are generated at
    collection time, before any server runs (schemathesis' lazy `from_fixture` loader does not
    work with this pytest). test_served_schema_is_the_one_tested checks it is the served one."""
    from frontend.app import Settings, create_app

    return create_app(Settings(triton_url="unused", database_url="sqlite://")).openapi()


schema = schemathesis.openapi.from_dict(app_openapi())


def test_served_schema_is_the_one_tested(offline_frontend):
    served = offline_frontend.client.get("/openapi.json").json()
    assert served == app_openapi()
    assert len(served["paths"]) >= 20


def streams_png(case) -> bool:
    """Accept: image/png (header or ?accept=) asks for the streamed PNG, whose failure answer is
    500 "ERROR" by contract (§3.4); with no Triton every job fails."""
    accept = (case.query or {}).get("accept") or (case.headers or {}).get("accept") or ""
    return accept == "image/png"


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True,
          database=None)
def test_no_server_errors(case, offline_frontend):
    response = case.call(base_url=offline_frontend.base_url, timeout=30)
    if streams_png(case) and response.status_code == 500:
        assert response.text == "ERROR"
        return
    if case.operation.path in NOT_IMPLEMENTED and response.status_code == 501:
        assert "not supported" in response.json()["detail"]
        return
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}")
    if response.status_code == 422:  # every validation error is the JSON list shape
        detail = response.json()["detail"]
        assert isinstance(detail, list) and detail
        for item in detail:
            assert {"type", "loc", "msg", "input"} <= set(item), item


def test_every_accepted_job_ended(offline_frontend):
    """After everything above, the server still answers and no job is left waiting or running."""
    c = offline_frontend.client
    assert c.get("/ping").json() == "pong"
    deadline = time.monotonic() + 30
    while (queue := c.get("/v1/generation/job-queue").json())["running_size"]:
        assert time.monotonic() < deadline, queue
        time.sleep(0.2)
    assert queue["finished_size"] > 0  # jobs were created and ended
