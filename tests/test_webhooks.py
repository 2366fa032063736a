"""Webhook delivery against a real HTTP receiver on loopback: payload shape, one POST per send,
retry policy (5xx, 429, timeouts retried; other 4xx and redirects not), the SSRF guard for
per-request URLs, the trusted global URL, and that `send` never waits for the receiver."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from frontend.webhooks import USER_AGENT, WebhookSender, webhook_payload

PAYLOAD = {"job_id": "job-1", "job_result": [{"url": "http://example.com/files/a-0.png", "seed": "42"}]}


class Receiver:
    """A loopback HTTP server that records every POST and answers from a per-request script.

    `statuses[i]` / `delays[i]` apply to the i-th request (then 200 / no delay). While `gate` is
    clear, a request is recorded in `arrived` and held until the test sets the gate."""

    def __init__(self, statuses: list[int] | None = None, delays: list[float] | None = None):
        self.statuses = list(statuses or [])
        self.delays = list(delays or [])
        self.arrived: list[dict] = []
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        # A client that timed out closes the socket; the late reply's broken pipe is expected.
        self.server.handle_error = lambda request, address: None
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def _handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status, delay = receiver._record(self.path, dict(self.headers), body)
                receiver.gate.wait(timeout=30)
                time.sleep(delay)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/redirected")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        return Handler

    def _record(self, path: str, headers: dict, body: bytes) -> tuple[int, float]:
        with self._lock:
            index = len(self.arrived)
            self.arrived.append({"path": path, "headers": {k.lower(): v for k, v in headers.items()},
                                 "body": json.loads(body)})
        status = self.statuses[index] if index < len(self.statuses) else 200
        delay = self.delays[index] if index < len(self.delays) else 0.0
        return status, delay

    def __enter__(self) -> "Receiver":
        # A short poll interval keeps shutdown (and so each test) fast.
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


async def deliver(sender: WebhookSender, url: str, payload: dict = PAYLOAD, trusted: bool = True) -> None:
    """One send, then a drained stop: after it the counters and the receiver's log are final."""
    await sender.start()
    sender.send(url, payload, trusted=trusted)
    await sender.stop(drain_timeout_s=10)


def sender(**kwargs) -> WebhookSender:
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("timeout_s", 2.0)
    return WebhookSender(**kwargs)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- payload ----------------------------------------------------------------------------------


def test_payload_success_keeps_only_url_and_seed():
    results = [
        {"base64": "AAAA", "url": "http://host/files/2024-04-09/x-0.png", "seed": 6289709461860950326,
         "finish_reason": "SUCCESS"},
        {"base64": None, "url": None, "seed": "7", "finish_reason": "SUCCESS"},
        {"url": "http://host/files/2024-04-09/x-2.png", "seed": None, "finish_reason": "SUCCESS"},
    ]
    assert webhook_payload("job-9", results) == {
        "job_id": "job-9",
        "job_result": [
            {"url": "http://host/files/2024-04-09/x-0.png", "seed": "6289709461860950326"},
            {"url": None, "seed": "7"},
            {"url": "http://host/files/2024-04-09/x-2.png", "seed": "-1"},
        ],
    }


def test_payload_error_job_has_empty_result():
    assert webhook_payload("job-err", []) == {"job_id": "job-err", "job_result": []}


# -- delivery ---------------------------------------------------------------------------------


def test_one_post_with_json_body_and_headers(receiver):
    s = sender()
    asyncio.run(deliver(s, receiver.url))
    assert len(receiver.arrived) == 1
    post = receiver.arrived[0]
    assert post["path"] == "/hook"
    assert post["body"] == PAYLOAD
    assert post["headers"]["content-type"] == "application/json"
    assert post["headers"]["user-agent"] == USER_AGENT
    assert (s.delivered, s.failed) == (1, 0)


def test_each_send_is_exactly_one_delivery(receiver):
    s = sender()

    async def scenario():
        await s.start()
        for i in range(5):
            s.send(receiver.url, {"job_id": f"job-{i}", "job_result": []}, trusted=True)
        await s.stop(drain_timeout_s=10)

    asyncio.run(scenario())
    assert sorted(p["body"]["job_id"] for p in receiver.arrived) == [f"job-{i}" for i in range(5)]
    assert (s.delivered, s.failed) == (5, 0)


@pytest.mark.parametrize("status", [500, 503, 429])
def test_retryable_status_retried_until_success(status):
    with Receiver(statuses=[status, status]) as r:
        s = sender(retries=3)
        asyncio.run(deliver(s, r.url))
    assert len(r.arrived) == 3
    assert all(p["body"] == PAYLOAD for p in r.arrived)
    assert (s.delivered, s.failed) == (1, 0)


def test_retries_are_bounded():
    with Receiver(statuses=[500] * 10) as r:
        s = sender(retries=2)
        asyncio.run(deliver(s, r.url))
    assert len(r.arrived) == 3  # the first attempt and 2 retries
    assert (s.delivered, s.failed) == (0, 1)


def test_404_is_not_retried():
    with Receiver(statuses=[404]) as r:
        s = sender(retries=3)
        asyncio.run(deliver(s, r.url))
    assert len(r.arrived) == 1
    assert (s.delivered, s.failed) == (0, 1)


def test_redirect_is_not_followed():
    with Receiver(statuses=[302]) as r:
        s = sender(retries=3)
        asyncio.run(deliver(s, r.url))
    assert [p["path"] for p in r.arrived] == ["/hook"]
    assert (s.delivered, s.failed) == (0, 1)


def test_timeout_is_retried():
    with Receiver(delays=[1.0]) as r:
        s = sender(timeout_s=0.2, retries=3)
        asyncio.run(deliver(s, r.url))
    assert len(r.arrived) == 2
    assert (s.delivered, s.failed) == (1, 0)


def test_connection_refused_is_retried_then_fails():
    with Receiver() as r:
        url = r.url
    # The receiver is closed: nothing listens on its port any more.
    s = sender(retries=2)
    asyncio.run(deliver(s, url))
    assert (s.delivered, s.failed) == (0, 1)


# -- SSRF guard -------------------------------------------------------------------------------


def test_per_request_loopback_url_refused_by_default(receiver, caplog):
    s = sender(allow_private=False)
    with caplog.at_level("WARNING", logger="frontend.webhooks"):
        asyncio.run(deliver(s, receiver.url, trusted=False))
    assert receiver.arrived == []
    assert (s.delivered, s.failed) == (0, 1)
    # Refused by the guard (not by some other error), and the log names the job.
    assert any("refused URL" in r.getMessage() and "job-1" in r.getMessage() for r in caplog.records)


def test_per_request_loopback_url_allowed_with_allow_private(receiver):
    s = sender(allow_private=True)
    asyncio.run(deliver(s, receiver.url, trusted=False))
    assert len(receiver.arrived) == 1
    assert (s.delivered, s.failed) == (1, 0)


def test_trusted_global_url_on_loopback_is_delivered(receiver):
    s = sender(allow_private=False)
    asyncio.run(deliver(s, receiver.url, trusted=True))
    assert len(receiver.arrived) == 1
    assert (s.delivered, s.failed) == (1, 0)


# -- never blocks the caller ------------------------------------------------------------------


def test_send_returns_while_receiver_is_blocked(receiver):
    receiver.gate.clear()  # the receiver holds every request until the test releases it
    s = sender(timeout_s=10)

    async def scenario():
        await s.start()
        assert s.send(receiver.url, PAYLOAD, trusted=True) is None
        # send() returned without yielding to the loop, so nothing can have been posted yet.
        assert receiver.arrived == []
        await wait_until(lambda: len(receiver.arrived) == 1)
        # The delivery is now in flight and stuck in the receiver; the caller is unaffected and
        # can keep sending.
        s.send(receiver.url, {"job_id": "job-2", "job_result": []}, trusted=True)
        await wait_until(lambda: len(receiver.arrived) == 2)
        assert s.delivered == 0
        receiver.gate.set()
        await s.stop(drain_timeout_s=10)

    asyncio.run(scenario())
    assert (s.delivered, s.failed) == (2, 0)


def test_hung_receiver_does_not_hold_up_other_deliveries(receiver):
    receiver.gate.clear()
    s = sender(timeout_s=10, workers=2)

    async def scenario():
        await s.start()
        s.send(receiver.url, PAYLOAD, trusted=True)
        await wait_until(lambda: len(receiver.arrived) == 1)
        with Receiver() as other:
            s.send(other.url, {"job_id": "job-2", "job_result": []}, trusted=True)
            await wait_until(lambda: s.delivered == 1)
            assert [p["body"]["job_id"] for p in other.arrived] == ["job-2"]
        receiver.gate.set()
        await s.stop(drain_timeout_s=10)

    asyncio.run(scenario())
    assert (s.delivered, s.failed) == (2, 0)


def test_stop_gives_up_on_stuck_deliveries(receiver):
    receiver.gate.clear()
    s = sender(timeout_s=10, workers=1)

    async def scenario():
        await s.start()
        s.send(receiver.url, PAYLOAD, trusted=True)
        s.send(receiver.url, PAYLOAD, trusted=True)  # queued behind the stuck one
        await wait_until(lambda: len(receiver.arrived) == 1)
        await s.stop(drain_timeout_s=0.1)
        s.send(receiver.url, PAYLOAD, trusted=True)  # after stop: dropped, not raised

    asyncio.run(scenario())
    assert (s.delivered, s.failed) == (0, 3)
