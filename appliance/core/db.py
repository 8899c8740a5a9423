"""SQLite: one file, WAL, ``synchronous=FULL``, migrations numbered in one place.

Every process opens its own connections after it has forked (gunicorn and
huey fork), never before.  ``synchronous=FULL`` in WAL mode makes a commit
durable once it returns, which is what lets us acknowledge a C-STORE or an
audit row right after the commit.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from appliance.schema import MIGRATIONS

BUSY_TIMEOUT_MS = 10_000



def connect(path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection configured for durability and concurrent access.

    Autocommit mode (``isolation_level=None``): callers open transactions
    explicitly with :func:`transaction`, so nothing is left uncommitted.
    """
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000,
            isolation_level=None, check_same_thread=False,
        )
    else:
        conn = sqlite3.connect(
            str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
            check_same_thread=False,
        )
        conn.execute("PRAGMA journal_mode=WAL")
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, immediate: bool = True) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any exception.

    Inside a transaction already open on ``conn`` it nests as a SAVEPOINT, so a
    domain function that opens its own transaction (a worklist transition) can
    also run as part of a larger one (signing a report) and commit with it.
    """
    if conn.in_transaction:
        # Same-named savepoints nest: ROLLBACK TO / RELEASE act on the innermost.
        conn.execute("SAVEPOINT nested_tx")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK TO nested_tx")
            conn.execute("RELEASE nested_tx")
            raise
        conn.execute("RELEASE nested_tx")
        return
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


_LEDGER = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    " number INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
)


def applied_migrations(conn: sqlite3.Connection) -> set[int]:
    """Numbers already applied: the ledger, or (older databases) all up to user_version."""
    has_ledger = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    if has_ledger:
        return {r[0] for r in conn.execute("SELECT number FROM schema_migrations")}
    current = schema_version(conn)
    return {n for n, _, _ in MIGRATIONS if n <= current}


def migrate(conn: sqlite3.Connection, log: Callable[[str], None] | None = None) -> int:
    """Apply every migration the database lacks, in number order; return the highest.

    Applied numbers are kept in a ledger table, not inferred from one counter,
    so a migration numbered below one already applied (areas reserve numbers
    and may land in any order) is still applied.  Each runs in its own
    transaction with its ledger row, so a crash leaves whole migrations only.
    """
    done = applied_migrations(conn)
    for number, description, sql in sorted(MIGRATIONS, key=lambda m: m[0]):
        if number in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_LEDGER)
            for n in done:  # carry an older database's implied history into the ledger
                conn.execute("INSERT OR IGNORE INTO schema_migrations VALUES (?, '', 0)", (n,))
            if conn.execute("SELECT 1 FROM schema_migrations WHERE number = ?",
                            (number,)).fetchone():  # another process migrated first
                conn.execute("ROLLBACK")
                continue
            for statement in _statements(sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                         (number, description, time.time()))
            conn.execute(f"PRAGMA user_version={max(number, schema_version(conn))}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if log:
            log(f"migration {number}: {description}")
    return schema_version(conn)


def _statements(sql: str) -> list[str]:
    """Split a migration script into whole statements (triggers included)."""
    out, buf = [], ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        out.append(buf.strip())
    return out


def open_db(path: str | Path) -> sqlite3.Connection:
    """Connect and bring the schema up to date; what every process calls at start."""
    conn = connect(path)
    migrate(conn)
    return conn
