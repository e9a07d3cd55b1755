"""A throwaway Postgres server for the tests: a real cluster (`initdb`, `pg_ctl`) in a
temporary folder, on a free loopback port, with a random password (no other local user gets
in), removed afterwards. No Docker.

The binaries come from the machine's PostgreSQL (`.ci/run` installs Debian's `postgresql`
when `pg_ctl` is missing). `initdb` refuses to run as root, so under root the cluster runs as
the unprivileged `postgres` user that the package creates. A machine without PostgreSQL fails
the tests that need it, with the fix in the message: they are never skipped.

`CRISP_PIPELINE_TEST_POSTGRES_URL` points the tests at a server of your own instead (each test
works in a database it creates and drops).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from crisp_pipeline.state.locks import pid_alive

SERVER_URL_ENV = "CRISP_PIPELINE_TEST_POSTGRES_URL"
USER = "crisp"


class PostgresMissing(RuntimeError):
    pass


def bin_dir() -> Path:
    """Where `initdb` and `pg_ctl` are: on the PATH, or Debian's versioned folder."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    raise PostgresMissing(
        "the Postgres tests need a PostgreSQL server's binaries (initdb, pg_ctl) and found "
        "none: install them (Debian/Ubuntu: `apt-get install postgresql`; `.ci/run` does) or "
        f"set {SERVER_URL_ENV} to a server of your own")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class PostgresServer:
    url: str  # a superuser's URL to the `postgres` database

    def database_url(self, name: str) -> str:
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    @contextmanager
    def database(self) -> Iterator[str]:
        """A fresh database for one test; its URL."""
        import adbc_driver_postgresql.dbapi as pg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with pg.connect(self.url, autocommit=True) as connection, connection.cursor() as cur:
            cur.execute(f"create database {name}")
        try:
            yield self.database_url(name)
        finally:
            with pg.connect(self.url, autocommit=True) as connection, \
                    connection.cursor() as cur:
                cur.execute(f"drop database if exists {name} with (force)")


PREFIX = "crisp-pg-"


def _stop_orphans(binaries: Path) -> None:
    """Servers whose test process died without stopping them (a SIGKILL: `pg_ctl` detaches
    the server) are stopped and their folders removed."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            owner = int((folder / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if pid_alive(owner):
            continue
        if (folder / "data" / "postmaster.pid").exists():
            subprocess.run([str(binaries / "pg_ctl"), "-D", str(folder / "data"), "-m",
                            "immediate", "-w", "stop"], check=False, capture_output=True,
                           timeout=60, **({"user": "postgres"} if os.geteuid() == 0 else {}))
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def throwaway_server() -> Iterator[PostgresServer]:
    """A running server for the block (or the one `CRISP_PIPELINE_TEST_POSTGRES_URL` names)."""
    if os.environ.get(SERVER_URL_ENV):
        yield PostgresServer(os.environ[SERVER_URL_ENV])
        return
    binaries = bin_dir()
    _stop_orphans(binaries)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX))
    (folder / "owner.pid").write_text(str(os.getpid()))
    data = folder / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the package's unprivileged user runs it
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresMissing("running as root, the Postgres tests need the unprivileged "
                                  "`postgres` user that Debian's package creates") from None
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    # password authentication, on loopback only: no other local user gets in while it runs
    password = secrets.token_urlsafe(18)
    (folder / "password").write_text(password)
    if run_as:
        os.chown(folder / "password", owner.pw_uid, owner.pw_gid)

    def run(*command: str) -> None:
        done = subprocess.run([*run_as, *command], check=False, capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise RuntimeError(f"{Path(command[0]).name} failed: {done.stderr or done.stdout}")
    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256",
            f"--pwfile={folder / 'password'}", "--encoding=UTF8", "--locale=C.UTF-8",
            "--no-sync")
        for attempt in range(5):  # a free port may be taken before the server binds it
            port = _free_port()
            try:
                run(str(binaries / "pg_ctl"), "-D", str(data), "-l",
                    str(folder / "server.log"), "-w", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off "
                    "-c full_page_writes=off -c max_connections=100 "
                    "-c unix_socket_permissions=0700", "start")
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        try:
            yield PostgresServer(f"postgresql://{USER}:{password}@127.0.0.1:{port}/postgres")
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
