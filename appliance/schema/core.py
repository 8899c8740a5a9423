"""Tables every process shares: component heartbeats and settings (migration 2), the
audit trail (3), which ``core/audit.py`` writes and verifies."""

# Migration 2.
COMPONENTS_SETTINGS = """
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
        """

# Migration 3.
AUDIT = """
CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    object TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    outcome TEXT NOT NULL DEFAULT 'ok',
    detail TEXT NOT NULL DEFAULT '{}',
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX audit_ts ON audit(ts);
CREATE INDEX audit_actor ON audit(actor);
CREATE INDEX audit_action ON audit(action);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit rows are append-only'); END;
"""

# Migration 5 (with the read queue): the in-app notification inbox of core/notifications.py.
NOTIFICATIONS = """CREATE TABLE notifications (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL DEFAULT '',
    item_id INTEGER,
    step_id INTEGER,
    created_at REAL NOT NULL,
    read_at REAL
);
CREATE INDEX notifications_user ON notifications(username, id);
CREATE INDEX notifications_item ON notifications(item_id);
"""
