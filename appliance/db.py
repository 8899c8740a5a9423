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

from appliance import (
    accounts,
    audit,
    health_series,
    read_queue_schema,
    report_schema,
    sync_schema,
)
from dicom_node import index as dicom_index

BUSY_TIMEOUT_MS = 10_000

# (number, description, SQL). Append only; never edit a landed migration.
# Numbers reserved per area: 5 read queue (workflows), 6 auth (sessions, tokens),
# 7 sync outbox, 8 DICOMweb metadata, 9 reports, 10 health time series.
# dicom_node owns its index tables (dicom_node/index.py) but they are migrated here,
# so one place decides the order of every schema change.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "DICOM index: studies, series, instances", dicom_index.SCHEMA_V1),
    (
        2,
        "components heartbeat and key/value settings",
        """
        CREATE TABLE components (
            name TEXT PRIMARY KEY,
            pid INTEGER,
            started_at REAL,
            heartbeat_at REAL,
            detail TEXT
        );
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        """,
    ),
    (3, "hash-chained audit trail", audit.SCHEMA),
    (4, "user accounts", accounts.SCHEMA),
    (5, "read queue: read items, history, escalation steps, pending completions, workflow"
        " versions, notification inbox", read_queue_schema.SCHEMA),
    (6, "auth: sessions, login attempts, API tokens, break-glass", accounts.AUTH_SCHEMA),
    (7, "sync: bundle outbox, items, upload parts, sequence, received ledger",
     sync_schema.SCHEMA),
    (
        8,
        "DICOMweb metadata cache (appliance/dicomweb_metadata.py)",
        """
        CREATE TABLE dicomweb_metadata (
            sop_uid TEXT PRIMARY KEY,
            series_uid TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            json TEXT NOT NULL,
            pixel TEXT NOT NULL DEFAULT '',
            made_at REAL NOT NULL
        );
        CREATE INDEX dicomweb_metadata_series ON dicomweb_metadata(series_uid);
        """,
    ),
    (9, "reports, signed versions, critical findings, delivery outbox", report_schema.SCHEMA),
    (10, "health time series: samples, SLO observations, component starts",
     health_series.SCHEMA),
    (
        12,
        "consults: rooms, invites, participants, signaling/chat/ladder events, call stats"
        " (appliance/consults.py)",
        """
        CREATE TABLE consults (
            id INTEGER PRIMARY KEY,
            study_uid TEXT NOT NULL DEFAULT '',
            title TEXT NOT NULL DEFAULT '',
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            ended_at REAL,
            recording_consent_by TEXT
        );
        CREATE INDEX consults_study ON consults(study_uid);
        CREATE TABLE consult_invites (
            nonce TEXT PRIMARY KEY,
            consult_id INTEGER NOT NULL REFERENCES consults(id),
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL,
            expires_at REAL NOT NULL,
            revoked_at REAL
        );
        CREATE TABLE consult_participants (
            id INTEGER PRIMARY KEY,
            consult_id INTEGER NOT NULL REFERENCES consults(id),
            kind TEXT NOT NULL CHECK (kind IN ('user', 'guest', 'media')),
            user_id INTEGER,
            name TEXT NOT NULL,
            role TEXT NOT NULL DEFAULT '',
            secret_hash TEXT,
            invite_nonce TEXT,
            state TEXT NOT NULL CHECK (state IN ('lobby', 'admitted', 'denied', 'left')),
            created_at REAL NOT NULL,
            admitted_at REAL,
            admitted_by TEXT,
            left_at REAL
        );
        CREATE INDEX consult_participants_consult ON consult_participants(consult_id);
        CREATE UNIQUE INDEX consult_participants_secret ON consult_participants(secret_hash);
        CREATE TABLE consult_events (
            id INTEGER PRIMARY KEY,
            consult_id INTEGER NOT NULL REFERENCES consults(id),
            ts REAL NOT NULL,
            sender INTEGER,
            recipient INTEGER,
            kind TEXT NOT NULL,
            body TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX consult_events_cursor ON consult_events(consult_id, id);
        CREATE TABLE consult_stats (
            id INTEGER PRIMARY KEY,
            consult_id INTEGER NOT NULL REFERENCES consults(id),
            participant_id INTEGER NOT NULL,
            ts REAL NOT NULL,
            loss REAL, jitter_ms REAL, rtt_ms REAL, fps REAL, kbit_s REAL,
            step TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX consult_stats_consult ON consult_stats(consult_id, ts);
        """,
    ),
    (
        15,
        "consult media: work for `appliance media serve` (recordings, probes, relays), sealed"
        " recordings; bundles may carry kind 'recording' (outbox tables rebuilt for the wider"
        " CHECK)",
        """
        CREATE TABLE consult_media_jobs (
            id INTEGER PRIMARY KEY,
            consult_id INTEGER NOT NULL REFERENCES consults(id),
            kind TEXT NOT NULL CHECK (kind IN ('record', 'probe', 'relay')),
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed',
                                                 'refused', 'cancelled')),
            requested_by TEXT NOT NULL,
            requested_at REAL NOT NULL,
            seconds REAL NOT NULL,
            streams INTEGER NOT NULL DEFAULT 0,
            participant_id INTEGER,
            lease_owner TEXT,
            lease_until REAL NOT NULL DEFAULT 0,
            started_at REAL,
            finished_at REAL,
            result TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX consult_media_jobs_due ON consult_media_jobs(state, requested_at);
        CREATE TABLE consult_recordings (
            id INTEGER PRIMARY KEY,
            consult_id INTEGER NOT NULL,
            study_uid TEXT NOT NULL DEFAULT '',
            name TEXT NOT NULL UNIQUE,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            sealed_at REAL NOT NULL,
            complete INTEGER NOT NULL DEFAULT 1,
            origin TEXT NOT NULL DEFAULT 'local'
        );
        CREATE INDEX consult_recordings_consult ON consult_recordings(consult_id);
        CREATE TABLE bundles_v15 (
            bundle_id TEXT PRIMARY KEY,
            site_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('study', 'report', 'audit', 'recording')),
            subject TEXT NOT NULL DEFAULT '',
            priority INTEGER NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('building', 'built', 'uploading', 'uploaded', 'confirmed')),
            path TEXT NOT NULL,
            size INTEGER,
            sha256 TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt REAL NOT NULL DEFAULT 0,
            lease_owner TEXT,
            lease_until REAL NOT NULL DEFAULT 0,
            bytes_sent INTEGER NOT NULL DEFAULT 0,
            target_key TEXT,
            upload_id TEXT,
            last_error TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            built_at REAL,
            uploaded_at REAL,
            confirmed_at REAL,
            UNIQUE (site_id, seq)
        );
        INSERT INTO bundles_v15 SELECT * FROM bundles;
        CREATE TABLE bundle_items_v15 (
            bundle_id TEXT NOT NULL REFERENCES bundles_v15(bundle_id),
            item_kind TEXT NOT NULL,
            item_id TEXT NOT NULL,
            version TEXT NOT NULL DEFAULT '',
            path TEXT NOT NULL DEFAULT '',
            size INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (item_kind, item_id, version)
        );
        INSERT INTO bundle_items_v15 SELECT * FROM bundle_items;
        CREATE TABLE bundle_parts_v15 (
            bundle_id TEXT NOT NULL REFERENCES bundles_v15(bundle_id),
            part_number INTEGER NOT NULL,
            etag TEXT NOT NULL,
            size INTEGER NOT NULL,
            sent_at REAL NOT NULL,
            PRIMARY KEY (bundle_id, part_number)
        );
        INSERT INTO bundle_parts_v15 SELECT * FROM bundle_parts;
        DROP TABLE bundle_parts;
        DROP TABLE bundle_items;
        DROP TABLE bundles;
        ALTER TABLE bundles_v15 RENAME TO bundles;
        ALTER TABLE bundle_items_v15 RENAME TO bundle_items;
        ALTER TABLE bundle_parts_v15 RENAME TO bundle_parts;
        CREATE INDEX bundles_due ON bundles(state, priority, seq);
        CREATE INDEX bundle_items_bundle ON bundle_items(bundle_id);
        """,
    ),
]


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
