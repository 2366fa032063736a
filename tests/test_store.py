"""JobStore against SQLite and against a real PostgreSQL server (tests/postgres.py): the queue's
guarantees (oldest first, no job claimed twice, admission limit, cancellation, recovery, history)."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
from sqlalchemy import event, update

from frontend.store import ERROR, RUNNING, SUCCESS, WAITING, JobRow, JobStore, now_ms
from tests.postgres import create_database, drop_database


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty database per test: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    url = create_database(request.getfixturevalue("postgres_url"))
    yield url
    drop_database(url)


@pytest.fixture
def store(store_url):
    s = JobStore(store_url)
    yield s
    s.close()


@pytest.fixture
def replica(store_url, store):
    """A second JobStore on the same database: another frontend replica."""
    s = JobStore(store_url)
    yield s
    s.close()


def set_columns(store: JobStore, job_id: str, **values) -> None:
    with store.engine.begin() as conn:
        conn.execute(update(JobRow).where(JobRow.job_id == job_id).values(**values))


def run_threads(n: int, target) -> list:
    """Run target(i) in n threads started together; returns their results in order."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def body(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = target(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


PARAMS = {"prompt": "a cat, ünïcödé ☕", "image_number": 2, "guidance_scale": 4.5, "loras": [["x.safetensors", 0.5]],
          "advanced_params": {"sampler_name": "dpmpp_2m_sde_gpu", "refiner_swap_method": None, "flag": True}}
OPTIONS = {"require_base64": False, "webhook_url": "http://127.0.0.1:9/hook", "save_extension": "png"}
RESULTS = [{"url": "http://127.0.0.1/files/2024-01-01/a.png", "seed": "123", "finish_reason": "SUCCESS"},
           {"url": None, "base64": "iVBORw0KGgo=", "seed": "124", "finish_reason": "SUCCESS"}]


# Basic records and reads


def test_add_get_round_trip(store):
    added = store.add("j1", "Text to Image", PARAMS, OPTIONS, in_queue_mills=1234)
    got = store.get("j1")
    assert got == added
    assert got.job_type == "Text to Image" and got.stage == WAITING and not got.finished
    assert got.params == PARAMS and got.options == OPTIONS and got.results == []
    assert got.in_queue_mills == 1234 and got.progress == 0 and got.owner is None and got.cancel_requested is False
    assert store.get("missing") is None

    assert store.finish("j1", SUCCESS, "SUCCESS", "Finished", RESULTS, progress=100)
    done = store.get("j1")
    assert done.finished and done.stage == SUCCESS and done.finish_reason == "SUCCESS"
    assert done.results == RESULTS and done.progress == 100 and done.status == "Finished" and done.finish_mills > 0
    assert done.params == PARAMS and done.options == OPTIONS


def test_counts_last_job_and_listing(store):
    assert store.count(finished=False) == 0 and store.count(finished=True) == 0
    assert store.last_job_id() is None and store.list(finished=False) == []
    for i in range(1, 7):  # j1 oldest ... j6 newest
        store.add(f"j{i}", "Text to Image", {"i": i}, {}, in_queue_mills=1000 * i)
    store.finish("j2", SUCCESS, "SUCCESS", "Finished", [])
    store.finish("j5", ERROR, "ERROR", "boom", [])
    store.claim_next("w")  # j1 is now RUNNING: still unfinished

    assert store.count(finished=False) == 4 and store.count(finished=True) == 2
    assert store.last_job_id() == "j6"

    def ids(records):
        return [r.job_id for r in records]

    assert ids(store.list(finished=False)) == ["j1", "j3", "j4", "j6"]
    assert ids(store.list(finished=False, newest_first=True)) == ["j6", "j4", "j3", "j1"]
    assert ids(store.list(finished=True)) == ["j2", "j5"]
    assert ids(store.list(finished=True, newest_first=True)) == ["j5", "j2"]
    assert ids(store.list(finished=False, offset=1, limit=2)) == ["j3", "j4"]
    assert ids(store.list(finished=False, offset=3, limit=2)) == ["j6"]
    assert ids(store.list(finished=False, offset=1, limit=2, newest_first=True)) == ["j4", "j3"]
    assert ids(store.list(finished=False, offset=10)) == []
    assert ids(store.list(finished=False, job_id="j3")) == ["j3"]
    assert ids(store.list(finished=True, job_id="j3")) == []  # j3 is not finished
    assert ids(store.list(finished=True, job_id="j5")) == ["j5"]
    assert store.list(finished=True, job_id="j5")[0].status == "boom"


# Claiming


def test_claim_next_takes_oldest_waiting_first(store):
    for job_id, t in (("late", 3000), ("early", 1000), ("middle", 2000)):
        store.add(job_id, "Text to Image", {"id": job_id}, {}, in_queue_mills=t)
    before = now_ms()
    first = store.claim_next("worker-a")
    assert first.job_id == "early" and first.stage == RUNNING and first.owner == "worker-a"
    assert first.params == {"id": "early"}
    assert before <= first.start_mills <= now_ms() and first.heartbeat_mills == first.start_mills
    assert store.get("early") == first
    assert store.claim_next("worker-b").job_id == "middle"
    assert store.claim_next("worker-a").job_id == "late"
    assert store.claim_next("worker-a") is None
    assert [store.get(j).owner for j in ("early", "middle", "late")] == ["worker-a", "worker-b", "worker-a"]


def test_claim_next_on_empty_queue(store):
    assert store.claim_next("w") is None
    store.add("done", "Text to Image", {}, {})
    store.finish("done", SUCCESS, "SUCCESS", "Finished", [])
    assert store.claim_next("w") is None


def test_claim_next_keeps_looking_when_others_take_its_candidates(store, replica):
    """Another replica claims every job this store just selected as a candidate: claim_next must
    go on to the jobs still waiting, not report an empty queue."""
    for i in range(12):
        store.add(f"j{i:02d}", "Text to Image", {}, {}, in_queue_mills=1000 + i)
    raced = []

    def before_execute(conn, cursor, statement, parameters, context, executemany):
        if not raced and statement.lstrip().upper().startswith("UPDATE"):
            raced.extend(replica.claim_next("other").job_id for _ in range(10))

    event.listen(store.engine, "before_cursor_execute", before_execute)
    try:
        claimed = store.claim_next("me")
    finally:
        event.remove(store.engine, "before_cursor_execute", before_execute)
    assert raced == [f"j{i:02d}" for i in range(10)]
    assert claimed is not None and claimed.job_id == "j10" and claimed.owner == "me"
    assert store.get("j10").owner == "me" and store.get("j00").owner == "other"


def test_concurrent_claims_never_hand_a_job_out_twice(store, replica):
    """8 workers (4 per replica) race over 40 waiting jobs: each job is claimed exactly once."""
    jobs = [f"job-{i:02d}" for i in range(40)]
    for i, job_id in enumerate(jobs):
        store.add(job_id, "Text to Image", {"n": i}, {}, in_queue_mills=1000 + i)

    def worker(i: int) -> list[str]:
        s = store if i % 2 == 0 else replica
        owner = f"worker-{i}"
        mine = []
        while (record := s.claim_next(owner)) is not None:
            assert record.owner == owner and record.stage == RUNNING
            mine.append(record.job_id)
        return mine

    per_worker = run_threads(8, worker)
    claims = Counter(job_id for mine in per_worker for job_id in mine)
    assert sorted(claims) == jobs
    assert set(claims.values()) == {1}, {j: n for j, n in claims.items() if n > 1}
    for i, mine in enumerate(per_worker):  # the database agrees about who runs what
        for job_id in mine:
            record = store.get(job_id)
            assert record.stage == RUNNING and record.owner == f"worker-{i}"
    assert store.count(finished=False) == 40 and store.claim_next("late") is None


# Admission


def test_add_if_room_admits_exactly_the_limit_under_concurrency(store):
    accepted = run_threads(10, lambda i: store.add_if_room(f"sub-{i}", "Text to Image", {"i": i}, {}, limit=3))
    admitted = [r for r in accepted if r is not None]
    assert len(admitted) == 3 and all(r.stage == WAITING for r in admitted)
    assert store.count(finished=False) == 3
    assert sorted(r.job_id for r in store.list(finished=False)) == sorted(r.job_id for r in admitted)
    assert store.add_if_room("again", "Text to Image", {}, {}, limit=3) is None

    running = store.claim_next("w")  # a running job still takes room
    assert store.add_if_room("again", "Text to Image", {}, {}, limit=3) is None
    assert store.finish(running.job_id, SUCCESS, "SUCCESS", "Finished", [])
    more = run_threads(5, lambda i: store.add_if_room(f"more-{i}", "Text to Image", {}, {}, limit=3))
    assert sum(r is not None for r in more) == 1
    assert store.count(finished=False) == 3 and store.count(finished=True) == 1


# Progress, heartbeats, cancellation, finishing


def test_progress_and_heartbeat(store):
    store.add("a", "Text to Image", {}, {}, in_queue_mills=1)
    store.add("b", "Text to Image", {}, {}, in_queue_mills=2)
    store.add("waiting", "Text to Image", {}, {}, in_queue_mills=3)
    store.claim_next("w")
    store.claim_next("w")
    set_columns(store, "a", heartbeat_mills=5)
    set_columns(store, "b", heartbeat_mills=5)

    store.progress("a", 42, "Sampling step 5/12 ...")
    a = store.get("a")
    assert a.progress == 42 and a.status == "Sampling step 5/12 ..." and a.heartbeat_mills > 5
    store.progress("waiting", 10, "not running")  # only running jobs take progress
    assert store.get("waiting").progress == 0 and store.get("waiting").status is None

    assert store.heartbeat([]) == set()
    assert store.heartbeat(["b", "unknown"]) == set()
    assert store.get("b").heartbeat_mills > 5
    assert store.request_cancel("b") == ["b"]
    assert store.heartbeat(["a", "b"]) == {"b"}
    assert store.get("b").stage == RUNNING  # the owner ends it


def test_request_cancel_of_a_waiting_job_ends_it_at_once(store):
    store.add("w1", "Text to Image", {}, {})
    assert store.request_cancel("w1") == ["w1"]
    record = store.get("w1")
    assert record.finished and record.stage == ERROR and record.finish_reason == "USER_CANCEL"
    assert record.finish_mills > 0
    assert store.claim_next("w") is None  # never runs
    assert store.request_cancel("w1") == []  # already over
    assert store.request_cancel("unknown") == []


def test_request_cancel_of_a_running_job_only_flags_it(store):
    store.add("r1", "Text to Image", {}, {}, in_queue_mills=1)
    store.add("r2", "Text to Image", {}, {}, in_queue_mills=2)
    store.claim_next("w")
    store.claim_next("w")
    assert store.request_cancel("r1") == ["r1"]
    r1 = store.get("r1")
    assert r1.stage == RUNNING and r1.cancel_requested and r1.finish_reason is None
    assert store.get("r2").cancel_requested is False
    assert store.finish("r1", ERROR, "USER_CANCEL", "Cancelled", [])
    assert store.get("r1").finish_reason == "USER_CANCEL"


def test_request_cancel_all_flags_every_running_job(store):
    for i in range(4):
        store.add(f"j{i}", "Text to Image", {}, {}, in_queue_mills=1 + i)
    store.claim_next("w1")
    store.claim_next("w2")  # j0, j1 running; j2, j3 waiting
    store.add("done", "Text to Image", {}, {}, in_queue_mills=10)
    store.finish("done", SUCCESS, "SUCCESS", "Finished", [])

    assert sorted(store.request_cancel(None)) == ["j0", "j1"]
    for job_id in ("j0", "j1"):
        record = store.get(job_id)
        assert record.stage == RUNNING and record.cancel_requested
    for job_id in ("j2", "j3"):
        record = store.get(job_id)
        assert record.stage == WAITING and not record.cancel_requested
    assert store.get("done").cancel_requested is False and store.get("done").stage == SUCCESS


def test_finish_applies_once(store):
    store.add("j", "Text to Image", {}, {})
    store.claim_next("w")
    assert store.finish("j", SUCCESS, "SUCCESS", "Finished", RESULTS, progress=100)
    assert not store.finish("j", ERROR, "ERROR", "late failure", [], progress=3)
    record = store.get("j")
    assert record.stage == SUCCESS and record.finish_reason == "SUCCESS" and record.status == "Finished"
    assert record.results == RESULTS and record.progress == 100
    assert not store.finish("unknown", SUCCESS, "SUCCESS", "Finished", [])


def test_finish_of_a_waiting_job_and_progress_kept_when_not_given(store):
    store.add("w", "Text to Image", {}, {}, in_queue_mills=1)
    assert store.finish("w", ERROR, "ERROR", "rejected", [])
    assert store.get("w").stage == ERROR and store.claim_next("x") is None
    store.add("r", "Text to Image", {}, {}, in_queue_mills=2)
    store.claim_next("x")
    store.progress("r", 55, "half")
    assert store.finish("r", ERROR, "ERROR", "failed", [])
    assert store.get("r").progress == 55


def test_concurrent_finish_and_cancel_end_a_job_once(store, replica):
    store.add("j", "Text to Image", {}, {})
    store.claim_next("w")
    outcomes = run_threads(6, lambda i: (store if i % 2 else replica).finish(
        "j", SUCCESS if i % 2 else ERROR, "SUCCESS" if i % 2 else "USER_CANCEL", f"by {i}", []))
    assert sum(outcomes) == 1
    winner = outcomes.index(True)
    assert store.get("j").status == f"by {winner}"


# Recovery


def test_recover(store):
    for i, job_id in enumerate(("mine", "theirs-fresh", "theirs-stale", "waiting", "done")):
        store.add(job_id, "Text to Image", {}, {}, in_queue_mills=1 + i)
    store.claim_next("me")
    store.claim_next("them")
    store.claim_next("them")
    store.finish("done", SUCCESS, "SUCCESS", "Finished", RESULTS)  # never claimed: ended from WAITING
    set_columns(store, "theirs-stale", heartbeat_mills=now_ms() - 120_000)
    set_columns(store, "mine", heartbeat_mills=now_ms())  # fresh, but its owner restarted

    assert sorted(store.recover("me", stale_after_ms=60_000)) == ["mine", "theirs-stale"]
    for job_id in ("mine", "theirs-stale"):
        record = store.get(job_id)
        assert record.stage == ERROR and record.finished and record.finish_reason == "ERROR"
        assert "interrupt" in record.status.lower() and record.finish_mills > 0
    fresh = store.get("theirs-fresh")
    assert fresh.stage == RUNNING and fresh.owner == "them"
    assert store.get("waiting").stage == WAITING
    done = store.get("done")
    assert done.stage == SUCCESS and done.results == RESULTS and done.status == "Finished"

    assert store.recover("me", stale_after_ms=60_000) == []  # nothing left to recover
    assert store.claim_next("me").job_id == "waiting"  # interrupted jobs are not re-run
    assert store.claim_next("me") is None


# History


def test_trim_history_keeps_the_newest_finished(store):
    for i in range(6):
        job_id = f"f{i}"
        store.add(job_id, "Text to Image", {}, {}, in_queue_mills=100 + i)
        store.finish(job_id, SUCCESS, "SUCCESS", "Finished", [{"url": f"http://x/{job_id}.png", "seed": str(i)}])
        set_columns(store, job_id, finish_mills=10_000 + 1000 * i)  # f5 newest
    store.add("waiting", "Text to Image", {}, {}, in_queue_mills=1)  # older than every finished job
    store.add("running", "Text to Image", {}, {}, in_queue_mills=2)
    store.claim_next("w")
    store.claim_next("w")

    assert store.trim_history(10) == []
    removed = store.trim_history(2)
    assert sorted(r.job_id for r in removed) == ["f0", "f1", "f2", "f3"]
    for r in removed:  # the records come back with their results, so their files can be deleted
        assert r.results == [{"url": f"http://x/{r.job_id}.png", "seed": r.job_id[1:]}]
        assert store.get(r.job_id) is None
    assert sorted(r.job_id for r in store.list(finished=True)) == ["f4", "f5"]
    assert sorted(r.job_id for r in store.list(finished=False)) == ["running", "waiting"]
    assert store.trim_history(2) == []

    assert [r.job_id for r in store.trim_history(0)] == ["f5", "f4"]
    assert store.count(finished=True) == 0 and store.count(finished=False) == 2


def test_delete(store):
    store.add("j", "Text to Image", PARAMS, OPTIONS)
    store.finish("j", SUCCESS, "SUCCESS", "Finished", RESULTS)
    store.add("other", "Text to Image", {}, {})
    record = store.delete("j")
    assert record.job_id == "j" and record.results == RESULTS and record.params == PARAMS
    assert store.get("j") is None and store.delete("j") is None
    assert store.get("other") is not None and store.count(finished=False) == 1


def test_jobs_survive_a_new_store_on_the_same_database(store_url, store):
    store.add("persist", "Text to Image", PARAMS, OPTIONS, in_queue_mills=7)
    store.close()
    again = JobStore(store_url)
    try:
        assert again.get("persist").params == PARAMS
        assert again.claim_next("w").job_id == "persist"
    finally:
        again.close()
