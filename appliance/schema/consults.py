"""Tables of consults: rooms, invites, participants, events, stats (migration 12); media
jobs and sealed recordings (the first half of migration 15, whose second half is
``schema/sync.RECORDING_KIND``)."""

ROOMS = """
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
        """

MEDIA = """
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
"""

REMOVALS = """
        ALTER TABLE consult_participants ADD COLUMN removed_at REAL;
        ALTER TABLE consult_participants ADD COLUMN removed_by TEXT;
"""
