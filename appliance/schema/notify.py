"""Tables of notify (migration 18): contact points, outgoing messages, the delivery outbox,
acknowledgement pages, health alert states.

Every notification the inbox holds (core's ``notifications``) becomes one ``notify_messages``
row (its ack code lives there) and one ``notify_outbox`` row per channel the user has a
verified contact point for. The outbox row is the unit of delivery: a lease, attempts,
backoff, and an idempotency key sent with the message so a retry after a crash is
recognisable. ``notify_pages`` is the acknowledgement ladder of one escalation step.
"""

# Migration 18.
SCHEMA = """
CREATE TABLE notify_contacts (
    username TEXT NOT NULL,
    channel TEXT NOT NULL CHECK (channel IN ('email', 'sms', 'webhook')),
    address TEXT NOT NULL,
    rank INTEGER NOT NULL DEFAULT 0,
    code_hash TEXT,
    code_expires REAL,
    verified_at REAL,
    created_at REAL NOT NULL,
    PRIMARY KEY (username, channel)
);

CREATE TABLE notify_pages (
    id INTEGER PRIMARY KEY,
    item_id INTEGER,
    step_id INTEGER,
    kind TEXT NOT NULL,
    priority TEXT NOT NULL DEFAULT 'routine',
    level INTEGER NOT NULL DEFAULT 0,
    chain TEXT NOT NULL DEFAULT '[]',
    paged TEXT NOT NULL DEFAULT '[]',
    next_at REAL,
    acked_at REAL,
    acked_by TEXT,
    created_at REAL NOT NULL,
    UNIQUE (item_id, step_id)
);
CREATE INDEX notify_pages_due ON notify_pages(next_at) WHERE acked_at IS NULL;

CREATE TABLE notify_messages (
    id INTEGER PRIMARY KEY,
    notification_id INTEGER UNIQUE,  -- NULL: sent directly (a verification code, a test)
    username TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    page_id INTEGER REFERENCES notify_pages(id),
    ack_code TEXT UNIQUE,
    ack_expires REAL,
    acked_at REAL,
    created_at REAL NOT NULL
);

CREATE TABLE notify_outbox (
    id INTEGER PRIMARY KEY,
    message_id INTEGER NOT NULL REFERENCES notify_messages(id),
    channel TEXT NOT NULL,
    address TEXT NOT NULL,
    rank INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'sending', 'sent', 'skipped', 'failed')),
    not_before REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    phase TEXT NOT NULL DEFAULT '',
    answer TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    first_failure_at REAL,
    sent_at REAL,
    UNIQUE (message_id, channel)
);
CREATE INDEX notify_outbox_due ON notify_outbox(state, next_attempt_at);

CREATE TABLE notify_alerts (
    condition TEXT PRIMARY KEY,
    active INTEGER NOT NULL DEFAULT 0,
    since REAL,
    last_sent_at REAL,
    cleared_at REAL,
    detail TEXT NOT NULL DEFAULT ''
);
"""
