"""Persistent per-user B4B state behind one small interface, with two backends.

``open_store(url, lsh)`` returns a :class:`StateStore`:

* a file path or ``sqlite:///path``: :class:`SQLiteStore` (default, one machine).  Each batch is
  one ``BEGIN IMMEDIATE`` transaction; SQLite grants the write lock to one connection at a time
  across threads and processes, so no update is lost.
* ``postgresql://...``: :class:`PostgresStore` (several replicas share one state).  Each batch is
  one transaction that locks the user's row (``SELECT ... FOR UPDATE``), so concurrent replicas
  serialise per user and no update is lost.

``record(user, bucket_ids, price)`` is the only write.  Inside the transaction it marks the
buckets, computes the new coverage, calls ``price(coverage) -> sigma`` and checks the result; only
then does it write and commit.  A request that fails (bad price, dead connection) changes
nothing, so nobody is charged for an answer they did not get.  State lives in the database, so a
restart never resets anyone's coverage.  The LSH fingerprint is stored too: a store written under
another hash is refused.
"""
from __future__ import annotations

import math
import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rsgm.defenses.lsh import LSHCoverage


@dataclass(frozen=True)
class UserState:
    user_id: str
    n_queries: int
    coverage: float
    occupied: int = 0


@dataclass(frozen=True)
class Charge:
    state: UserState
    sigma: float


class StateStore(ABC):
    """The user-state interface the defence needs."""

    lsh: LSHCoverage

    def _check_ids(self, bucket_ids: torch.Tensor) -> None:
        if bucket_ids.ndim != 2 or bucket_ids.shape[1] != self.lsh.n_proj or bucket_ids.shape[0] == 0:
            raise ValueError(f"bucket ids must have shape [n >= 1, {self.lsh.n_proj}], got {tuple(bucket_ids.shape)}")

    def _update(self, user_id: str, row, bucket_ids: torch.Tensor, price: Callable[[float], float] | None):
        """(new n_queries, new blob, Charge) from the stored row; raises before anything is written."""
        state = self.lsh.empty_state() if row is None else self.lsh.unpack(bytes(row[1]))
        n_queries = (0 if row is None else int(row[0])) + int(bucket_ids.shape[0])
        self.lsh.mark(state, bucket_ids)
        cov = self.lsh.coverage(state)
        sigma = 0.0 if price is None else float(price(cov))
        if not (math.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"the cost function gave sigma={sigma} at coverage {cov}; nothing was charged")
        st = UserState(user_id, n_queries, cov, self.lsh.occupied(state))
        return n_queries, self.lsh.pack(state), Charge(st, sigma)

    def _state(self, user_id: str, row) -> UserState:
        if row is None:
            return UserState(user_id, 0, 0.0, 0)
        bits = self.lsh.unpack(bytes(row[1]))
        return UserState(user_id, int(row[0]), self.lsh.coverage(bits), self.lsh.occupied(bits))

    @abstractmethod
    def record(self, user_id: str, bucket_ids: torch.Tensor, price: Callable[[float], float] | None = None) -> Charge:
        """Atomically add one batch (bucket ids [n, n_proj]) to the user's state and price it."""

    @abstractmethod
    def get(self, user_id: str) -> UserState:
        """Current state of a user (zero coverage for a user never seen)."""

    @abstractmethod
    def users(self) -> list[str]: ...

    @abstractmethod
    def close(self) -> None: ...


class _PerThread:
    """One connection per (thread, process): sqlite3/psycopg connections cross neither."""

    def __init__(self, connect: Callable):
        self._connect, self._local = connect, threading.local()

    def get(self):
        con = getattr(self._local, "con", None)
        if con is None or self._local.pid != os.getpid():
            con = self._connect()
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            con.close()
        self._local.con = None


class SQLiteStore(StateStore):
    """SQLite file holding one row per user; safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike, lsh: LSHCoverage, timeout_s: float = 60.0):
        self.path, self.lsh, self.timeout_s = Path(path), lsh, timeout_s
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"folder {self.path.parent} for the B4B state store does not exist; create it or change state_path")
        self._cons = _PerThread(self._open)
        con = self._cons.get()
        con.execute("PRAGMA journal_mode=WAL")
        with self._tx(con):
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute("CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, n_queries INTEGER NOT NULL, bitsets BLOB NOT NULL)")
            row = con.execute("SELECT value FROM meta WHERE key = 'lsh'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('lsh', ?)", (lsh.fingerprint(),))
            elif row[0] != lsh.fingerprint():
                raise ValueError(f"state store {self.path} was written with LSH {row[0]}, not {lsh.fingerprint()}; "
                                 "keep the LSH settings of that store or point state_path to a new file")

    def _open(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=True)
        # WAL + NORMAL: commits survive process crashes and restarts without an fsync per batch
        con.execute("PRAGMA synchronous=NORMAL")
        return con

    class _tx:
        def __init__(self, con):
            self.con = con

        def __enter__(self):
            self.con.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type, *_):
            self.con.execute("ROLLBACK" if exc_type else "COMMIT")

    def record(self, user_id, bucket_ids, price=None) -> Charge:
        self._check_ids(bucket_ids)
        con = self._cons.get()
        with self._tx(con):
            row = con.execute("SELECT n_queries, bitsets FROM users WHERE user_id = ?", (user_id,)).fetchone()
            n, blob, charge = self._update(user_id, row, bucket_ids, price)
            con.execute("INSERT INTO users VALUES (?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET n_queries = excluded.n_queries, "
                        "bitsets = excluded.bitsets", (user_id, n, blob))
        return charge

    def get(self, user_id: str) -> UserState:
        return self._state(user_id, self._cons.get().execute("SELECT n_queries, bitsets FROM users WHERE user_id = ?", (user_id,)).fetchone())

    def users(self) -> list[str]:
        return [r[0] for r in self._cons.get().execute("SELECT user_id FROM users ORDER BY user_id")]

    def close(self) -> None:
        self._cons.close()


UserStateStore = SQLiteStore  # the name earlier code and tests use


class PostgresStore(StateStore):
    """PostgreSQL (psycopg 3); one row-locking transaction per batch, shared by any number of replicas."""

    def __init__(self, url: str, lsh: LSHCoverage, table_prefix: str = "b4b"):
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("state URL is postgresql://... but psycopg is not installed; pip install 'psycopg[binary]'") from None
        self.url, self.lsh, self._psycopg = url, lsh, psycopg
        if not table_prefix.isidentifier():
            raise ValueError(f"table_prefix must be an identifier, got {table_prefix!r}")
        self.users_t, self.meta_t = f"{table_prefix}_users", f"{table_prefix}_meta"
        self._cons = _PerThread(lambda: psycopg.connect(url, autocommit=False))
        con = self._cons.get()
        with con.transaction():
            con.execute("SELECT pg_advisory_xact_lock(7424242)")  # concurrent replicas create the tables once
            con.execute(f"CREATE TABLE IF NOT EXISTS {self.meta_t} (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute(f"CREATE TABLE IF NOT EXISTS {self.users_t} (user_id TEXT PRIMARY KEY, n_queries BIGINT NOT NULL, bitsets BYTEA NOT NULL)")
            row = con.execute(f"SELECT value FROM {self.meta_t} WHERE key = 'lsh'").fetchone()
            if row is None:
                con.execute(f"INSERT INTO {self.meta_t} VALUES ('lsh', %s)", (lsh.fingerprint(),))
            elif row[0] != lsh.fingerprint():
                raise ValueError(f"state database was written with LSH {row[0]}, not {lsh.fingerprint()}; "
                                 "keep the LSH settings or use another database")
        con.commit()

    def record(self, user_id, bucket_ids, price=None) -> Charge:
        self._check_ids(bucket_ids)
        con = self._cons.get()
        try:
            with con.transaction():
                sel = f"SELECT n_queries, bitsets FROM {self.users_t} WHERE user_id = %s FOR UPDATE"
                row = con.execute(sel, (user_id,)).fetchone()
                if row is None:
                    con.execute(f"INSERT INTO {self.users_t} VALUES (%s, 0, %s) ON CONFLICT (user_id) DO NOTHING",
                                (user_id, self.lsh.pack(self.lsh.empty_state())))
                    row = con.execute(sel, (user_id,)).fetchone()
                    row = None if row[0] == 0 else row
                n, blob, charge = self._update(user_id, row, bucket_ids, price)
                con.execute(f"UPDATE {self.users_t} SET n_queries = %s, bitsets = %s WHERE user_id = %s", (n, blob, user_id))
        except self._psycopg.OperationalError:
            self._cons.close()  # a broken connection is replaced on the next call
            raise
        con.commit()
        return charge

    def get(self, user_id: str) -> UserState:
        con = self._cons.get()
        row = con.execute(f"SELECT n_queries, bitsets FROM {self.users_t} WHERE user_id = %s", (user_id,)).fetchone()
        con.rollback()
        return self._state(user_id, row if row is None or row[0] else None)

    def users(self) -> list[str]:
        con = self._cons.get()
        out = [r[0] for r in con.execute(f"SELECT user_id FROM {self.users_t} WHERE n_queries > 0 ORDER BY user_id")]
        con.rollback()
        return out

    def close(self) -> None:
        self._cons.close()


def open_store(url: str | os.PathLike, lsh: LSHCoverage) -> StateStore:
    """``postgresql://...`` -> PostgresStore; ``sqlite:///path`` or a plain path -> SQLiteStore."""
    s = str(url)
    if s.startswith(("postgresql://", "postgres://")):
        return PostgresStore(s, lsh)
    if s.startswith("sqlite:///"):
        s = s[len("sqlite:///"):]
    return SQLiteStore(s, lsh)


__all__ = ["UserState", "Charge", "StateStore", "SQLiteStore", "UserStateStore", "PostgresStore", "open_store"]
