"""Webhook delivery for finished jobs (contract §4.2).

Fooocus-API posts `{"job_id", "job_result": [{"url", "seed"}]}` to the request's `webhook_url`,
else to `--webhook-url`, once per finished job. This module builds that body and delivers it off
the job path: `send` only enqueues, and a small pool of background tasks does the HTTP work with
bounded retries, so a slow or dead receiver never delays generation. Per-request URLs come from
clients and are checked against SSRF targets before every attempt (issue #280 showed how easily
local addresses leak into webhook traffic); the operator's own URL is trusted.
"""
from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import Callable

import httpx

log = logging.getLogger(__name__)

USER_AGENT = "fooocus-triton-webhook"
# Receivers that are overloaded or briefly down answer with these; anything else 4xx is final.
RETRYABLE_STATUSES = frozenset({429}) | frozenset(range(500, 600))


def webhook_payload(job_id: str, results: list[dict]) -> dict:
    """The exact Fooocus-API webhook body: only url and seed per image, seed as a string.

    An error job has no results, which gives `job_result: []` as upstream does."""
    return {"job_id": job_id, "job_result": [_result_entry(r) for r in results]}


def _result_entry(result: dict) -> dict:
    seed = result.get("seed")
    # Upstream always sends the seed as a string and uses "-1" when it is unknown.
    return {"url": result.get("url") or None, "seed": "-1" if seed in (None, "") else str(seed)}


@dataclass(frozen=True)
class _Delivery:
    url: str
    payload: dict
    trusted: bool

    @property
    def job_id(self) -> str:
        return str(self.payload.get("job_id", "?"))


class _Outcome:
    DELIVERED = "delivered"
    RETRY = "retry"
    FINAL = "final"  # failed in a way another attempt cannot fix


class WebhookSender:
    """Fire-and-forget webhook delivery through a queue and a pool of worker tasks.

    `send` must be called from the event loop's thread (asyncio.Queue is not thread-safe).
    `delivered` and `failed` count finished deliveries, one per `send` call."""

    def __init__(self, timeout_s: float = 15.0, retries: int = 3, backoff_s: float = 1.0,
                 allow_private: bool = False, workers: int = 4, max_queue: int = 1000,
                 client_factory: Callable[[], httpx.AsyncClient] | None = None):
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.allow_private = allow_private
        self.workers = workers
        self.client_factory = client_factory or self._default_client
        self.delivered = 0
        self.failed = 0
        # Bounded so a dead receiver and a busy server cannot grow memory without limit.
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=max_queue)
        self._tasks: list[asyncio.Task] = []
        self._client: httpx.AsyncClient | None = None
        self._stopped = False

    def _default_client(self) -> httpx.AsyncClient:
        # trust_env=False: the connection must go to the host the SSRF check approved, not to a
        # proxy picked up from the environment.
        return httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False, trust_env=False)

    async def start(self) -> None:
        if self._tasks:
            return
        self._stopped = False
        self._client = self.client_factory()
        self._tasks = [asyncio.create_task(self._worker(), name=f"webhook-{i}") for i in range(self.workers)]

    async def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Stop accepting work, give queued deliveries up to `drain_timeout_s`, then cancel the rest."""
        self._stopped = True
        if self._tasks:
            try:
                await asyncio.wait_for(self._queue.join(), drain_timeout_s)
            except asyncio.TimeoutError:
                log.warning("webhook: drain timed out after %.1fs; dropping unfinished deliveries", drain_timeout_s)
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks = []
        self._drop_queued("sender stopped")
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def send(self, url: str, payload: dict, trusted: bool) -> None:
        """Enqueue one delivery and return at once; failures are logged and counted, never raised."""
        delivery = _Delivery(url, payload, trusted)
        if self._stopped:
            self._fail(delivery, "sender is stopped")
            return
        try:
            self._queue.put_nowait(delivery)
        except asyncio.QueueFull:
            self._fail(delivery, f"queue full ({self._queue.maxsize} pending)")

    def _fail(self, delivery: _Delivery, reason: str) -> None:
        self.failed += 1
        log.warning("webhook for job %s to %s failed: %s", delivery.job_id, delivery.url, reason)

    def _drop_queued(self, reason: str) -> None:
        while not self._queue.empty():
            self._fail(self._queue.get_nowait(), reason)
            self._queue.task_done()

    async def _worker(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except asyncio.CancelledError:
                self._fail(delivery, "cancelled at shutdown")
                raise
            except Exception as exc:  # a bug here must not kill the worker and stall later jobs
                log.exception("webhook worker error")
                self._fail(delivery, repr(exc))
            finally:
                self._queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> None:
        reason = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt - 1))
            refusal = await self._refusal(delivery)
            if refusal:
                self._fail(delivery, refusal)
                return
            outcome, reason = await self._attempt(delivery)
            if outcome == _Outcome.DELIVERED:
                self.delivered += 1
                return
            if outcome == _Outcome.FINAL:
                break
            log.info("webhook for job %s: attempt %d failed (%s), retrying", delivery.job_id, attempt + 1, reason)
        self._fail(delivery, reason)

    def _backoff(self, attempt: int) -> float:
        base = self.backoff_s * 2 ** attempt
        # Jitter spreads retries from many jobs so they do not hit a recovering receiver together.
        return base + random.uniform(0, base * 0.1)

    async def _refusal(self, delivery: _Delivery) -> str | None:
        """Why a client-supplied URL may not be called, or None. Checked before every attempt
        because DNS answers can change between attempts."""
        if delivery.trusted:
            return None
        from .netguard import UnsafeURL, check_url_async

        try:
            await check_url_async(delivery.url, allow_private=self.allow_private)
        except UnsafeURL as exc:
            return f"refused URL: {exc}"
        return None

    async def _attempt(self, delivery: _Delivery) -> tuple[str, str]:
        assert self._client is not None, "start() must run before deliveries"
        try:
            # wait_for bounds the whole exchange; httpx's timeout alone is per phase, so a receiver
            # trickling bytes could otherwise hold a worker indefinitely.
            response = await asyncio.wait_for(self._post(delivery), self.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return _Outcome.RETRY, f"timed out after {self.timeout_s}s"
        except httpx.UnsupportedProtocol as exc:
            return _Outcome.FINAL, f"unsupported URL: {exc}"
        except httpx.TransportError as exc:
            return _Outcome.RETRY, f"network error: {exc!r}"
        except (httpx.InvalidURL, ValueError) as exc:
            return _Outcome.FINAL, f"invalid URL: {exc}"
        return self._classify(response.status_code)

    async def _post(self, delivery: _Delivery) -> httpx.Response:
        # Redirects are never followed: a 3xx could point a checked URL at an internal address.
        return await self._client.post(
            delivery.url, json=delivery.payload, follow_redirects=False, timeout=self.timeout_s,
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT})

    @staticmethod
    def _classify(status: int) -> tuple[str, str]:
        if 200 <= status < 300:
            return _Outcome.DELIVERED, f"HTTP {status}"
        if status in RETRYABLE_STATUSES:
            return _Outcome.RETRY, f"HTTP {status}"
        return _Outcome.FINAL, f"HTTP {status}"
