"""The audit chain is anchored outside the database by signed heads (DATA_DIR/audit-heads/).

Attacks performed with sqlite3 on the database file: truncate the tail, and
recompute the whole chain with new hashes. Both pass the chain walk alone;
``appliance audit verify`` must name them (exit 2). A heads file signed by
another key is reported as forged.
"""

from __future__ import annotations

import json
import sqlite3

from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.core import audit, audit_heads, config


def _rows_and_anchor(site, n: int = 6) -> int:
    conn = site.db()
    for i in range(n):
        audit.record(conn, "dr.ray", "study.view", f"1.2.3.{i}", source="127.0.0.1")
    conn.close()
    audit_heads.sweep(config.load(site.data_dir))  # the worker's sweep step
    conn = site.db()
    top = audit.last_id(conn)
    conn.close()
    return top


def _attacker_db(site) -> sqlite3.Connection:
    """The database file opened by hand, the refusing triggers dropped."""
    conn = sqlite3.connect(site.data_dir / "appliance.db", isolation_level=None)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'"
                                " AND tbl_name='audit'").fetchall():
        conn.execute(f"DROP TRIGGER {name}")
    return conn


def test_untouched_chain_verifies_against_its_signed_head(site):
    top = _rows_and_anchor(site)
    r = site.cli("audit", "verify")
    assert r.returncode == 0, r.stderr
    assert f"matches the signed head at row {top}" in r.stdout
    heads = audit_heads.heads_path(site.data_dir)
    assert oct(heads.stat().st_mode & 0o777) == "0o600"


def test_truncating_the_tail_with_sqlite3_is_named(site):
    top = _rows_and_anchor(site)
    conn = _attacker_db(site)
    conn.execute("DELETE FROM audit WHERE id > ?", (top - 3,))
    conn.close()
    r = site.cli("audit", "verify")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"rows after id {top - 3} are missing" in r.stderr


def test_recomputing_the_whole_chain_with_new_hashes_is_named(site):
    top = _rows_and_anchor(site)
    conn = _attacker_db(site)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM audit ORDER BY id")]
    conn.execute("DELETE FROM audit")
    for r in rows:  # the same history with one access hidden, every hash recomputed
        obj = "1.2.3.999" if r["object"] == "1.2.3.2" else r["object"]
        audit.record(conn, r["actor"], r["action"], obj, r["source"], r["outcome"],
                     json.loads(r["detail"]), ts=r["ts"])
    ok, _msg, _n = audit.verify(conn)
    conn.close()
    assert ok  # the chain walk alone is fooled
    r = site.cli("audit", "verify")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"row {top} differs from the signed head" in r.stderr


def test_a_heads_file_signed_by_another_key_is_reported_as_forged(site):
    _rows_and_anchor(site)
    conn = site.db()
    forged = audit_heads.signed_head(conn, ed25519.Ed25519PrivateKey.generate())
    conn.close()
    with open(audit_heads.heads_path(site.data_dir), "a") as f:
        f.write(json.dumps(forged) + "\n")
    r = site.cli("audit", "verify")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "signed heads file is not trustworthy" in r.stderr and "not this appliance's key" \
        in r.stderr
