"""``forward: AE`` sends every instance of a matching study to a real Orthanc (the site PACS):
as stored, decompressed only where the PACS demands it, retried with backoff, proved by a
C-FIND or by Storage Commitment.  Clocks are passed in; no test sleeps through a backoff."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
import pydicom
import pytest
from forwarding_site import FAR, complete, forwarding_site, ingest, pacs_sop_uids, site_pacs

from appliance.core import audit, db
from appliance.forwarding import outbox, sending


def test_a_forward_rule_sends_the_study_as_stored_and_proves_it_by_c_find(tmp_path, pacs):
    site, cfg = forwarding_site(tmp_path, pacs)
    study_uid, paths = ingest(site, 5)
    assert pacs.instances() == []
    complete(cfg)
    conn = db.connect(cfg.db_path)
    assert outbox.study_summary(conn, study_uid)["SITEPACS"]["waiting"] == 5

    assert sending.run_due(cfg, now=FAR) == {"stored": 5, "refused": 0, "retry": 0}

    assert sorted(pacs_sop_uids(pacs)) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
    for i in pacs.instances():
        got = pydicom.dcmread(io.BytesIO(pacs.file(i)))
        mine = next(pydicom.dcmread(p) for p in paths
                    if pydicom.dcmread(p).SOPInstanceUID == got.SOPInstanceUID)
        assert got.PixelData == mine.PixelData  # byte-identical pixels
    rows = outbox.study_rows(conn, study_uid)
    assert {(r["state"], r["proof"]) for r in rows} == {("delivered", "c-find")}
    assert sending.run_due(cfg, now=FAR + 1) == {"stored": 0, "refused": 0, "retry": 0}
    assert len(pacs.instances()) == 5
    assert [r["action"] for r in audit.rows(conn) if r["action"].startswith("forward.")] == [
        "forward.sent"]


def _compressed(paths, syntax):
    """Re-encode generated files losslessly (JPEG 2000 lossless via pylibjpeg-openjpeg)."""
    out = []
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def test_a_compressed_study_to_a_pacs_that_takes_only_uncompressed_arrives_decompressed(
        tmp_path, caplog):
    from dicom_data import write_series
    from forwarding_site import store_files
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    pacs = site_pacs(tmp_path / "orthanc", AcceptedTransferSyntaxes=[
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
    pacs.start()
    try:
        site, cfg = forwarding_site(tmp_path, pacs)
        study_uid, _series, paths = write_series(tmp_path / "j2k", 3)
        originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).pixel_array
                     for p in paths}
        _compressed(paths, JPEG2000Lossless)
        store_files(site, paths)
        complete(cfg)
        with caplog.at_level(logging.INFO, logger="appliance.forwarding"):
            assert sending.run_due(cfg, now=FAR)["stored"] == 3
        assert "decompressed from 1.2.840.10008.1.2.4.90" in caplog.text
        conn = db.connect(cfg.db_path)
        rows = outbox.study_rows(conn, study_uid)
        assert {(r["state"], r["sent_syntax"]) for r in rows} == {
            ("delivered", ExplicitVRLittleEndian)}
        for i in pacs.instances():
            got = pydicom.dcmread(io.BytesIO(pacs.file(i)))
            assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert np.array_equal(got.pixel_array, originals[got.SOPInstanceUID])  # lossless
        assert sorted(pacs_sop_uids(pacs)) == sorted(originals)  # the same objects
    finally:
        pacs.stop(kill=True)


def test_storage_commitment_result_comes_back_on_a_new_association_to_our_node(tmp_path, pacs):
    from appliance.runtime import dicom_service

    site, cfg = forwarding_site(tmp_path, pacs, commitment=True)
    node = dicom_service.build_node(cfg)
    node.start()
    try:
        study_uid, _ = ingest(site, 4)
        complete(cfg)
        conn = db.connect(cfg.db_path)
        assert sending.run_due(cfg, now=FAR)["stored"] == 4
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if {r["state"] for r in outbox.study_rows(conn, study_uid)} == {"delivered"}:
                break
            time.sleep(0.1)
        rows = outbox.study_rows(conn, study_uid)
        assert {(r["state"], r["proof"]) for r in rows} == {("delivered", "commitment")}
        assert [r["detail"]["committed"] for r in audit.rows(conn)
                if r["action"] == "forward.committed"] == [4]
    finally:
        node.stop()


def _status(site, as_json: bool, capsys) -> str:
    """``appliance forward status`` in-process (its parser and command; no interpreter start)."""
    from appliance import cli

    if not cli._EXTENSIONS:
        cli._load_extensions()
    args = cli.build_parser().parse_args(["forward", "status", "--data-dir", str(site.data_dir)]
                                         + (["--json"] if as_json else []))
    capsys.readouterr()
    assert args.func(args) == 0
    return capsys.readouterr().out


def test_cli_ae_add_commitment_forward_by_hand_and_status(tmp_path, pacs, capsys):
    import json

    from conftest import run_cli

    from appliance.core import config
    from appliance.runtime import dicom_service

    site, cfg = forwarding_site(tmp_path, pacs)
    for f in (site.data_dir / "workflows").glob("*.yaml"):
        f.unlink()  # no rule: only the hand-made forward sends
    d = ["--data-dir", str(site.data_dir)]
    bad = run_cli("forward", "--study-uid", "1.2.3", "--to", "NOSUCH", *d)
    assert bad.returncode == 1 and "'NOSUCH' is not a known AE" in bad.stderr
    out = run_cli("ae", "add", "PACS2", "--host", "127.0.0.1", "--port", str(pacs.dicom_port),
                  "--commitment", *d, check=True)
    assert "added PACS2" in out.stdout
    cfg = config.load(site.data_dir)
    assert cfg.known_ae("PACS2").commitment and not cfg.known_ae("SITEPACS").commitment
    assert "commitment: true" in (site.data_dir / "appliance.yaml").read_text()
    study_uid, _ = ingest(site, 3)
    assert _status(site, False, capsys).strip() == "nothing forwarded yet"
    node = dicom_service.build_node(cfg)
    node.start()
    try:
        out = run_cli("forward", "--study-uid", study_uid, "--to", "PACS2", "--wait", "20",
                      "--json", *d, check=True)
    finally:
        node.stop()
    result = json.loads(out.stdout)
    assert result["queued"] == 3 and result["study"]["PACS2"]["delivered"] == 3
    status = json.loads(_status(site, True, capsys))
    assert [(s["destination"], s["delivered"], s["proved_by"], s["waiting"], s["failed"])
            for s in status] == [("PACS2", 3, {"commitment": 3}, 0, 0)]
    text = _status(site, False, capsys)
    assert "PACS2: waiting 0, sending 0, stored 0, delivered 3 (proved by commitment 3)" in text
    conn = db.connect(cfg.db_path)
    assert [r["actor"] for r in audit.rows(conn) if r["action"] == "forward.request"] != []


def test_resend_instances_requeues_to_every_destination_they_went_to(tmp_path, pacs):
    from forwarding_site import add_destination, site_pacs

    other = site_pacs(tmp_path / "other", aet="PACS2")
    other.start()
    try:
        site, cfg = forwarding_site(tmp_path, pacs)
        add_destination(site, "PACS2", other.dicom_port)
        from appliance.core import config

        cfg = config.load(site.data_dir)
        study_uid, paths = ingest(site, 3)
        complete(cfg)
        conn = db.connect(cfg.db_path)
        with db.transaction(conn):
            outbox.enqueue_study(conn, study_uid, ["PACS2"], "routine", FAR)
        assert sending.run_due(cfg, now=FAR)["stored"] == 6
        uid = pydicom.dcmread(paths[0]).SOPInstanceUID
        assert outbox.resend_instances(conn, [uid, "1.2.3.4.not.sent"], now=FAR + 10) == 2
        rows = [r for r in outbox.study_rows(conn, study_uid) if r["sop_uid"] == uid]
        assert sorted((r["destination"], r["state"]) for r in rows) == [
            ("PACS2", "waiting"), ("SITEPACS", "waiting")]
        assert sending.run_due(cfg, now=FAR + 10)["stored"] == 2
        assert {r["state"] for r in outbox.study_rows(conn, study_uid)} == {"delivered"}
        assert len(pacs.instances()) == len(other.instances()) == 3  # still one copy each
    finally:
        other.stop(kill=True)


class _CountingPacs:
    """A pynetdicom storage SCP (with C-FIND at IMAGE level, for the proof) that records
    how many associations were open at once and every SOP Instance UID it stored."""

    def __init__(self, port: int, expected: int):
        import threading
        from types import SimpleNamespace

        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        self.lock, self.open, self.most, self.stored = threading.Lock(), 0, 0, []
        self.expected, self.all_open = expected, threading.Event()
        ae = AE("COUNTPACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1",
                                                          "1.2.840.10008.1.2"])
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        handlers = [(evt.EVT_ESTABLISHED, self._opened), (evt.EVT_RELEASED, self._closed),
                    (evt.EVT_ABORTED, self._closed), (evt.EVT_C_STORE, self._store),
                    (evt.EVT_C_FIND, self._find)]
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
        self.address = SimpleNamespace(dicom_port=port, node_port=port)

    def _opened(self, event) -> None:
        with self.lock:
            self.open += 1
            self.most = max(self.most, self.open)
            if self.open >= self.expected:
                self.all_open.set()

    def _closed(self, event) -> None:
        with self.lock:
            self.open -= 1

    def _store(self, event) -> int:
        self.all_open.wait(10)  # the first stores wait for the other lanes (no timing luck)
        with self.lock:
            self.stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    def _find(self, event):
        for uid in list(self.stored):
            ident = pydicom.Dataset()
            ident.QueryRetrieveLevel, ident.SOPInstanceUID = "IMAGE", uid
            yield 0xFF00, ident


@pytest.mark.parametrize("associations", [1, 3])
def test_a_batch_goes_over_the_configured_number_of_associations_each_instance_once(
        tmp_path, associations):
    from conftest import free_port

    scp = _CountingPacs(free_port(), associations)
    try:
        site, cfg = forwarding_site(tmp_path, scp.address, batch=90, associations=associations)
        study_uid, paths = ingest(site, 90, rows=32, cols=32)
        complete(cfg)
        assert sending.run_due(cfg, now=FAR) == {"stored": 90, "refused": 0, "retry": 0}
        assert scp.most == associations  # side by side, not one after another
        assert sorted(scp.stored) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in paths)
        conn = db.connect(cfg.db_path)
        assert {r["state"] for r in outbox.study_rows(conn, study_uid)} == {"delivered"}
        sent = [r for r in audit.rows(conn) if r["action"] == "forward.sent"]
        assert len(sent) == associations  # one audit row per association's batch
        assert audit.verify(conn)[0]  # lanes writing side by side never fork the chain
    finally:
        scp.server.shutdown()


def test_a_c_find_proof_counts_only_the_copy_under_the_current_patient_id(tmp_path, pacs):
    """After a reconciliation the PACS may still hold the old copy (same SOP Instance UID)
    under the temporary ID: that copy must not prove the corrected one arrived."""
    site, cfg = forwarding_site(tmp_path, pacs)
    study_uid, _paths = ingest(site, 3)
    complete(cfg)
    assert sending.run_due(cfg, now=FAR)["stored"] == 3
    conn = db.connect(cfg.db_path)
    held_as = conn.execute("SELECT patient_id FROM studies WHERE study_uid = ?",
                           (study_uid,)).fetchone()[0]
    conn.execute("UPDATE studies SET patient_id = 'REAL-0001' WHERE study_uid = ?", (study_uid,))
    conn.execute("UPDATE forward_outbox SET state = 'stored', proof = '', stored_at = ?",
                 (FAR,))  # as if the corrected copies were stored and the sender then died
    sending.prove_left_over(conn, cfg, FAR + 10, lambda: FAR + 10)
    assert {r["state"] for r in outbox.study_rows(conn, study_uid)} == {"stored"}
    conn.execute("UPDATE studies SET patient_id = ? WHERE study_uid = ?", (held_as, study_uid))
    sending.prove_left_over(conn, cfg, FAR + 20, lambda: FAR + 20)
    assert {(r["state"], r["proof"]) for r in outbox.study_rows(conn, study_uid)} == {
        ("delivered", "c-find")}


def test_a_c_store_response_the_reactor_took_goes_back_to_the_waiting_sender(tmp_path):
    """pynetdicom's reactor may take a C-STORE response off the queue between two sends
    (its pause flag races); dropped, the sender waits out the DIMSE timeout. We give it back."""
    from conftest import free_port
    from dicom_data import write_series
    from pynetdicom.dimse_primitives import C_STORE

    from dicom_node import store_scu

    scp = _CountingPacs(free_port(), 1)
    try:
        _st, _se, paths = write_series(tmp_path / "ct", 2, rows=16, cols=16)
        items = []
        for p in paths:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            items.append(store_scu.Item(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                                        str(ds.file_meta.TransferSyntaxUID), p))
        with store_scu.Connection("FIELDAPP", "COUNTPACS", "127.0.0.1",
                                  scp.address.dicom_port, items) as link:
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0x0000
            link.assoc._serve_request(rsp, 1)  # what the reactor does with what it took
            assert link.assoc.dimse.get_msg(block=False) == (1, rsp)
            link.assoc._serve_request(rsp, 1)  # once only: a stray answer is not kept forever
            assert link.assoc.dimse.get_msg(block=False) == (None, None)
            assert [link.send(it).outcome for it in items] == ["stored", "stored"]
    finally:
        scp.server.shutdown()
