"""``appliance user …`` and ``appliance token …`` through the real CLI (subprocesses)."""

from __future__ import annotations

import json

from appliance.accounts import tokens
from appliance.accounts import users as accounts


def test_user_add_with_password_stdin_never_on_the_command_line(site):
    r = site.cli("user", "add", "rad1", "--role", "radiologist", "--display-name", "Dr One",
                 "--tags", "neuro", "--password-stdin", input="a-long-secret-pw\n")
    assert r.returncode == 0, r.stderr
    assert "a-long-secret-pw" not in r.stdout + r.stderr
    conn = site.db()
    row = conn.execute("SELECT * FROM users WHERE username='rad1'").fetchone()
    assert accounts.check_password(row["password_hash"], "a-long-secret-pw")
    assert row["role"] == "radiologist" and row["tags"] == "neuro" and not row["must_change_password"]
    assert conn.execute("SELECT count(*) FROM audit WHERE action='user.add' AND object='rad1'"
                        ).fetchone()[0] == 1
    conn.close()
    # bad input: clear error, nothing changed
    r = site.cli("user", "add", "rad1", "--role", "radiologist", "--password-stdin",
                 input="another-long-pw\n")
    assert r.returncode == 1 and "already exists" in r.stderr
    r = site.cli("user", "add", "rad2", "--role", "radiologist", "--password-stdin", input="short\n")
    assert r.returncode == 1 and "at least 10" in r.stderr
    listed = json.loads(site.cli("user", "list", "--json").stdout)
    assert [u["username"] for u in listed] == ["admin", "rad1"]
    assert all("password_hash" not in u and "totp_secret" not in u for u in listed)


def test_user_disable_and_reset_password(site):
    site.cli("user", "add", "staff1", "--role", "site_staff", "--password-stdin",
             input="first-password-1\n", check=True)
    r = site.cli("user", "disable", "staff1")
    assert r.returncode == 0
    r = site.cli("user", "reset-password", "staff1")  # generated, printed once
    assert r.returncode == 0
    new_pw = r.stdout.strip().splitlines()[-1].strip()
    conn = site.db()
    row = conn.execute("SELECT * FROM users WHERE username='staff1'").fetchone()
    conn.close()
    assert row["disabled"] == 1 and row["must_change_password"] == 1
    assert accounts.check_password(row["password_hash"], new_pw)
    assert site.cli("user", "disable", "nobody").returncode == 1


def test_token_create_prints_only_the_token_and_can_be_revoked(site):
    site.cli("user", "add", "bridge", "--role", "site_staff", "--password-stdin",
             input="bridge-password-1\n", check=True)
    r = site.cli("token", "create", "--user", "bridge", "--expires", "30d")
    assert r.returncode == 0, r.stderr
    token = r.stdout
    assert token.endswith("\n") and token.count("\n") == 1 and token.startswith(tokens.PREFIX)
    token = token.strip()
    conn = site.db()
    user = tokens.verify(conn, token)
    assert user is not None and user["username"] == "bridge"
    expires = conn.execute("SELECT expires_at - created_at FROM api_tokens").fetchone()[0]
    assert abs(expires - 30 * 86400) < 1
    conn.close()
    listing = site.cli("token", "list").stdout
    assert token not in listing and "bridge" in listing
    tid = json.loads(site.cli("token", "list", "--json").stdout)[0]["id"]
    assert site.cli("token", "revoke", str(tid)).returncode == 0
    conn = site.db()
    assert tokens.verify(conn, token) is None
    conn.close()
    r = site.cli("token", "revoke", str(tid))
    assert r.returncode == 1 and "no live token" in r.stderr
    r = site.cli("token", "create", "--user", "ghost")
    assert r.returncode == 1 and "no user named" in r.stderr and r.stdout == ""
    r = site.cli("token", "create", "--user", "bridge", "--expires", "soon")
    assert r.returncode == 1 and "bad duration" in r.stderr


def test_user_modify_role_and_tags(site):
    site.cli("user", "add", "rad1", "--role", "radiologist", "--password-stdin",
             input="first-password-1\n", check=True)
    r = site.cli("user", "modify", "rad1", "--role", "neurologist", "--tags", "neuro,site:north")
    assert r.returncode == 0, r.stderr
    assert "role 'radiologist' → 'neurologist'" in r.stdout
    conn = site.db()
    row = conn.execute("SELECT role, tags FROM users WHERE username='rad1'").fetchone()
    detail = conn.execute("SELECT detail FROM audit WHERE action='user.modify'").fetchone()[0]
    conn.close()
    assert tuple(row) == ("neurologist", "neuro,site:north") and "neurologist" in detail
    assert site.cli("user", "modify", "rad1").returncode == 1
    assert site.cli("user", "modify", "ghost", "--tags", "x").returncode == 1
