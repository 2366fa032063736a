"""Job persistence with SQLAlchemy: SQLite by default, any SQLAlchemy URL (PostgreSQL when several
frontend replicas share one queue).

The `jobs` table is the queue: a job is WAITING until a worker claims it with a conditional
UPDATE (so two workers, or two replicas, never run the same job), RUNNING while its owner sends
heartbeats, and SUCCESS or ERROR at the end. Every state change is committed before it is
reported, so a job accepted by the API survives a frontend restart."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, Integer, String, Text, create_engine, delete, event,
                        func, or_, select, update)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

WAITING, RUNNING, SUCCESS, ERROR = "WAITING", "RUNNING", "SUCCESS", "ERROR"
UNFINISHED = (WAITING, RUNNING)


def now_ms() -> int:
    return int(time.time() * 1000)


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_type: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(16), index=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str | None] = mapped_column(Text, nullable=True)
    params: Mapped[dict] = mapped_column(JSON)
    options: Mapped[dict] = mapped_column(JSON, default=dict)  # require_base64, webhook_url, save_* ...
    results: Mapped[list] = mapped_column(JSON, default=list)
    in_queue_mills: Mapped[int] = mapped_column(BigInteger, index=True)
    start_mills: Mapped[int] = mapped_column(BigInteger, default=0)
    finish_mills: Mapped[int] = mapped_column(BigInteger, default=0)
    heartbeat_mills: Mapped[int] = mapped_column(BigInteger, default=0)
    owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    job_type: str
    stage: str
    finish_reason: str | None
    progress: int
    status: str | None
    params: dict
    options: dict
    results: list
    in_queue_mills: int
    start_mills: int
    finish_mills: int
    heartbeat_mills: int
    owner: str | None
    cancel_requested: bool

    @property
    def finished(self) -> bool:
        return self.stage not in UNFINISHED


def _record(row: JobRow) -> JobRecord:
    return JobRecord(**{f: getattr(row, f) for f in JobRecord.__dataclass_fields__})


class JobStore:
    def __init__(self, url: str):
        kwargs: dict[str, Any] = {"future": True}
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            @event.listens_for(self.engine, "connect")
            def _sqlite_pragmas(conn, _record):  # WAL: readers never block the writer
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        Base.metadata.create_all(self.engine)
        self.session = sessionmaker(self.engine, expire_on_commit=False)
        self._admission = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    # Writes

    def add(self, job_id: str, job_type: str, params: dict, options: dict, in_queue_mills: int | None = None) -> JobRecord:
        row = JobRow(job_id=job_id, job_type=job_type, stage=WAITING, progress=0, params=params, options=options,
                     results=[], in_queue_mills=in_queue_mills or now_ms(), cancel_requested=False)
        with self.session.begin() as s:
            s.add(row)
        return _record(row)

    def add_if_room(self, job_id: str, job_type: str, params: dict, options: dict, limit: int) -> JobRecord | None:
        """Admission: insert unless `limit` jobs are already waiting or running. Serialised in this
        process; across replicas the limit is per-check, so it can be exceeded by concurrent
        submissions to different replicas by at most one job each."""
        with self._admission, self.session.begin() as s:
            if s.scalar(select(func.count()).select_from(JobRow).where(JobRow.stage.in_(UNFINISHED))) >= limit:
                return None
            row = JobRow(job_id=job_id, job_type=job_type, stage=WAITING, progress=0, params=params,
                         options=options, results=[], in_queue_mills=now_ms(), cancel_requested=False)
            s.add(row)
        return _record(row)

    def claim_next(self, owner: str) -> JobRecord | None:
        """The oldest WAITING job, now RUNNING and owned by `owner`; None if there is none."""
        with self.session() as s:
            while True:
                candidates = s.scalars(select(JobRow.job_id).where(JobRow.stage == WAITING)
                                       .order_by(JobRow.in_queue_mills, JobRow.job_id).limit(8)).all()
                s.commit()
                if not candidates:
                    return None
                for job_id in candidates:
                    t = now_ms()
                    claimed = s.execute(update(JobRow).where(JobRow.job_id == job_id, JobRow.stage == WAITING)
                                        .values(stage=RUNNING, owner=owner, start_mills=t,
                                                heartbeat_mills=t)).rowcount
                    s.commit()
                    if claimed == 1:
                        return _record(s.get(JobRow, job_id, populate_existing=True))
                # Every candidate went to other workers (which therefore made progress): look again.

    def progress(self, job_id: str, progress: int, status: str | None) -> None:
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.job_id == job_id, JobRow.stage == RUNNING)
                      .values(progress=progress, status=status, heartbeat_mills=now_ms()))

    def heartbeat(self, job_ids: list[str]) -> set[str]:
        """Refresh running jobs' heartbeats; returns those whose cancellation was requested."""
        if not job_ids:
            return set()
        with self.session.begin() as s:
            s.execute(update(JobRow).where(JobRow.job_id.in_(job_ids), JobRow.stage == RUNNING)
                      .values(heartbeat_mills=now_ms()))
            return set(s.scalars(select(JobRow.job_id).where(JobRow.job_id.in_(job_ids),
                                                              JobRow.cancel_requested.is_(True))))

    def finish(self, job_id: str, stage: str, finish_reason: str, status: str | None, results: list,
               progress: int | None = None) -> bool:
        values = dict(stage=stage, finish_reason=finish_reason, status=status, results=results,
                      finish_mills=now_ms())
        if progress is not None:
            values["progress"] = progress
        with self.session.begin() as s:
            return s.execute(update(JobRow).where(JobRow.job_id == job_id, JobRow.stage.in_(UNFINISHED))
                             .values(**values)).rowcount == 1

    def request_cancel(self, job_id: str | None = None) -> list[str]:
        """Cancel one job (or every running job when job_id is None). A WAITING job ends at once as
        USER_CANCEL; a RUNNING one is flagged for its owner. Returns the ids affected."""
        with self.session.begin() as s:
            where = [JobRow.job_id == job_id] if job_id else [JobRow.stage == RUNNING]
            ids = list(s.scalars(select(JobRow.job_id).where(JobRow.stage.in_(UNFINISHED), *where)))
            if job_id:
                s.execute(update(JobRow).where(JobRow.job_id == job_id, JobRow.stage == WAITING).values(
                    stage=ERROR, finish_reason="USER_CANCEL", status="Cancelled", finish_mills=now_ms()))
            s.execute(update(JobRow).where(JobRow.job_id.in_(ids), JobRow.stage == RUNNING)
                      .values(cancel_requested=True))
        return ids

    def recover(self, owner: str, stale_after_ms: int) -> list[str]:
        """At start: RUNNING jobs of this owner (it restarted) or with a stale heartbeat (their
        frontend died) end as ERROR; they are not re-run, so no job runs twice."""
        cutoff = now_ms() - stale_after_ms
        with self.session.begin() as s:
            ids = list(s.scalars(select(JobRow.job_id).where(
                JobRow.stage == RUNNING, or_(JobRow.owner == owner, JobRow.heartbeat_mills < cutoff))))
            if ids:
                s.execute(update(JobRow).where(JobRow.job_id.in_(ids), JobRow.stage == RUNNING).values(
                    stage=ERROR, finish_reason="ERROR", finish_mills=now_ms(),
                    status="Interrupted: the frontend running this job stopped before it finished"))
        return ids

    def delete(self, job_id: str) -> JobRecord | None:
        with self.session.begin() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                return None
            record = _record(row)
            s.delete(row)
        return record

    def trim_history(self, keep: int) -> list[JobRecord]:
        """Delete the oldest finished jobs beyond the newest `keep`; returns them (their files go too)."""
        with self.session.begin() as s:
            rows = s.scalars(select(JobRow).where(JobRow.stage.notin_(UNFINISHED))
                             .order_by(JobRow.finish_mills.desc(), JobRow.in_queue_mills.desc())
                             .offset(keep)).all()
            records = [_record(r) for r in rows]
            if rows:
                s.execute(delete(JobRow).where(JobRow.job_id.in_([r.job_id for r in rows])))
        return records

    # Reads

    def get(self, job_id: str) -> JobRecord | None:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            return _record(row) if row else None

    def count(self, finished: bool) -> int:
        cond = JobRow.stage.notin_(UNFINISHED) if finished else JobRow.stage.in_(UNFINISHED)
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(JobRow).where(cond))

    def count_by_stage(self) -> dict[str, int]:
        """Waiting and running jobs by stage (the queue depth)."""
        with self.session() as s:
            rows = s.execute(select(JobRow.stage, func.count()).where(JobRow.stage.in_(UNFINISHED))
                             .group_by(JobRow.stage)).all()
        return {WAITING: 0, RUNNING: 0, **{stage: n for stage, n in rows}}

    def last_job_id(self) -> str | None:
        with self.session() as s:
            return s.scalar(select(JobRow.job_id).order_by(JobRow.in_queue_mills.desc()).limit(1))

    def list(self, finished: bool, job_id: str | None = None, offset: int = 0, limit: int | None = None,
             newest_first: bool = False) -> list[JobRecord]:
        cond = JobRow.stage.notin_(UNFINISHED) if finished else JobRow.stage.in_(UNFINISHED)
        order = JobRow.in_queue_mills.desc() if newest_first else JobRow.in_queue_mills
        q = select(JobRow).where(cond).order_by(order).offset(offset)
        if job_id:
            q = q.where(JobRow.job_id == job_id)
        if limit is not None:
            q = q.limit(limit)
        with self.session() as s:
            return [_record(r) for r in s.scalars(q)]
