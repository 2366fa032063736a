"""A throwaway PostgreSQL server on 127.0.0.1 for the test session (Debian's `postgresql` package).

`postgres_session()` finds Debian's server binaries (/usr/lib/postgresql/<version>/bin), installing
the package with apt-get when they are missing, initialises a cluster in a fresh temporary folder
(trust authentication, listening only on 127.0.0.1 at a free port, its socket in that folder),
starts it, creates a database and yields its SQLAlchemy URL; at the end it stops the server and
deletes the folder. PostgreSQL refuses to run as root, so under root the server runs as the
`postgres` system user (created by the package) through runuser.

When PostgreSQL cannot be installed or started the fixture fails if the environment variable CI is
set (CI must test both backends) and skips, with the reason, otherwise."""
from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ROOT = Path("/usr/lib/postgresql")
APT_TIMEOUT_S = 600  # each apt-get step; under pytest-timeout (900 s per test, set-up included)
START_ATTEMPTS = 3


class PostgresUnavailable(RuntimeError):
    pass


def _version_key(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.]", path.parent.name))


def find_bindir() -> Path | None:
    """The newest Debian server installation (never /usr/local/bin: that may be something else)."""
    candidates = [b for b in PG_ROOT.glob("*/bin") if (b / "initdb").is_file() and (b / "pg_ctl").is_file()
                  and (b / "postgres").is_file()]
    return max(candidates, key=_version_key) if candidates else None


def _run(cmd: list[str], timeout: float, env: dict | None = None, user: str | None = None) -> subprocess.CompletedProcess:
    if user is not None:
        cmd = ["runuser", "-u", user, "--", *cmd]
    try:
        return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError as exc:
        raise PostgresUnavailable(f"cannot run {cmd[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise PostgresUnavailable(f"{' '.join(cmd)} timed out after {timeout:.0f} s") from exc


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-3000:]
        raise PostgresUnavailable(f"{what} failed (exit {proc.returncode}):\n{tail}")


def _main_cluster_online() -> set[tuple[str, str]]:
    """(version, name) of the Debian clusters that run now (pg_lsclusters, from postgresql-common)."""
    if shutil.which("pg_lsclusters") is None:
        return set()
    proc = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    online = set()
    for line in proc.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[3].startswith("online"):
            online.add((fields[0], fields[1]))
    return online


def install_postgresql() -> None:
    """apt-get install Debian's `postgresql`, then stop any cluster the installation started (ours
    uses its own folder and port)."""
    if shutil.which("apt-get") is None:
        raise PostgresUnavailable("PostgreSQL is not installed and there is no apt-get to install it")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise PostgresUnavailable("PostgreSQL is not installed, and installing it needs root (or sudo)")
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    before = _main_cluster_online()
    _check(_run([*prefix, "apt-get", "update"], APT_TIMEOUT_S, env=env), "apt-get update")
    _check(_run([*prefix, "apt-get", "install", "-y", "--no-install-recommends", "postgresql"], APT_TIMEOUT_S,
                env=env), "apt-get install postgresql")
    for version, name in _main_cluster_online() - before:  # started by the package's postinst
        subprocess.run([*prefix, "pg_ctlcluster", version, name, "stop"], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One initdb'd cluster in a temporary folder, started with pg_ctl on 127.0.0.1."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.user: str | None = None  # the system user to run as (None: the current one)
        if os.geteuid() == 0:
            try:
                self.pw = pwd.getpwnam("postgres")
            except KeyError as exc:
                raise PostgresUnavailable("running as root, but there is no `postgres` system user to run "
                                          "PostgreSQL as (Debian's package creates it)") from exc
            if shutil.which("runuser") is None:
                raise PostgresUnavailable("running as root, but runuser (util-linux) is missing")
            self.user = "postgres"
        # Under root the folder must be reachable by `postgres`: /tmp, not a private TMPDIR.
        parent = "/tmp" if self.user and Path("/tmp").is_dir() else None
        self.root = Path(tempfile.mkdtemp(prefix="pytest-postgres-", dir=parent))
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "server.log"
        self.port = 0
        self.running = False
        self.socket_dir.mkdir()
        if self.user:
            for p in (self.root, self.socket_dir):
                os.chown(p, self.pw.pw_uid, self.pw.pw_gid)

    def _pg(self, tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return _run([str(self.bindir / tool), *args], timeout, env=env, user=self.user)

    def start(self) -> "PostgresServer":
        _check(self._pg("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                        "--locale=C", "--no-sync", timeout=300), "initdb")
        last = ""
        for _ in range(START_ATTEMPTS):  # another process may take the free port before the server does
            self.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} -c max_connections=300 "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            proc = self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options,
                            "start")
            if proc.returncode == 0:
                self.running = True
                return self
            last = (proc.stdout + proc.stderr).strip() + "\n" + self._log_tail()
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        raise PostgresUnavailable(f"pg_ctl start failed {START_ATTEMPTS} times; last:\n{last[-3000:]}")

    def _log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.running:
            proc = self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
            if proc.returncode != 0:
                self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
            self.running = False
        shutil.rmtree(self.root, ignore_errors=True)


def _admin_connect(url: str):
    """An autocommit psycopg connection to the `postgres` database of the server at `url`."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg.connect(host=u.host, port=u.port, user=u.username, dbname="postgres", autocommit=True,
                           connect_timeout=10)


def create_database(url: str, name: str | None = None) -> str:
    """A new, empty database on the server of `url`; returns its URL."""
    from sqlalchemy.engine import make_url

    name = name or f"t_{uuid.uuid4().hex[:16]}"
    with _admin_connect(url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    with _admin_connect(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_postgres() -> PostgresServer:
    bindir = find_bindir()
    if bindir is None:
        install_postgresql()
        bindir = find_bindir()
        if bindir is None:
            raise PostgresUnavailable(f"apt-get installed `postgresql`, but there is no {PG_ROOT}/<version>/bin/initdb")
    server = PostgresServer(bindir)
    try:
        server.start()
        deadline = time.monotonic() + 30
        while True:  # pg_ctl -w waited for the socket; make sure TCP on loopback answers too
            try:
                create_database(server.url(), "fooocus_test")
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise PostgresUnavailable(f"PostgreSQL started but does not answer on 127.0.0.1:{server.port}: "
                                              f"{exc}\n{server._log_tail()}") from exc
                time.sleep(0.2)
    except BaseException:
        server.stop()
        raise
    return server


def postgres_session() -> Iterator[str]:
    """Body of the session fixture `postgres_url`: the URL of a fresh database on a private server."""
    try:
        server = start_postgres()
    except PostgresUnavailable as exc:
        server, message = None, f"PostgreSQL is unavailable: {exc}"
    if server is None:
        if os.environ.get("CI"):
            pytest.fail(message + "\n(CI is set: the PostgreSQL tests must run, not be skipped)", pytrace=False)
        pytest.skip(message)
    try:
        yield server.url("fooocus_test")
    finally:
        server.stop()
