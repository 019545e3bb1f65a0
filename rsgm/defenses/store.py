"""Persistent per-user B4B state in SQLite: query counts and LSH bitsets.

Each batch is one ``BEGIN IMMEDIATE`` transaction (read bitsets, mark the batch's buckets,
write back).  SQLite grants the write lock to one connection at a time across threads and
processes, so concurrent requests of the same user are serialised and no update is lost.
The state lives on disk, so a restart never resets anyone's coverage (a reset would be a free
way around the defence).  The LSH fingerprint is stored too: opening the store with a
different hash is refused, because old bitsets would be meaningless under it.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from rsgm.defenses.lsh import LSHCoverage


@dataclass(frozen=True)
class UserState:
    user_id: str
    n_queries: int
    coverage: float


class UserStateStore:
    """SQLite file holding one row per user; safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike, lsh: LSHCoverage, timeout_s: float = 60.0):
        self.path, self.lsh, self.timeout_s = Path(path), lsh, timeout_s
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"folder {self.path.parent} for the B4B state store does not exist; create it or change state_path")
        self._local = threading.local()
        con = self._connection()
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("BEGIN IMMEDIATE")
        try:
            con.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            con.execute("CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, n_queries INTEGER NOT NULL, bitsets BLOB NOT NULL)")
            row = con.execute("SELECT value FROM meta WHERE key = 'lsh'").fetchone()
            if row is None:
                con.execute("INSERT INTO meta VALUES ('lsh', ?)", (lsh.fingerprint(),))
            elif row[0] != lsh.fingerprint():
                raise ValueError(f"state store {self.path} was written with LSH {row[0]}, not {lsh.fingerprint()}; "
                                 "keep the LSH settings of that store or point state_path to a new file")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        # sqlite3 connections must not cross threads or a fork, so keep one per (thread, pid).
        con = getattr(self._local, "con", None)
        if con is None or self._local.pid != os.getpid():
            con = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=True)
            # WAL + NORMAL: commits survive process crashes and restarts without an fsync per
            # batch (only an OS crash or power loss can drop the last commits).
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con, self._local.pid = con, os.getpid()
        return con

    def record(self, user_id: str, bucket_ids: torch.Tensor) -> UserState:
        """Atomically add one batch (bucket ids [n, n_proj]) to the user's state; returns the new state."""
        if bucket_ids.ndim != 2 or bucket_ids.shape[1] != self.lsh.n_proj:
            raise ValueError(f"bucket ids must have shape [n, {self.lsh.n_proj}], got {tuple(bucket_ids.shape)}")
        con = self._connection()
        con.execute("BEGIN IMMEDIATE")
        try:
            row = con.execute("SELECT n_queries, bitsets FROM users WHERE user_id = ?", (user_id,)).fetchone()
            state = self.lsh.empty_state() if row is None else self.lsh.unpack(row[1])
            n_queries = (0 if row is None else row[0]) + bucket_ids.shape[0]
            self.lsh.mark(state, bucket_ids)
            con.execute("INSERT INTO users VALUES (?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET n_queries = excluded.n_queries, bitsets = excluded.bitsets",
                        (user_id, n_queries, self.lsh.pack(state)))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return UserState(user_id, n_queries, self.lsh.coverage(state))

    def get(self, user_id: str) -> UserState:
        """Current state of a user (zero coverage for a user never seen)."""
        row = self._connection().execute("SELECT n_queries, bitsets FROM users WHERE user_id = ?", (user_id,)).fetchone()
        if row is None:
            return UserState(user_id, 0, 0.0)
        return UserState(user_id, row[0], self.lsh.coverage(self.lsh.unpack(row[1])))

    def users(self) -> list[str]:
        return [r[0] for r in self._connection().execute("SELECT user_id FROM users ORDER BY user_id")]

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            con.close()
        self._local.con = None
