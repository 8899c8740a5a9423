"""Disaster recovery: ``appliance restore`` rebuilds a fresh appliance from the S3 target.

The first appliance syncs two studies, a signed report and its audit trail to a
real S3 API (moto_server); a second, freshly initialised appliance restores
from it and answers C-FIND (dcmtk ``findscu``) with the same studies, holds
byte-identical files, the same report and the same index.
"""

from __future__ import annotations

import subprocess

from conftest import make_site
from test_sync_common import BUCKET, age_identity, configure_sync, moto, store_study

from appliance.core import identity
from appliance.reports import model as reports
from appliance.sync import status

__all__ = ["moto"]

INDEX_STUDY = ("study_uid", "patient_id", "patient_name", "study_date", "accession_number",
               "study_description", "modalities", "num_series", "num_instances", "size_bytes")


def _sign_report(site, study_uid: str) -> int:
    conn = site.db()
    try:
        templates = reports.load_templates()
        rid = reports.create(conn, study_uid=study_uid, author="dr.ray", template_id="generic",
                             templates=templates)
        reports.autosave(conn, rid, actor="dr.ray", templates=templates, base_revision=0,
                         findings="No acute intracranial abnormality.",
                         impression="Normal CT head.")
        reports.sign(conn, rid, actor="dr.ray", level="final", templates=templates)
        return rid
    finally:
        conn.close()


def _snapshot(site):
    conn = site.db()
    try:
        studies = {tuple(r) for r in conn.execute(
            f"SELECT {', '.join(INDEX_STUDY)} FROM studies")}
        instances = {tuple(r) for r in conn.execute(
            "SELECT sop_uid, series_uid, study_uid, sha256, size FROM instances")}
        reps = [tuple(r) for r in conn.execute(
            "SELECT r.id, r.study_uid, r.status, v.level, v.text, v.sha256, v.signed_by"
            " FROM reports r JOIN report_versions v ON v.report_id = r.id ORDER BY v.id")]
        files = {r[0]: (site.data_dir / "studies" / r[1]).read_bytes()
                 for r in conn.execute("SELECT sop_uid, path FROM instances")}
        return studies, instances, reps, files
    finally:
        conn.close()


def _cfind(site, findscu: str, tmp_path) -> set[str]:
    out = tmp_path / "find"
    out.mkdir(exist_ok=True)
    r = subprocess.run([findscu, "-S", "-aet", "FINDSCU", "-aec", site.ae_title, "-X", "-od",
                        str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                        "-k", "PatientID", "127.0.0.1", str(site.dicom_port)],
                       capture_output=True, text=True, timeout=60,
                       env={"TCP_NODELAY": "1"})
    assert r.returncode == 0, r.stderr
    import pydicom

    return {str(pydicom.dcmread(p).StudyInstanceUID) for p in out.glob("*.dcm")}


def _qido(site) -> list:
    from appliance.dicomweb import query as qido

    conn = site.db()
    try:
        return [qido.run(conn, qido.parse(level, [("includefield", "all")]), "https://x/dicom-web")
                for level in (qido.STUDY, qido.SERIES)]
    finally:
        conn.close()


def test_restore_rebuilds_a_fresh_appliance_from_the_cloud(site, moto, tmp_path, dcmtk, request):
    key_file = tmp_path / "cloud.key"
    escrow = tmp_path / "escrow.key"
    configure_sync(site, moto.url, [age_identity(key_file), age_identity(escrow)])
    ct, _ = store_study(site, tmp_path, 12, rows=128, cols=128)
    cr, _ = store_study(site, tmp_path, 2, modality="CR", patient_id="PAT002",
                        study_description="CR CHEST")
    _sign_report(site, ct)
    conn = site.db()
    conn.execute("UPDATE studies SET last_received = last_received - 3600")
    conn.close()
    r = site.cli("sync", "now")
    assert r.returncode == 0, r.stdout + r.stderr
    before = _snapshot(site)
    assert len(before[2]) == 1 and before[2][0][2] == "final"
    signer = identity.key_id(identity.load_signing_key(site.data_dir / "keys").public_key())

    fresh_base = tmp_path / "replacement"
    fresh_base.mkdir()
    fresh = make_site(fresh_base)
    request.addfinalizer(fresh.stop_all)  # its DICOM node must not outlive the test
    restore_args = ["restore", "--from", f"s3://{BUCKET}", "--endpoint-url", moto.url,
                    "--credentials-file", str(site.data_dir / "keys" / "s3.credentials"),
                    "--trust", signer]
    r = fresh.cli(*restore_args, "--identity", str(escrow))  # the offline escrow key works
    assert r.returncode == 0, r.stdout + r.stderr
    assert "14 instances, 1 reports" in r.stdout and "0 rejected" in r.stdout
    after = _snapshot(fresh)
    assert after[0] == before[0]  # same studies in the index (counts, sizes, modalities)
    assert after[1] == before[1]  # same instances, same SHA-256
    assert after[2] == before[2]  # the same signed report
    assert after[3] == before[3]  # byte-identical files
    conn = fresh.db()
    assert status.reconcile(conn)["unconfirmed"] == 0  # restored data is not shipped again
    # Restored series answer /metadata at once: their DICOM JSON was written as they came back.
    assert conn.execute("SELECT COUNT(*) FROM instances i JOIN dicomweb_metadata m"
                        " ON m.sop_uid = i.sop_uid AND m.sha256 = i.sha256").fetchone()[0] == 14
    actions = [r[0] for r in conn.execute("SELECT action FROM audit")]
    conn.close()
    assert "sync.restore" in actions
    assert list((fresh.data_dir / "restored" / "audit").glob("audit-*.json"))

    # QIDO-RS (the DICOMweb query the viewer uses) answers the same, study and series level.
    studies_json, series_json = _qido(site)
    assert len(studies_json) == 2 and len(series_json) == 2
    assert _qido(fresh) == [studies_json, series_json]

    # The restored appliance answers C-FIND with the same studies.
    assert fresh.cli("ae", "add", "FINDSCU", "--query").returncode == 0
    fresh.start_dicom()
    assert _cfind(fresh, dcmtk["findscu"], tmp_path) == {ct, cr}

    # Running it again changes nothing; a tampered object and an untrusted signer are refused.
    again = fresh.cli(*restore_args, "--identity", str(key_file))
    assert again.returncode == 0 and "restored 0 bundles" in again.stdout
    s3 = moto.client()
    key = next(o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET)["Contents"]
               if "-study-" in o["Key"])
    blob = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    blob[len(blob) // 3] ^= 0x40
    s3.put_object(Bucket=BUCKET, Key=key.replace("study", "xstudy"), Body=bytes(blob))
    bad = fresh.cli(*restore_args, "--identity", str(key_file))
    assert bad.returncode == 2 and "rejected" in bad.stdout and "1 rejected" in bad.stdout
    untrusted = fresh.cli(*restore_args[:-1], "0000000000000000", "--identity", str(key_file))
    assert "not trusted" in untrusted.stdout
    assert _snapshot(fresh)[1] == before[1]  # nothing changed by the refused bundles
