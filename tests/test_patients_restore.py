"""The cloud copy follows a reconciliation: ``appliance restore`` gives the corrected identity.

A trauma patient's study and signed report are synced to a real S3 API (moto) under the
temporary identity; the identity is then linked to the real patient and synced again (the
corrected versions and the correction addendum are new items, so they ship as a correction
bundle).  A fresh appliance restored from the bucket holds the study under the real
identity only, the corrected files byte for byte, the original report and its correction.
"""

from __future__ import annotations

from test_patients import _cli
from test_patients_reconciliation import _sign
from test_sync_common import BUCKET, age_identity, configure_sync, moto, store_study

from appliance.core import config, db, identity
from appliance.patients import reconciliation, registry
from appliance.reports import model as reports
from appliance.setup import site as setup_site

__all__ = ["moto"]


def test_restore_from_the_cloud_gives_the_corrected_identity(site, moto, tmp_path, monkeypatch,
                                                             capsys):
    def _sync(site) -> None:
        conn = site.db()
        conn.execute("UPDATE studies SET last_received = last_received - 3600")
        conn.close()
        code, out, err = _cli(monkeypatch, capsys, site.data_dir, "sync", "now")
        assert code == 0, out + err

    key_file = tmp_path / "cloud.key"
    configure_sync(site, moto.url, [age_identity(key_file)])
    cfg = config.load(site.data_dir)
    desk = registry.Site.from_config(cfg)
    conn = db.open_db(cfg.db_path)
    temp = registry.register_trauma(conn, desk, actor="desk", sex_code="F")
    real = registry.register(conn, desk, actor="desk", name="Okafor^Ada", patient_id="MRN-7",
                             birth="1970-01-01", sex_code="F")
    study, _ = store_study(site, tmp_path, 3, patient_id=temp["patient_id"],
                           patient_name=temp["name"])
    rid = _sign(conn, cfg, study)
    conn.close()
    _sync(site)  # the cloud holds the temporary identity
    conn = db.open_db(cfg.db_path)
    reconciliation.link(cfg, conn, temp["patient_id"], "MRN-7", actor="desk",
                        reason="identified by her son")
    files = {r[0]: (site.data_dir / "studies" / r[1]).read_bytes()
             for r in conn.execute("SELECT sop_uid, path FROM instances")}
    conn.close()
    _sync(site)  # the correction bundle

    fresh = setup_site.init_data_dir(tmp_path / "replacement", site_name="Replacement").data_dir
    signer = identity.key_id(identity.load_signing_key(site.data_dir / "keys").public_key())
    code, out, err = _cli(monkeypatch, capsys, fresh, "restore", "--from", f"s3://{BUCKET}",
                          "--endpoint-url", moto.url, "--credentials-file",
                          str(site.data_dir / "keys" / "s3.credentials"), "--trust", signer,
                          "--identity", str(key_file))
    assert code == 0, out + err
    conn = db.connect(fresh / "appliance.db")
    assert [tuple(r) for r in conn.execute("SELECT patient_id, patient_name FROM studies")] == \
        [(real["patient_id"], real["name"])]
    restored = {r[0]: (fresh / "studies" / r[1]).read_bytes()
                for r in conn.execute("SELECT sop_uid, path FROM instances")}
    assert restored == files
    kinds = sorted((r["kind"], r["status"]) for r in reports.reports_for_study(conn, study))
    conn.close()
    assert kinds == [("addendum", "final"), ("report", "final")], rid
