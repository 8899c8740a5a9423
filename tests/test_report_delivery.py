"""Signed reports reach a real site PACS (Debian's Orthanc) as SR and PDF, with retries.

The clock is driven by passing ``now`` to the delivery sweep: no test sleeps
through a backoff.
"""

from __future__ import annotations

import subprocess
import time

import pydicom
import pytest
from conftest import require_tool
from orthanc import orthanc  # noqa: F401  (fixture)
from pydicom.uid import BasicTextSRStorage, EncapsulatedPDFStorage
from reporting_site import add_known_ae, add_users, ingest_study, local_site, set_reports_config

from appliance.core import audit, config, db
from appliance.reports import delivery as report_delivery
from appliance.reports import model as reports

T0 = 1_900_000_000.0


@pytest.fixture
def site(tmp_path):
    return local_site(tmp_path)


def _setup(site, pacs, formats: str = "[sr, pdf, print]"):
    add_known_ae(site, "SITEPACS", "127.0.0.1", pacs.dicom_port)
    cfg = set_reports_config(site, deliver_to="SITEPACS", formats=formats)
    add_users(site)
    study_uid = ingest_study(site, 3, patient_id="PAT-77", patient_name="NGOZI^ADA",
                             accession="ACC-77", study_description="CT HEAD STROKE")
    return cfg, study_uid


def _signed_final(conn, cfg, study_uid: str, now: float = T0) -> int:
    templates = reports.load_templates()
    rid = reports.create(conn, study_uid=study_uid, author="dr.ray", template_id="ct-head-stroke",
                         templates=templates, now=now)
    reports.autosave(conn, rid, actor="dr.ray", templates=templates, base_revision=0,
                     fields={"haemorrhage": "absent", "side": "left", "aspects": ["M2", "I"]},
                     findings="Loss of grey-white differentiation in the left insula.",
                     impression="Early left MCA infarct, ASPECTS 8. No haemorrhage.", now=now)
    report_delivery.sign(conn, cfg, rid, actor="dr.ray", level="final", templates=templates,
                         now=now)
    return rid


def _texts(item) -> list[str]:
    """Every TextValue in an SR content tree (Orthanc simplified tags)."""
    out = []
    if isinstance(item, dict):
        for key, value in item.items():
            if key == "TextValue":
                out.append(value)
            else:
                out += _texts(value)
    elif isinstance(item, list):
        for v in item:
            out += _texts(v)
    return out


def test_signed_report_arrives_in_orthanc_as_sr_and_pdf(site, orthanc):  # noqa: F811
    cfg, study_uid = _setup(site, orthanc)
    conn = db.connect(site.data_dir / "appliance.db")
    rid = _signed_final(conn, cfg, study_uid)
    assert orthanc.instances() == []  # nothing is sent until the sweep runs

    report_delivery.sweep(cfg, now=T0 + 1)

    rows = report_delivery.for_report(conn, rid)
    assert [(r["format"], r["state"]) for r in rows] == [
        ("sr", "delivered"), ("pdf", "delivered"), ("print", "delivered")]
    ids = orthanc.instances()
    assert len(ids) == 2
    tags = {orthanc.simplified_tags(i)["SOPClassUID"]: orthanc.simplified_tags(i) for i in ids}
    sr = tags[BasicTextSRStorage]
    assert sr["StudyInstanceUID"] == study_uid  # lands on the same study and patient
    assert sr["PatientID"] == "PAT-77" and sr["AccessionNumber"] == "ACC-77"
    assert sr["PatientName"] == "NGOZI^ADA"
    assert sr["Modality"] == "SR" and sr["VerificationFlag"] == "VERIFIED"
    assert sr["CompletionFlag"] == "COMPLETE"
    assert sr["VerifyingObserverSequence"][0]["VerifyingObserverName"] == "Dr Ray Osei"
    texts = _texts(sr["ContentSequence"])
    assert "Early left MCA infarct, ASPECTS 8. No haemorrhage." in texts
    assert any(t.startswith("ASPECTS: 8/10") for t in texts)
    assert sr["SOPInstanceUID"] == rows[0]["sop_uid"]
    ct_series = {r[0] for r in conn.execute("SELECT series_uid FROM series")}
    assert sr["SeriesInstanceUID"] not in ct_series  # a new series of the same study

    pdf = tags[EncapsulatedPDFStorage]
    assert pdf["StudyInstanceUID"] == study_uid and pdf["MIMETypeOfEncapsulatedDocument"] == (
        "application/pdf")
    pdf_id = next(i for i in ids if orthanc.simplified_tags(i)["SOPClassUID"] ==
                  EncapsulatedPDFStorage)
    assert orthanc.pdf(pdf_id).startswith(b"%PDF-")
    printed = list((site.data_dir / "reports" / "print").glob("*.pdf"))
    assert [p.name for p in printed] == [f"ACC-77-report{rid}-final.pdf"]
    assert printed[0].read_bytes().startswith(b"%PDF-")

    # The SR is valid structured reporting as DCMTK reads it (a real, independent parser).
    sr_id = next(i for i in ids if i != pdf_id)
    path = site.data_dir / "sr.dcm"
    path.write_bytes(orthanc.file(sr_id))
    dsrdump = require_tool("dsrdump")
    out = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Basic Text SR" in out.stdout and "Early left MCA infarct" in out.stdout
    assert "Verified" in out.stdout or "VERIFIED" in out.stdout
    ds = pydicom.dcmread(path)
    assert len(ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
               .ReferencedSOPSequence) == 3  # the three CT images read


def test_delivery_retries_with_backoff_until_the_pacs_is_back(site, orthanc):  # noqa: F811
    cfg, study_uid = _setup(site, orthanc, formats="[sr]")
    orthanc.stop(kill=True)  # the PACS goes away (a crash: faster than its shutdown)
    conn = db.connect(site.data_dir / "appliance.db")
    rid = _signed_final(conn, cfg, study_uid)

    assert report_delivery.run_due(cfg, now=T0) == {"delivered": 0, "failed": 1}
    row = report_delivery.for_report(conn, rid)[0]
    assert row["state"] == "pending" and row["attempts"] == 1
    assert row["next_attempt_at"] == T0 + 5
    assert "SITEPACS at 127.0.0.1" in row["last_error"]

    assert report_delivery.run_due(cfg, now=T0 + 4) == {"delivered": 0, "failed": 0}  # not due
    assert report_delivery.run_due(cfg, now=T0 + 5) == {"delivered": 0, "failed": 1}
    assert report_delivery.for_report(conn, rid)[0]["next_attempt_at"] == T0 + 5 + 10
    t, gaps = T0 + 15, []
    for _ in range(8):  # the delay doubles, then stays at the cap (retry_max_backoff_s)
        report_delivery.run_due(cfg, now=t)
        next_at = report_delivery.for_report(conn, rid)[0]["next_attempt_at"]
        gaps.append(next_at - t)
        t = next_at
    assert gaps == [20, 40, 80, 160, 300, 300, 300, 300]
    assert report_delivery.for_report(conn, rid)[0]["attempts"] == 10

    orthanc.start()
    assert report_delivery.run_due(cfg, now=t) == {"delivered": 1, "failed": 0}
    assert report_delivery.run_due(cfg, now=t + 3600) == {"delivered": 0, "failed": 0}
    row = report_delivery.for_report(conn, rid)[0]
    assert row["state"] == "delivered" and row["attempts"] == 11 and row["last_error"] == ""
    ids = orthanc.instances()
    assert len(ids) == 1  # exactly once
    assert orthanc.simplified_tags(ids[0])["SOPInstanceUID"] == row["sop_uid"]
    outcomes = [(r["outcome"]) for r in audit.rows(conn) if r["action"] == "report.deliver"]
    assert outcomes == ["failed"] * 10 + ["ok"]


def test_a_worker_killed_after_sending_resends_the_same_instance(site, orthanc):  # noqa: F811
    """Sent, then died before recording it: the lease runs out, the resend keeps one copy."""
    cfg, study_uid = _setup(site, orthanc, formats="[sr]")
    conn = db.connect(site.data_dir / "appliance.db")
    rid = _signed_final(conn, cfg, study_uid)
    assert report_delivery._lease_one(conn, T0, "dead-worker", set()) is not None
    assert report_delivery._lease_one(conn, T0, "other-worker", set()) is None  # held
    row = report_delivery.for_report(conn, rid)[0]
    report_delivery.BACKENDS["sr"].send(report_delivery._job(conn, cfg, row))  # then "kill -9"
    assert len(orthanc.instances()) == 1

    assert report_delivery.run_due(cfg, now=T0 + 60) == {"delivered": 0, "failed": 0}  # leased
    assert report_delivery.run_due(cfg, now=T0 + report_delivery.LEASE_S) == {
        "delivered": 1, "failed": 0}
    assert len(orthanc.instances()) == 1
    assert report_delivery.for_report(conn, rid)[0]["state"] == "delivered"


def test_an_unreachable_pacs_costs_one_attempt_per_sweep_not_one_per_report(
        site, orthanc):  # noqa: F811
    cfg, study_uid = _setup(site, orthanc, formats="[sr]")
    other = ingest_study(site, 1, patient_id="PAT-78", accession="ACC-78")
    orthanc.stop(kill=True)  # the PACS goes away (a crash: faster than its shutdown)
    conn = db.connect(site.data_dir / "appliance.db")
    first, second = _signed_final(conn, cfg, study_uid), _signed_final(conn, cfg, other)
    assert report_delivery.run_due(cfg, now=T0) == {"delivered": 0, "failed": 1}
    attempts = [report_delivery.for_report(conn, r)[0]["attempts"] for r in (first, second)]
    assert attempts == [1, 0]  # the second waits for the next sweep instead of a timeout
    orthanc.start()
    assert report_delivery.run_due(cfg, now=T0 + 5) == {"delivered": 2, "failed": 0}
    assert len(orthanc.instances()) == 2


def test_a_real_worker_killed_mid_send_delivers_exactly_one_instance(site):
    """``appliance worker`` is SIGKILLed while the PACS holds its C-STORE; after the lease the
    same SOP Instance is sent again, and the row is delivered once."""
    import signal
    import threading

    from conftest import Site, free_port
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import BasicTextSRStorage as SRClass

    received, arrived, release = [], threading.Event(), threading.Event()

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        arrived.set()
        release.wait(60)  # a PACS that takes its time: the worker dies waiting
        return 0x0000

    port = free_port()
    scp = AE(ae_title="SITEPACS")
    scp.add_supported_context(SRClass)
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, on_store)])
    runner = Site(site.data_dir, 0, 0, "")
    try:
        add_known_ae(site, "SITEPACS", "127.0.0.1", port)
        cfg = set_reports_config(site, deliver_to="SITEPACS", formats="[sr]")
        add_users(site)
        conn = db.connect(site.data_dir / "appliance.db")
        rid = _signed_final(conn, cfg, ingest_study(site, 1), now=time.time())
        runner.start("worker")
        assert arrived.wait(60), "the worker never sent the SR"
        runner.stop("worker", signal.SIGKILL)
        row = report_delivery.for_report(conn, rid)[0]
        assert row["state"] == "pending" and row["lease_owner"] and row["attempts"] == 0
        release.set()

        t = time.time()
        assert report_delivery.run_due(cfg, now=t) == {"delivered": 0, "failed": 0}  # leased
        assert report_delivery.run_due(cfg, now=t + report_delivery.LEASE_S) == {
            "delivered": 1, "failed": 0}
        row = report_delivery.for_report(conn, rid)[0]
        assert row["state"] == "delivered" and row["attempts"] == 1
        assert received == [row["sop_uid"], row["sop_uid"]]  # the same instance, sent again
    finally:
        release.set()
        runner.stop_all()
        server.shutdown()


def test_cli_shows_waiting_deliveries_and_retries_them_now(site):
    from conftest import free_port, run_cli

    add_known_ae(site, "SITEPACS", "127.0.0.1", free_port())  # nothing listens there
    cfg = set_reports_config(site, deliver_to="SITEPACS", formats="[sr, pdf]")
    add_users(site)
    conn = db.connect(site.data_dir / "appliance.db")
    rid = _signed_final(conn, cfg, ingest_study(site, 1), now=time.time())
    report_delivery.run_due(cfg, now=time.time())
    out = run_cli("reports", "deliveries", "--data-dir", str(site.data_dir), check=True).stdout
    assert "SITEPACS" in out and "next try in" in out and "last error: SITEPACS at 127.0.0.1" \
        in out and "PAT001" not in out  # no patient data on the console
    rows = report_delivery.for_report(conn, rid)
    assert [r["attempts"] for r in rows] == [1, 0]  # the PDF waited behind the unreachable PACS
    bad = run_cli("reports", "retry", "999", "--data-dir", str(site.data_dir))
    assert bad.returncode == 1 and bad.stderr.strip() == "error: no delivery 999"
    done = run_cli("reports", "retry", "--all", "--data-dir", str(site.data_dir), check=True)
    assert done.stdout.startswith("2 deliveries due now")
    assert all(r["next_attempt_at"] <= time.time() for r in report_delivery.for_report(conn, rid))
    assert [r["actor"].startswith("cli:") for r in audit.rows(conn)
            if r["action"] == "report.deliver_retry"] == [True]


def test_a_destination_that_is_not_a_known_ae_is_refused_with_file_and_line(site):
    with pytest.raises(config.ConfigError, match=r"appliance.yaml:\d+:\d+: reports.deliver_to: "
                       r"'NOSUCHPACS' is not in dicom.known_aes"):
        set_reports_config(site, deliver_to="NOSUCHPACS")
    set_reports_config(site, deliver_to='""')  # the responder corrects the file
    add_known_ae(site, "SITEPACS", "127.0.0.1", 104)
    set_reports_config(site, deliver_to="SITEPACS")
    before = (site.data_dir / "appliance.yaml").read_text()

    def remove(items) -> None:
        del items[0]

    # Removing the PACS the reports go to is refused, and the file stays as it was.
    with pytest.raises(config.ConfigError, match="'SITEPACS' is not in dicom.known_aes"):
        config.edit_known_aes(site.data_dir, remove)
    assert (site.data_dir / "appliance.yaml").read_text() == before


@pytest.mark.parametrize("attempts,expected", [(1, 5), (2, 10), (3, 20), (7, 300), (50, 300)])
def test_backoff_doubles_up_to_the_cap(attempts, expected):
    assert report_delivery.backoff_s(attempts, 300) == expected
