"""The audit chain through the real CLI: tamper with SQLite directly (triggers dropped) and
``appliance audit verify`` names the first broken row; ``audit export`` writes JSON lines."""

from __future__ import annotations

import json
import sqlite3
import stat

import pytest

from appliance.core import audit, db


def _fill(site, n: int = 6) -> None:
    conn = site.db()
    for i in range(n):
        audit.record(conn, "rad1", "study.view", f"1.2.3.{i}", source="10.0.0.5",
                     detail={"i": i})
    conn.close()


def _tamper(site, *statements: str) -> None:
    """What an attacker with the file could do: drop the guards and rewrite history."""
    conn = sqlite3.connect(site.data_dir / "appliance.db", isolation_level=None)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    for s in statements:
        conn.execute(s)
    conn.close()


def test_verify_passes_on_an_intact_chain(site):
    _fill(site)
    r = site.cli("audit", "verify")
    assert r.returncode == 0, r.stderr
    assert "intact" in r.stdout
    conn = site.db()
    head = conn.execute("SELECT id, hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    conn.close()
    assert f"last row {head[0]} hash {head[1][:16]}" in r.stdout


def test_triggers_refuse_edits_through_sql(site):
    _fill(site, 2)
    conn = site.db()
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET actor = 'someone' WHERE id = 2")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit WHERE id = 2")
    conn.close()


def test_verify_names_the_edited_row(site):
    _fill(site)
    _tamper(site, "UPDATE audit SET actor = 'innocent' WHERE id = 4")
    r = site.cli("audit", "verify")
    assert r.returncode == 2
    assert "row 4" in r.stderr and "edited" in r.stderr


def test_verify_names_a_deleted_row(site):
    _fill(site)
    _tamper(site, "DELETE FROM audit WHERE id = 3")
    r = site.cli("audit", "verify")
    assert r.returncode == 2
    assert "row 3 is missing" in r.stderr


def test_verify_catches_a_rehashed_row(site):
    """Recomputing the edited row's own hash is not enough: the next link breaks."""
    _fill(site)
    conn = site.db()
    row = dict(conn.execute("SELECT * FROM audit WHERE id = 3").fetchone())
    conn.close()
    row["actor"] = "innocent"
    forged = audit._digest(row["prev_hash"], row)
    _tamper(site, f"UPDATE audit SET actor = 'innocent', hash = '{forged}' WHERE id = 3")
    r = site.cli("audit", "verify")
    assert r.returncode == 2 and "row 4" in r.stderr and "link" in r.stderr


def test_export_json_lines_since(site, tmp_path):
    conn = site.db()
    audit.record(conn, "old", "study.view", "1.2.old", ts=1_000_000_000.0)
    audit.record(conn, "rad1", "study.view", "1.2.new", source="10.0.0.5")
    conn.close()
    out = tmp_path / "audit.jsonl"
    r = site.cli("audit", "export", "--since", "2001-09-10", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert "1.2.old" not in [x["object"] for x in rows]  # 2001-09-09 is before --since
    assert rows[-1]["object"] == "1.2.new" and rows[-1]["source"] == "10.0.0.5"
    assert {"id", "ts", "time", "actor", "action", "hash", "detail"} <= set(rows[-1])
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    # stdout form, and the export is itself audited
    r = site.cli("audit", "export", "--since", "1h")
    assert r.returncode == 0 and all(json.loads(x) for x in r.stdout.splitlines())
    conn = db.connect(site.data_dir / "appliance.db")
    exports = conn.execute("SELECT count(*) FROM audit WHERE action='audit.export'").fetchone()[0]
    conn.close()
    assert exports == 2


def test_export_rejects_a_bad_since(site):
    r = site.cli("audit", "export", "--since", "last tuesday")
    assert r.returncode == 1 and r.stderr.startswith("error: bad --since")
