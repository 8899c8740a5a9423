"""Tables of accounts: users (migration 4); sessions, sign-in attempts, API tokens,
break-glass (6)."""

# Migration 4.
USERS = """
CREATE TABLE users (
    id INTEGER PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    totp_secret TEXT,
    tags TEXT NOT NULL DEFAULT '',
    disabled INTEGER NOT NULL DEFAULT 0,
    must_change_password INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    password_changed_at REAL NOT NULL
);
"""

# Migration 6.
# Migration 6: what signing in leaves behind. Sessions live server-side (the
# cookie holds only a random id, stored here as its SHA-256) so that logout,
# idle logoff and disabling a user end a session at once. Lockout and rate
# limits are computed from login_attempts, the same way for unknown usernames
# as for real ones, so the answers do not reveal which accounts exist.
AUTH = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    created_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    address TEXT NOT NULL DEFAULT '',
    user_agent TEXT NOT NULL DEFAULT '',
    second_factor INTEGER NOT NULL DEFAULT 0,
    totp_pending TEXT,
    ended_at REAL,
    end_reason TEXT
);
CREATE INDEX sessions_user ON sessions(user_id, ended_at);
CREATE TABLE login_attempts (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    username TEXT NOT NULL,
    address TEXT NOT NULL,
    ok INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX login_attempts_user ON login_attempts(username, ts);
CREATE INDEX login_attempts_address ON login_attempts(address, ts);
CREATE TABLE api_tokens (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    token_hash TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    expires_at REAL,
    last_used_at REAL,
    revoked_at REAL
);
CREATE TABLE break_glass (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id),
    study_uid TEXT NOT NULL,
    reason TEXT NOT NULL,
    address TEXT NOT NULL DEFAULT '',
    expires_at REAL NOT NULL
);
CREATE INDEX break_glass_user_study ON break_glass(user_id, study_uid, expires_at);
CREATE INDEX break_glass_ts ON break_glass(ts);
ALTER TABLE users ADD COLUMN totp_last_step INTEGER;
ALTER TABLE users ADD COLUMN last_login_at REAL;
"""
