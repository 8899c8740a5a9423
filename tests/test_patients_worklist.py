"""The Modality Worklist SCP and MPPS SCP, driven by dcmtk's findscu -W and pynetdicom's SCU.

One real ``appliance dicom`` process serves orders registered through the real CLI:
dcmtk queries by modality and date range, by station AE, by patient name wildcard; an
AE without ``--worklist`` is refused (and audited); pynetdicom's MPPS SCU (N-CREATE
then N-SET) moves an order to in progress and then completed, and a replay or a late
change of a final step is refused or changes nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from conftest import make_site, require_tool
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE

from appliance.core import config, db
from appliance.patients import registry
from dicom_node import mpps

NODELAY = {**os.environ, "TCP_NODELAY": "1"}


@pytest.fixture(scope="module")
def mwl_site(tmp_path_factory):
    require_tool("findscu")
    site = make_site(tmp_path_factory.mktemp("mwl"), site_name="Camp N")
    # In-process (the CLI's own functions are tested in test_patients.py): fast set-up.
    config.edit_known_aes(site.data_dir, lambda items: items.extend([
        {"name": "CT1", "worklist": True}, {"name": "CR1", "worklist": True},
        {"name": "WS1", "query": True}]))  # WS1 may query studies, not the worklist
    cfg = config.load(site.data_dir)
    desk = registry.Site.from_config(cfg)
    conn = db.open_db(cfg.db_path)
    orders = {}
    for name, proc, station, at in (
            ("Doe^Jane", "CTHEAD", "CT1", "2026-03-01T09:30"),
            ("Dupont^Jean", "CTCHEST", "CT1", "2026-03-02T14:00"),
            ("Doe^John", "CRCHEST", "CR1", "2026-03-01T10:00")):
        p = registry.register(conn, desk, actor="test", name=name, sex_code="M",
                              estimated_age=40)
        orders[name] = registry.add_order(conn, desk, p["id"], actor="test", procedure=proc,
                                          station_ae=station, reason=f"reason {name}",
                                          scheduled=dt.datetime.fromisoformat(at))
    conn.close()
    site.start_dicom()
    yield site, orders
    site.stop_all()


def _find(site, tmp: Path, *keys: str, aet: str = "CT1") -> tuple[list[Dataset], str]:
    """Run findscu -W with these keys; the responses as datasets (written by --extract)."""
    out = tmp / f"rsp-{len(list(tmp.iterdir()))}"
    out.mkdir()
    base = ["-k", "PatientName", "-k", "PatientID", "-k", "AccessionNumber",
            "-k", "StudyInstanceUID", "-k", "ReasonForTheRequestedProcedure",
            "-k", "(0040,0100)[0].Modality", "-k", "(0040,0100)[0].ScheduledStationAETitle",
            "-k", "(0040,0100)[0].ScheduledProcedureStepStartDate",
            "-k", "(0040,0100)[0].ScheduledProcedureStepStartTime"]
    r = subprocess.run(["findscu", "-v", "-W", "-aet", aet, "-aec", "FIELDAPP", "-X", "-od", str(out),
                        *base, *keys, "127.0.0.1", str(site.dicom_port)],
                       capture_output=True, text=True, env=NODELAY, timeout=60)
    return [pydicom.dcmread(p) for p in sorted(out.iterdir())], r.stdout + r.stderr


def test_findscu_queries_by_modality_date_station_and_name(mwl_site, tmp_path):
    site, orders = mwl_site
    found, _ = _find(site, tmp_path, "-k", "(0040,0100)[0].Modality=CT",
                     "-k", "(0040,0100)[0].ScheduledProcedureStepStartDate=20260301-20260301")
    assert [str(d.AccessionNumber) for d in found] == [orders["Doe^Jane"]["accession"]]
    item = found[0].ScheduledProcedureStepSequence[0]
    assert (item.Modality, item.ScheduledStationAETitle, item.ScheduledProcedureStepStartTime) \
        == ("CT", "CT1", "093000")
    assert str(found[0].StudyInstanceUID) == orders["Doe^Jane"]["study_uid"]
    assert found[0].ReasonForTheRequestedProcedure == "reason Doe^Jane"

    found, _ = _find(site, tmp_path, "-k", "(0040,0100)[0].ScheduledStationAETitle=CT1")
    assert {str(d.PatientName) for d in found} == {"DOE^JANE", "DUPONT^JEAN"}

    found, _ = _find(site, tmp_path, "-k", "PatientName=doe*")  # case-insensitive, as C-FIND
    assert {str(d.PatientName) for d in found} == {"DOE^JANE", "DOE^JOHN"}
    found, _ = _find(site, tmp_path, "-k", "PatientName=nobody*")
    assert found == []


def test_an_ae_without_worklist_is_refused_and_audited(mwl_site, tmp_path):
    site, _ = mwl_site
    found, log = _find(site, tmp_path, aet="WS1")
    assert found == [] and "Unknown Status: 0x124" in log
    conn = site.db()
    row = conn.execute("SELECT actor, detail FROM audit WHERE action = 'dicom.mwl_find.refused'"
                       " ORDER BY id DESC").fetchone()
    conn.close()
    assert row[0] == "dicom:WS1" and "no --worklist" in row[1]


def _mpps_create(study_uid: str, accession: str) -> Dataset:
    ds = Dataset()
    step = Dataset()
    step.StudyInstanceUID = study_uid
    step.AccessionNumber = accession
    step.ScheduledProcedureStepID = accession
    ds.ScheduledStepAttributesSequence = Sequence([step])
    ds.PatientName = "DOE^JOHN"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedStationAETitle = "CR1"
    ds.Modality = "CR"
    return ds


def test_mpps_moves_the_order_to_completed_and_a_final_step_stays_final(mwl_site, tmp_path):
    site, orders = mwl_site
    order = orders["Doe^John"]
    ae = AE(ae_title="CR1")
    ae.add_requested_context(mpps.MPPS_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", site.dicom_port, ae_title="FIELDAPP")
    assert assoc.is_established
    uid = generate_uid()
    try:
        status, _ = assoc.send_n_create(_mpps_create(order["study_uid"], order["accession"]),
                                        mpps.MPPS_SOP_CLASS, uid)
        assert status.Status == 0x0000
        assert _status(site, order["accession"]) == "in_progress"
        status, _ = assoc.send_n_create(_mpps_create(order["study_uid"], order["accession"]),
                                        mpps.MPPS_SOP_CLASS, uid)
        assert status.Status == mpps.DUPLICATE_INSTANCE
        done = Dataset()
        done.PerformedProcedureStepStatus = "COMPLETED"
        status, _ = assoc.send_n_set(done, mpps.MPPS_SOP_CLASS, uid)
        assert status.Status == 0x0000
        assert _status(site, order["accession"]) == "completed"
        status, _ = assoc.send_n_set(done, mpps.MPPS_SOP_CLASS, uid)  # a replay: no change
        assert status.Status == 0x0000
        stop = Dataset()
        stop.PerformedProcedureStepStatus = "DISCONTINUED"
        status, _ = assoc.send_n_set(stop, mpps.MPPS_SOP_CLASS, uid)
        assert status.Status == mpps.MAY_NO_LONGER_BE_UPDATED
        status, _ = assoc.send_n_set(done, mpps.MPPS_SOP_CLASS, generate_uid())
        assert status.Status == mpps.NO_SUCH_INSTANCE
    finally:
        assoc.release()
    assert _status(site, order["accession"]) == "completed"
    found, _ = _find(site, tmp_path, "-k", "PatientName=DOE^JOHN", aet="CR1")
    assert found == []  # a completed order leaves the worklist
    conn = site.db()
    actions = [r[0] for r in conn.execute(
        "SELECT action FROM audit WHERE object = ? ORDER BY id", (order["accession"],))]
    conn.close()
    assert actions == ["order.create", "order.in_progress", "order.completed"]


def test_mpps_from_an_ae_without_worklist_is_refused(mwl_site):
    site, orders = mwl_site
    ae = AE(ae_title="WS1")
    ae.add_requested_context(mpps.MPPS_SOP_CLASS)
    assoc = ae.associate("127.0.0.1", site.dicom_port, ae_title="FIELDAPP")
    try:
        order = orders["Dupont^Jean"]
        status, _ = assoc.send_n_create(_mpps_create(order["study_uid"], order["accession"]),
                                        mpps.MPPS_SOP_CLASS, generate_uid())
        assert status.Status == mpps.NOT_AUTHORIZED
    finally:
        assoc.release()
    assert _status(site, orders["Dupont^Jean"]["accession"]) == "scheduled"


def _status(site, accession: str) -> str:
    conn = site.db()
    row = conn.execute("SELECT status FROM orders WHERE accession = ?", (accession,)).fetchone()
    conn.close()
    return row[0]
