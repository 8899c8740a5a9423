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


def test_each_audit_slice_ships_its_signed_head(site, tmp_path):
    from test_sync_common import age_identity

    from appliance.core import db, identity
    from appliance.sync import building, outbox
    from appliance.sync import bundle as bnd

    pub = age_identity(tmp_path / "cloud.key")
    path = site.data_dir / "appliance.yaml"
    text = path.read_text().replace("  target: none", "  target: folder", 1)
    text = text.replace("  recipients: []", f"  recipients: [{pub}]", 1)
    text = text.replace('  folder: ""', f'  folder: "{tmp_path / "usb"}"', 1)
    path.write_text(text)
    _rows_and_anchor(site, 3)
    cfg = config.load(site.data_dir)
    conn = db.connect(cfg.db_path)
    building.build_due(conn, cfg, force=True)
    row = conn.execute("SELECT * FROM bundles WHERE kind='audit'").fetchone()
    top = int(row["subject"].split("-")[1])
    conn.close()
    opened = bnd.open_bundle(outbox.bundles_dir(cfg) / row["path"],
                             bnd.load_identity(tmp_path / "cloud.key"), tmp_path / "opened")
    heads = [fe for fe in opened.manifest["files"] if fe.get("type") == "audit_heads"]
    assert len(heads) == 1
    shipped = json.loads((tmp_path / "opened" / heads[0]["name"]).read_text())
    pub_key = identity.load_signing_key(cfg.keys_dir).public_key()
    assert shipped[-1]["id"] == top and audit_heads.check_signature(shipped[-1], pub_key) == ""


def test_truncating_the_tail_and_deleting_local_heads_is_caught_against_shipped_heads(
        site, tmp_path):
    from test_sync_common import age_identity

    pub = age_identity(tmp_path / "cloud.key")
    usb = tmp_path / "usb"
    path = site.data_dir / "appliance.yaml"
    text = path.read_text().replace("  target: none", "  target: folder", 1)
    text = text.replace("  recipients: []", f"  recipients: [{pub}]", 1)
    text = text.replace('  folder: ""', f'  folder: "{usb}"', 1)
    path.write_text(text)
    usb.mkdir()
    _rows_and_anchor(site, 4)
    r = site.cli("sync", "now")
    assert r.returncode == 0, r.stdout + r.stderr
    conn = site.db()
    shipped_top = int(conn.execute("SELECT subject FROM bundles WHERE kind='audit'")
                      .fetchone()[0].split("-")[1])
    conn.close()
    against = ["audit", "verify", "--against", str(usb), "--identity", str(tmp_path / "cloud.key")]
    ok = site.cli(*against)
    assert ok.returncode == 0 and f"off the box: matches the signed head at row {shipped_top}" \
        in ok.stdout, ok.stdout + ok.stderr
    conn = _attacker_db(site)
    conn.execute("DELETE FROM audit WHERE id > 2")
    conn.close()
    audit_heads.heads_path(site.data_dir).unlink()  # the local anchor removed as well
    assert site.cli("audit", "verify").returncode == 0  # nothing local left to catch it
    r = site.cli(*against)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "off the box: rows after id 2 are missing" in r.stderr
