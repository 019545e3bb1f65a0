"""A throw-away local PostgreSQL server for tests (``initdb`` + ``pg_ctl`` on a free loopback port).

PostgreSQL refuses to run as root; as root the server runs as ``nobody`` (via ``runuser``).
Tests that need it skip with the reason when the binaries are missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalPostgres:
    def __init__(self):
        missing = [b for b in ("initdb", "pg_ctl", "postgres") if shutil.which(b) is None]
        if missing:
            pytest.skip(f"PostgreSQL binaries {missing} not on PATH; install PostgreSQL to run the shared-state tests")
        self.dir = tempfile.mkdtemp(prefix="rsgm_pg_")
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                pytest.skip("running as root without runuser; PostgreSQL cannot start as root")
            shutil.chown(self.dir, "nobody")
            os.chmod(self.dir, 0o755)
            self.prefix = ["runuser", "-u", "nobody", "--"]
        self.port = _free_port()
        data = os.path.join(self.dir, "data")
        self._run(["initdb", "-D", data, "-U", "rsgm", "--auth=trust", "-E", "UTF8"])
        self._run(["pg_ctl", "-D", data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "120", "start",
                   "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off"])
        self.data = data
        self.url = f"postgresql://rsgm@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str]) -> None:
        res = subprocess.run(self.prefix + cmd, capture_output=True, text=True, timeout=180)
        if res.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {res.stdout[-500:]} {res.stderr[-500:]}")

    def stop(self) -> None:
        try:
            self._run(["pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url():
    pg = LocalPostgres()
    yield pg.url
    pg.stop()


@pytest.fixture
def postgres_db(postgres_url):
    """A fresh database on the session's server (each test starts from an empty state store)."""
    import uuid

    import psycopg

    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_url, autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    yield postgres_url.rsplit("/", 1)[0] + "/" + name
