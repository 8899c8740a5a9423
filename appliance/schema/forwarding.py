"""Tables of migration 17: the forwarding outbox (images and reports back to the site PACS).

One row per (destination, SOP Instance): ``waiting → sending → stored → delivered``, or
``failed`` on a permanent refusal.  ``sending`` rows carry a lease (owner ``host:pid:…``,
``lease_until``); a worker killed at any line leaves a lease that runs out (or whose owner
is a dead process of this host) and the row is sent again, with the same file and so the
same SOP Instance UID: the PACS keeps one object.  ``stored`` means the C-STORE succeeded
and the proof is awaited: a Storage Commitment result (``commit_uid`` names the N-ACTION
transaction) or a C-FIND at IMAGE level; ``proof`` says which one delivered it.
"""

SCHEMA = """
CREATE TABLE forward_outbox (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    priority_rank INTEGER NOT NULL DEFAULT 2,
    origin TEXT NOT NULL DEFAULT 'rule',
    state TEXT NOT NULL DEFAULT 'waiting'
        CHECK (state IN ('waiting', 'sending', 'stored', 'delivered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    sha256 TEXT NOT NULL DEFAULT '',
    sent_syntax TEXT NOT NULL DEFAULT '',
    last_status TEXT NOT NULL DEFAULT '',
    last_error TEXT NOT NULL DEFAULT '',
    commit_uid TEXT,
    commit_asked_at REAL,
    proof TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    stored_at REAL,
    delivered_at REAL,
    failing_since REAL,
    UNIQUE (destination, sop_uid)
);
CREATE INDEX forward_outbox_due ON forward_outbox(state, priority_rank, next_attempt_at);
CREATE INDEX forward_outbox_study ON forward_outbox(study_uid);
CREATE INDEX forward_outbox_commit ON forward_outbox(commit_uid);
"""

# Migration 23: how far each hand-back has got (appliance/forwarding/progress.py).  One row
# per hand-back; a run resumed after an interruption continues its row.  ``owner_host`` and
# ``owner_pid`` name the process that writes it, so a run killed with -9 reads as interrupted.
HANDBACK_PROGRESS = """
CREATE TABLE handback_progress (
    id INTEGER PRIMARY KEY,
    destination TEXT NOT NULL,
    since REAL NOT NULL DEFAULT 0,
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'done', 'interrupted')),
    instances_planned INTEGER NOT NULL DEFAULT 0,
    instances_sent INTEGER NOT NULL DEFAULT 0,
    instances_failed INTEGER NOT NULL DEFAULT 0,
    bytes_planned INTEGER NOT NULL DEFAULT 0,
    bytes_sent INTEGER NOT NULL DEFAULT 0,
    reports_planned INTEGER NOT NULL DEFAULT 0,
    reports_sent INTEGER NOT NULL DEFAULT 0,
    rate_instances_s REAL NOT NULL DEFAULT 0,
    rate_bytes_s REAL NOT NULL DEFAULT 0,
    resumes INTEGER NOT NULL DEFAULT 0,
    manifest TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    owner_host TEXT NOT NULL,
    owner_pid INTEGER NOT NULL
);
CREATE INDEX handback_progress_destination ON handback_progress(destination, id);
"""
