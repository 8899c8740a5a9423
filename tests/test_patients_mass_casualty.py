"""The issue's mass casualty, at its own numbers, against the real node, Orthanc and S3.

50 trauma registrations × 3 studies each (64×64, the first study of each 2 instances, the
others 1: 200 instances), pushed with storescu to ``appliance dicom``; a signed report on 10
of them delivered to Orthanc as SRs; everything forwarded to Orthanc (``OverwriteInstances``,
its REST API declared with ``ae add --orthanc-url``) and synced to S3 (moto).  Then all 50
reconciled to real identities with ``appliance patient link``, the corrected copies re-sent,
the old copies removed at Orthanc by the superseded-copy sweep.  Shown: no instance under any
temporary ID in our index (C-FIND) or in Orthanc (``/tools/find`` by PatientID, instance and
patient level); pixel data byte-identical here and at Orthanc; the 10 reports re-issued
(their SR again under the real identity, and a signed correction addendum naming it);
``appliance restore`` from the bundles gives the corrected identities and the corrected files
byte for byte; the audit trail names each link and each removal with its link, and verifies;
a replayed and an inverted link change nothing (index, versions, outbox, Orthanc, audit).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pydicom
from dicom_data import write_series
from test_patients import _cli
from test_patients_reconciliation import _cfind, _sign, _storescu
from test_patients_superseded import add_pacs, start_pacs
from test_sync_common import BUCKET, age_identity, configure_sync, moto

from appliance.core import config, db, identity
from appliance.forwarding import outbox as forward_outbox
from appliance.forwarding import sending
from appliance.patients import registry, superseded
from appliance.reports import delivery
from appliance.reports import model as reports
from appliance.setup import site as setup_site
from appliance.sync import outbox as sync_outbox

__all__ = ["moto"]
PATIENTS, STUDIES, REPORTED = 50, 3, 10


def _pixels(data_dir: Path, conn) -> dict[str, bytes]:
    return {sop: pydicom.dcmread(data_dir / "studies" / path).PixelData
            for sop, path in conn.execute("SELECT sop_uid, path FROM instances")}


def _files(data_dir: Path, conn) -> dict[str, bytes]:
    return {sop: (data_dir / "studies" / path).read_bytes()
            for sop, path in conn.execute("SELECT sop_uid, path FROM instances")}


def _register(conn, cfg, tmp: Path) -> tuple[list[dict], list[dict], list[Path]]:
    desk = registry.Site.from_config(cfg)
    temps, reals, paths = [], [], []
    for i in range(PATIENTS):
        t = registry.register_trauma(conn, desk, actor="desk", sex_code="MF"[i % 2],
                                     age_band="adult")
        registry.add_order(conn, desk, t["id"], actor="desk", procedure="CTTRAUMA")
        temps.append(t)
        reals.append(registry.register(conn, desk, actor="desk", name=f"Real^Person{i}",
                                       patient_id=f"MRN-{i:03d}", birth="1970-01-01",
                                       sex_code="MF"[i % 2]))
        for j in range(STUDIES):
            paths += write_series(tmp / f"p{i}s{j}", 2 if j == 0 else 1,
                                  patient_id=t["patient_id"], patient_name=t["name"],
                                  accession=f"T{i}S{j}")[2]
    return temps, reals, paths


def _sync(monkeypatch, capsys, data_dir: Path) -> None:
    conn = db.connect(data_dir / "appliance.db")
    conn.execute("UPDATE studies SET last_received = last_received - 3600")
    conn.close()
    for _ in range(40):  # each pass builds a bounded number of bundles (and an audit slice)
        code, out, err = _cli(monkeypatch, capsys, data_dir, "sync", "now")
        assert code == 0, out + err
        conn = db.connect(data_dir / "appliance.db")
        left = sync_outbox.unbundled_instances(conn, time.time()) or \
            sync_outbox.unbundled_report_versions(conn)
        conn.close()
        if not left:
            return
    raise AssertionError(f"sync now still building after 40 passes: {out}")


def _state(conn, pacs) -> tuple:
    """What a replayed or inverted link must leave as it was."""
    return (conn.execute("SELECT count(*) FROM audit").fetchone()[0],
            conn.execute("SELECT count(*) FROM instance_versions").fetchone()[0],
            conn.execute("SELECT count(*) FROM superseded_copies").fetchone()[0],
            conn.execute("SELECT count(*) FROM forward_outbox WHERE state != 'delivered'")
            .fetchone()[0],
            conn.execute("SELECT group_concat(sha256) FROM (SELECT sha256 FROM instances"
                         " ORDER BY sop_uid)").fetchone()[0],
            len(pacs.instances()))


def _drain(cfg, step, key: str) -> int:
    n = total = 1
    while n:
        n = step(cfg)[key]
        total += n
    return total - 1


def test_fifty_casualties_reconciled_everywhere(dicom_site, dcmtk, moto, tmp_path: Path,
                                                monkeypatch, capsys):
    site, timings = dicom_site, {}
    started = time.monotonic()
    pacs = start_pacs(tmp_path / "orthanc", site.ae_title, site.dicom_port)
    add_pacs(monkeypatch, capsys, site.data_dir, pacs, api=True)
    key_file = tmp_path / "cloud.key"
    configure_sync(site, moto.url, [age_identity(key_file)])
    cfg = config.load(site.data_dir)
    conn = db.open_db(cfg.db_path)
    temps, reals, paths = _register(conn, cfg, tmp_path)
    t = time.monotonic()
    _storescu(dcmtk, site.dicom_port, site.ae_title, paths)
    timings["storescu 200"] = time.monotonic() - t
    assert conn.execute("SELECT count(*) FROM instances").fetchone()[0] == 200

    t = time.monotonic()
    for (uid,) in conn.execute("SELECT study_uid FROM studies").fetchall():
        forward_outbox.enqueue_study(conn, uid, [pacs.aet], "routine")
    assert _drain(cfg, sending.run_due, "stored") == 200
    timings["forward 200"] = time.monotonic() - t
    study_of = {x["patient_id"]: _cfind(conn, x["patient_id"]) for x in temps}
    assert all(len(v) == STUDIES for v in study_of.values())
    signed = [_sign(conn, cfg, study_of[x["patient_id"]][0]) for x in temps[:REPORTED]]
    assert _drain(cfg, delivery.run_due, "delivered") == REPORTED
    assert len(pacs.instances()) == 200 + REPORTED
    t = time.monotonic()
    _sync(monkeypatch, capsys, site.data_dir)  # the cloud holds the temporary identities
    timings["sync before"] = time.monotonic() - t
    before = _pixels(site.data_dir, conn)

    t = time.monotonic()
    for x, real in zip(temps, reals, strict=True):
        code, out, err = _cli(monkeypatch, capsys, site.data_dir, "patient", "link",
                              x["patient_id"], real["patient_id"], "--reason",
                              "identified by family", "--json")
        assert code == 0, err
    timings["50 links"] = time.monotonic() - t
    assert superseded.run_due(cfg) == 0  # queued, not delivered: nothing may be deleted
    assert len(pacs.instances()) == 200 + REPORTED

    t = time.monotonic()
    assert _drain(cfg, sending.run_due, "stored") == 200
    assert _drain(cfg, delivery.run_due, "delivered") == 2 * REPORTED  # SR again, addendum
    timings["re-send"] = time.monotonic() - t
    t = time.monotonic()
    assert superseded.run_due(cfg, now=time.time() + 60) == 200 + REPORTED
    timings["remove 210 old copies"] = time.monotonic() - t

    # Nothing under a temporary ID, here or at the PACS; pixels untouched in both.
    for x, real in zip(temps, reals, strict=True):
        assert _cfind(conn, x["patient_id"]) == []
        assert _cfind(conn, real["patient_id"]) == study_of[x["patient_id"]]
        assert pacs.find({"PatientID": x["patient_id"]}) == []
        assert pacs.find({"PatientID": x["patient_id"]}, "Patient") == []
    assert conn.execute("SELECT count(*) FROM studies WHERE patient_id LIKE '%-T%'"
                        ).fetchone()[0] == 0
    assert len(pacs.instances()) == 200 + 2 * REPORTED
    assert _pixels(site.data_dir, conn) == before
    at_pacs = {}
    for oid in pacs.instances():
        ds = pydicom.dcmread(io.BytesIO(pacs.file(oid)))
        assert ds.PatientID.startswith("MRN-"), ds.PatientID
        if "PixelData" in ds:
            at_pacs[str(ds.SOPInstanceUID)] = ds.PixelData
    assert at_pacs == before

    # The 10 reports re-issued: the SR again under the real identity, and an addendum.
    for x, real, rid in zip(temps[:REPORTED], reals[:REPORTED], signed, strict=True):
        assert reports.get_report(conn, rid)["status"] == "final"
        (add,) = reports.addenda(conn, rid)
        assert add["status"] == "final" and x["patient_id"] in add["findings"]
        assert real["name"] in add["findings"]
        srs = pacs.find({"PatientID": real["patient_id"], "Modality": "SR"})
        assert len(srs) == 2, real["patient_id"]

    # Audit: each link with who and why, each removal with its link; the chain holds.
    links = conn.execute("SELECT id, actor, object, detail FROM audit WHERE action ="
                         " 'patient.link' ORDER BY id").fetchall()
    assert [r[2] for r in links] == [x["patient_id"] for x in temps]
    assert all("identified by family" in r[3] and r[1].startswith("cli:") for r in links)
    link_ids = {r[0] for r in conn.execute("SELECT id FROM patient_links")}
    removed = conn.execute("SELECT detail FROM audit WHERE action ="
                           " 'patient.superseded.removed'").fetchall()
    assert len(removed) == 200 + REPORTED
    assert {json.loads(r[0])["link"] for r in removed} == link_ids
    code, out, err = _cli(monkeypatch, capsys, site.data_dir, "audit", "verify")
    assert code == 0 and "intact" in out, out + err

    # A replayed and an inverted link change nothing.
    state = _state(conn, pacs)
    code, out, _ = _cli(monkeypatch, capsys, site.data_dir, "patient", "link",
                        temps[0]["patient_id"], reals[0]["patient_id"], "--reason", "again")
    assert code == 0 and "nothing changed" in out
    for verb in ("link", "merge"):
        code, _, err = _cli(monkeypatch, capsys, site.data_dir, "patient", verb,
                            reals[0]["patient_id"], temps[0]["patient_id"], "--reason", "inv")
        assert code == 1 and err.startswith("error:"), err
    assert superseded.run_due(cfg, now=time.time() + 120) == 0
    assert _state(conn, pacs) == state

    # The cloud copy: restore from the bundles gives the corrected identities.
    files = _files(site.data_dir, conn)
    t = time.monotonic()
    _sync(monkeypatch, capsys, site.data_dir)  # the correction bundles
    timings["sync corrections"] = time.monotonic() - t
    fresh = setup_site.init_data_dir(tmp_path / "replacement", site_name="Replacement").data_dir
    signer = identity.key_id(identity.load_signing_key(site.data_dir / "keys").public_key())
    t = time.monotonic()
    code, out, err = _cli(monkeypatch, capsys, fresh, "restore", "--from", f"s3://{BUCKET}",
                          "--endpoint-url", moto.url, "--credentials-file",
                          str(site.data_dir / "keys" / "s3.credentials"), "--trust", signer,
                          "--identity", str(key_file))
    timings["restore"] = time.monotonic() - t
    assert code == 0, out + err
    restored = db.connect(fresh / "appliance.db")
    ids = {r[0]: r[1] for r in restored.execute("SELECT study_uid, patient_id FROM studies")}
    assert ids == {uid: real["patient_id"] for x, real in zip(temps, reals, strict=True)
                   for uid in study_of[x["patient_id"]]}
    assert _files(fresh, restored) == files
    kinds = [(r["kind"], r["status"]) for x in temps[:REPORTED]
             for r in reports.reports_for_study(restored, study_of[x["patient_id"]][0])]
    assert sorted(kinds) == sorted([("report", "final"), ("addendum", "final")] * REPORTED)
    restored.close()
    conn.close()
    pacs.stop(kill=True)
    timings["total"] = time.monotonic() - started
    print("; ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
