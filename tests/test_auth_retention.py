"""Sign-in records are pruned: a password-guessing attack cannot grow the database forever."""

from __future__ import annotations

import time

from appliance.accounts import users as accounts
from appliance.core import config

DAY = 86400.0


def _attempt(conn, ts: float, username: str = "alice", ok: bool = False) -> None:
    conn.execute("INSERT INTO login_attempts (ts, username, address, ok, reason)"
                 " VALUES (?, ?, '10.0.0.9', ?, 'password')", (ts, username, int(ok)))


def _session(conn, sid: str, user_id: int, last_seen: float, ended_at: float | None) -> None:
    conn.execute("INSERT INTO sessions (id, user_id, created_at, last_seen, ended_at)"
                 " VALUES (?, ?, ?, ?, ?)", (sid, user_id, last_seen - 60, last_seen, ended_at))


def test_old_attempts_and_sessions_go_recent_ones_stay(site):
    now = time.time()
    conn = site.db()
    uid = accounts.add_user(conn, "alice", "radiologist", "a long enough passphrase 1")
    _attempt(conn, now - 8 * DAY)
    _attempt(conn, now - 6 * DAY)
    _attempt(conn, now - 60)  # inside the lockout window: must survive and still count
    _session(conn, "ended-long-ago", uid, now - 40 * DAY, ended_at=now - 31 * DAY)
    _session(conn, "ended-last-week", uid, now - 8 * DAY, ended_at=now - 7 * DAY)
    _session(conn, "abandoned", uid, now - 45 * DAY, ended_at=None)
    _session(conn, "open", uid, now - 30, ended_at=None)

    pruned = accounts.prune_auth_records(conn, now)

    assert pruned == {"login_attempts": 1, "sessions": 2}
    left = sorted(r[0] for r in conn.execute("SELECT id FROM sessions"))
    assert left == ["ended-last-week", "open"]
    assert conn.execute("SELECT count(*) FROM login_attempts").fetchone()[0] == 2
    assert conn.execute("SELECT count(*) FROM login_attempts WHERE ts > ?",
                        (now - 600,)).fetchone()[0] == 1


def test_worker_sweep_prunes_at_most_hourly(site, monkeypatch):
    cfg = config.load(site.data_dir)
    conn = site.db()
    monkeypatch.setattr(accounts, "_last_prune", 0.0)
    _attempt(conn, time.time() - 9 * DAY)
    accounts.sweep(cfg)
    assert conn.execute("SELECT count(*) FROM login_attempts").fetchone()[0] == 0

    _attempt(conn, time.time() - 9 * DAY)
    accounts.sweep(cfg)  # within the hour: nothing done
    assert conn.execute("SELECT count(*) FROM login_attempts").fetchone()[0] == 1

    monkeypatch.setattr(accounts, "_last_prune", time.time() - accounts.PRUNE_EVERY_S - 1)
    accounts.sweep(cfg)
    assert conn.execute("SELECT count(*) FROM login_attempts").fetchone()[0] == 0
