"""The storage association path (dicom_node/store_association.py) against pynetdicom's.

Nodes run in this process (``DicomNode`` on a real socket, real study store and
SQLite), so a short network timeout or a small association limit can be set
without a site.  Where the two paths must agree, the same bytes are sent to a
node with ``fast_store`` on and one with it off, and the PDUs that come back
are compared byte for byte.  Malformed traffic is sent from a raw socket;
ordinary traffic from dcmtk and pynetdicom's SCU.
"""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from conftest import free_port
from dicom_data import make_instance, write_series
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_ECHO_RSP, C_FIND_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from appliance.core import db
from dicom_node import retrieve
from dicom_node import store_association as fast
from dicom_node.node import DicomNode, NodeSettings, Peer
from dicom_node.study_store import StudyStore

IMPLICIT = "1.2.840.10008.1.2"
JPEG2000 = "1.2.840.10008.1.2.4.90"
MPEG2 = "1.2.840.10008.1.2.4.100"  # not among the storage syntaxes we accept
CT_CX = [(CTImageStorage, [ExplicitVRLittleEndian])]


@pytest.fixture(autouse=True)
def send_files_verbatim(monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@dataclass
class Node:
    node: DicomNode
    port: int
    root: Path
    rejected: list

    @property
    def fast_active(self) -> int:
        return self.node.server._fast_active

    @property
    def pynetdicom_active(self) -> int:
        return len(self.node.server.active_associations)

    def instances(self) -> list:
        conn = db.connect(self.root / "a.db")
        try:
            return [r["sop_uid"] for r in conn.execute("SELECT sop_uid FROM instances")]
        finally:
            conn.close()

    def leftovers(self) -> list[Path]:
        return list((self.root / "studies").rglob("*.part"))

    def wait_idle(self, timeout: float = 10) -> None:
        """Until every association has ended on the node's side (bounded)."""
        deadline = time.monotonic() + timeout
        while self.fast_active or self.pynetdicom_active:
            assert time.monotonic() < deadline, "association still open on the node"
            time.sleep(0.02)


@pytest.fixture
def make_node(tmp_path):
    made: list[DicomNode] = []

    def make(name: str = "fast", fast_store: bool = True, **settings) -> Node:
        root = tmp_path / name
        root.mkdir()
        db.open_db(root / "a.db").close()
        store = StudyStore(root / "studies", root / "a.db", connect=db.connect)
        port = free_port()
        peers = settings.pop("peers", [])
        rejected: list = []
        node = DicomNode(NodeSettings("FIELDAPP", port, bind="127.0.0.1", fast_store=fast_store,
                                      peers=lambda: peers, **settings),
                         store, on_reject=lambda *a: rejected.append(a))
        retrieve.add_contexts(node.ae)
        node.handlers.extend(retrieve.handlers(node.settings, store, lambda kind, detail: None))
        node.start()
        made.append(node)
        return Node(node, port, root, rejected)

    yield make
    for node in made:
        node.stop()


# -- raw DICOM over a socket ----------------------------------------------------------------
def request_pdu(contexts, calling: str = "RAWSCU", max_pdu: int = 16382) -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = fast.APPLICATION_CONTEXT
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "FIELDAPP"
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = syntaxes
        primitive.presentation_context_definition_list.append(cx)
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [max_length, class_uid]
    return A_ASSOCIATE_RQ(primitive).encode()


def pdv_pdu(context_id: int, control: int, data: bytes) -> bytes:
    item = struct.pack(">IBB", len(data) + 2, context_id, control) + data
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


class Raw:
    """A raw TCP peer speaking PDUs by hand."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exactly(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def pdu(self) -> bytes:
        header = self._exactly(6)
        return header + self._exactly(struct.unpack(">I", header[2:])[0])

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def associate(self, contexts=CT_CX, **kw) -> bytes:
        self.send(request_pdu(contexts, **kw))
        answer = self.pdu()
        assert answer[0] == 0x02, answer[:10]
        return answer

    def close(self) -> None:
        self.sock.close()


def command_bytes(primitive, message_class) -> bytes:
    msg = message_class()
    msg.primitive_to_message(primitive)
    return encode(msg.command_set, True, True)


def store_rq(sop_class: str, sop_uid: str, message_id: int = 1) -> bytes:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = 2
    req.DataSet = io.BytesIO(b"\0\0")
    return command_bytes(req, C_STORE_RQ)


def instance_body(tmp_path: Path, rows: int = 16) -> tuple[str, bytes]:
    """(SOP Instance UID, explicit VR LE dataset bytes) of a small generated CT."""
    ds = make_instance(generate_uid(), generate_uid(), 0, rows=rows, cols=rows)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    raw = buf.getvalue()
    (meta_len,) = struct.unpack("<I", raw[140:144])
    return str(ds.SOPInstanceUID), raw[144 + meta_len:]


def response_of(pdu: bytes) -> dict:
    """The command elements of a one-PDV command P-DATA-TF."""
    assert pdu[0] == 0x04 and pdu[11] & 0x03 == 0x03, pdu[:12]
    return fast.parse_command(pdu[12:]) | {"raw": pdu[12:]}


def abort_of(pdu: bytes) -> tuple[int, int]:
    assert pdu[0] == 0x07, pdu
    return pdu[8], pdu[9]


# -- byte-for-byte agreement with pynetdicom ---------------------------------------------------
def test_accept_is_byte_identical_to_pynetdicoms(make_node):
    contexts = [(CTImageStorage, [JPEG2000, IMPLICIT, ExplicitVRLittleEndian]),
                (MRImageStorage, [MPEG2]), (Verification, [IMPLICIT])]
    ours, theirs = make_node("fast"), make_node("slow", fast_store=False)
    answers = {}
    for node in (ours, theirs):
        peer = Raw(node.port)
        answers[node.root.name] = peer.associate(contexts)
        if node is ours:
            assert (ours.fast_active, ours.pynetdicom_active) == (1, 0)
        else:
            assert theirs.pynetdicom_active == 1
        peer.close()
    assert answers["fast"] == answers["slow"]
    # As pynetdicom negotiates: the acceptor's order of syntaxes picks Explicit VR LE, and an
    # unsupported transfer syntax is result 4.
    ac = A_ASSOCIATE_AC()
    ac.decode(answers["fast"])
    results = {cx.context_id: (cx.result, cx.transfer_syntax[0])
               for cx in ac.to_primitive().presentation_context_definition_results_list}
    assert results == {1: (0, ExplicitVRLittleEndian), 3: (4, MPEG2), 5: (0, IMPLICIT)}


def test_unknown_calling_ae_is_rejected_alike_and_reported(make_node, dcmtk, tmp_path):
    ours = make_node("fast", store_from="known", peers=[Peer("KNOWNCT")])
    theirs = make_node("slow", fast_store=False, store_from="known", peers=[Peer("KNOWNCT")])
    answers = []
    for node in (ours, theirs):
        peer = Raw(node.port)
        peer.send(request_pdu(CT_CX, calling="STRANGER"))
        answers.append(peer.pdu())
        peer.close()
    assert answers[0] == answers[1] == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x03"
    assert [r[0] for r in ours.rejected] == ["STRANGER"]
    _, _, (path,) = write_series(tmp_path, 1, rows=16, cols=16)
    refused = subprocess.run([dcmtk["storescu"], "-aet", "OTHER", "-aec", "FIELDAPP", "127.0.0.1",
                              str(ours.port), str(path)], capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr
    accepted = subprocess.run([dcmtk["storescu"], "-aet", "KNOWNCT", "-aec", "FIELDAPP",
                               "127.0.0.1", str(ours.port), str(path)], capture_output=True,
                              text=True, timeout=30)
    assert accepted.returncode == 0, accepted.stderr
    assert len(ours.instances()) == 1 and [r[0] for r in ours.rejected] == ["STRANGER", "OTHER"]


def test_response_command_sets_are_pynetdicoms_encoding():
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = "1.2.3.4"
    rsp.Status = 0xA900
    rsp.ErrorComment = "missing StudyInstanceUID"
    assert fast.response_command(0x8001, 7, 0xA900, CTImageStorage, "1.2.3.4",
                                 "missing StudyInstanceUID") == command_bytes(rsp, C_STORE_RSP)
    rsp.Status, rsp.ErrorComment = 0, None
    assert fast.response_command(0x8001, 7, 0, CTImageStorage, "1.2.3.4") == \
        command_bytes(rsp, C_STORE_RSP)
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo = 3
    echo.AffectedSOPClassUID = Verification
    echo.Status = 0
    assert fast.response_command(0x8030, 3, 0, Verification) == command_bytes(echo, C_ECHO_RSP)


def test_command_parser_reads_pynetdicoms_encoding():
    req = C_STORE()
    req.MessageID = 513
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = "1.2.840.99.1"
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = "MOVER"
    req.MoveOriginatorMessageID = 9
    req.DataSet = io.BytesIO(b"\0\0")
    parsed = fast.parse_command(command_bytes(req, C_STORE_RQ))
    assert parsed == {"CommandField": 1, "MessageID": 513, "CommandDataSetType": 0x0001,
                      "AffectedSOPClassUID": CTImageStorage,
                      "AffectedSOPInstanceUID": "1.2.840.99.1"}
    with pytest.raises(fast.BadCommand):
        fast.parse_command(command_bytes(req, C_STORE_RQ)[:-3])


def test_requests_for_other_services_are_told_apart_from_the_bytes():
    find = (StudyRootQueryRetrieveInformationModelFind, [IMPLICIT])
    assert fast.proposes_other_services(request_pdu([*CT_CX, find]))
    assert fast.proposes_other_services(request_pdu([("1.2.3.4", [IMPLICIT])]))
    assert not fast.proposes_other_services(request_pdu([*CT_CX, (Verification, [IMPLICIT])]))
    assert not fast.proposes_other_services(b"GET / HTTP/1.1\r\n")
    assert not fast.proposes_other_services(request_pdu(CT_CX)[:80])  # cut short: decoded later


def test_responses_are_cut_to_the_peers_maximum_pdu():
    data = bytes(range(200))
    pdus = fast.pdata_pdus(5, data, True, 64)
    assert all(len(p) <= 64 + 6 for p in pdus) and len(pdus) == 4
    assert b"".join(p[12:] for p in pdus) == data
    assert [p[11] for p in pdus] == [0x01, 0x01, 0x01, 0x03]
    assert fast.pdata_pdus(5, data, False, 0)[0][11] == 0x02


# -- ordinary traffic ---------------------------------------------------------------------------
def test_dcmtk_store_and_echo_go_through_the_storage_path(make_node, dcmtk, tmp_path):
    node = make_node()
    _, _, paths = write_series(tmp_path / "in", 5, rows=64, cols=64)
    proc = subprocess.Popen([dcmtk["storescu"], "-aet", "MODALITY", "-aec", "FIELDAPP",
                             "127.0.0.1", str(node.port), *map(str, paths)],
                            stderr=subprocess.PIPE, text=True)
    echo = subprocess.run([dcmtk["echoscu"], "-aet", "MODALITY", "-aec", "FIELDAPP", "127.0.0.1",
                           str(node.port)], capture_output=True, text=True, timeout=30)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert echo.returncode == 0, echo.stderr
    assert node.pynetdicom_active == 0  # neither went to pynetdicom
    conn = db.connect(node.root / "a.db")
    rows = {r["sop_uid"]: r for r in conn.execute("SELECT sop_uid, path, calling_ae FROM instances")}
    conn.close()
    for path in paths:
        sent = pydicom.dcmread(path)
        stored = pydicom.dcmread(node.root / "studies" / rows[str(sent.SOPInstanceUID)]["path"])
        assert stored.PixelData == sent.PixelData and stored.PatientName == sent.PatientName
        assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert {r["calling_ae"] for r in rows.values()} == {"MODALITY"}


def test_datasets_in_many_small_pdus_are_reassembled(make_node, dcmtk, tmp_path):
    node = make_node()
    _, _, paths = write_series(tmp_path, 2, rows=128, cols=128)  # 32 KiB each: 8+ PDUs
    sent = subprocess.run([dcmtk["storescu"], "--max-send-pdu", "4096", "-aec", "FIELDAPP",
                           "127.0.0.1", str(node.port), *map(str, paths)],
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    conn = db.connect(node.root / "a.db")
    rows = dict(conn.execute("SELECT sop_uid, path FROM instances").fetchall())
    conn.close()
    for path in paths:
        ds = pydicom.dcmread(path)
        stored = pydicom.dcmread(node.root / "studies" / rows[str(ds.SOPInstanceUID)])
        assert stored.PixelData == ds.PixelData


def test_storage_with_query_contexts_goes_to_pynetdicom_and_both_work(make_node, tmp_path):
    node = make_node(peers=[Peer("PYSCU", query=True)])
    _, _, (path,) = write_series(tmp_path, 1, rows=16, cols=16)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FIELDAPP")
    assert assoc.is_established
    try:
        assert (node.fast_active, node.pynetdicom_active) == (0, 1)
        assert assoc.send_c_store(path).Status == 0
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        found = [ds.StudyInstanceUID for status, ds in
                 assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                 if status.Status == 0xFF00]
    finally:
        assoc.release()
    assert found == [pydicom.dcmread(path).StudyInstanceUID]


def test_a_pdu_bigger_than_a_piece_is_read_in_pieces(make_node, tmp_path, monkeypatch):
    """pynetdicom sends a whole dataset in one PDU when we announce no maximum."""
    monkeypatch.setattr(fast, "PDU_PIECE", 4096)
    node = make_node()
    _, _, (path,) = write_series(tmp_path, 1, rows=128, cols=128)  # 32 KiB of pixels
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FIELDAPP")
    try:
        assert assoc.send_c_store(path).Status == 0
    finally:
        assoc.release()
    sent = pydicom.dcmread(path)
    conn = db.connect(node.root / "a.db")
    (rel,) = conn.execute("SELECT path FROM instances").fetchone()
    conn.close()
    assert pydicom.dcmread(node.root / "studies" / rel).PixelData == sent.PixelData


def test_failure_status_and_comment_reach_the_sender(make_node, tmp_path):
    node = make_node()
    ds = make_instance(generate_uid(), generate_uid(), 0, rows=16, cols=16)
    del ds.StudyInstanceUID
    bad = tmp_path / "bad.dcm"
    ds.save_as(bad, enforce_file_format=True)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="FIELDAPP")
    try:
        status = assoc.send_c_store(bad)
        again = assoc.send_c_store(bad)
    finally:
        assoc.release()
    assert (status.Status, status.ErrorComment) == (0xA900, "missing StudyInstanceUID")
    assert again.Status == 0xA900 and node.instances() == []


def test_query_command_on_a_storage_association_is_refused_and_storing_goes_on(make_node,
                                                                               tmp_path):
    node = make_node()
    peer = Raw(node.port)
    peer.associate()
    find = C_FIND()
    find.MessageID = 4
    find.AffectedSOPClassUID = StudyRootQueryRetrieveInformationModelFind
    find.Priority = 2
    find.Identifier = io.BytesIO(b"\0\0")
    peer.send(pdv_pdu(1, 0x03, command_bytes(find, C_FIND_RQ)))
    peer.send(pdv_pdu(1, 0x02, encode(Dataset(), True, True) or b""))
    answer = response_of(peer.pdu())
    assert (answer["CommandField"], answer["Status"]) == (0x8020, 0x0211)
    sop, body = instance_body(tmp_path)
    peer.send(pdv_pdu(1, 0x03, store_rq(CTImageStorage, sop, 5)))
    peer.send(pdv_pdu(1, 0x02, body))
    stored = response_of(peer.pdu())
    assert (stored["CommandField"], stored["Status"]) == (0x8001, 0x0000)
    peer.close()
    assert node.instances() == [sop]


# -- endings: release, abort, close, timeout, limit ---------------------------------------------
def test_release_is_answered_and_the_node_lets_go(make_node):
    node = make_node()
    peer = Raw(node.port)
    peer.associate()
    peer.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert peer.pdu() == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert peer.closed()  # the node shut its side after the RP
    peer.close()
    node.wait_idle()


@pytest.mark.parametrize("first", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",  # not a DICOM PDU at all
    b"\x04\x00\x00\x00\x00\x06\x00\x00\x00\x02\x01\x03",  # P-DATA before any association
    b"\x01\x00\x00\x00\x00\x08" + b"\x00\x01\x00\x00zzzz",  # an A-ASSOCIATE-RQ cut short
])
def test_garbage_instead_of_a_request_is_aborted_and_the_node_keeps_serving(make_node, dcmtk,
                                                                         first):
    node = make_node()
    peer = Raw(node.port)
    peer.send(first)
    assert abort_of(peer.pdu()) == (0x00, 0x00)  # PS3.8 AA-1: service-user source
    assert peer.closed()
    peer.close()
    echo = subprocess.run([dcmtk["echoscu"], "-aec", "FIELDAPP", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr


@pytest.mark.parametrize("pdu, reason", [
    (b"\x09\x00\x00\x00\x00\x02\x00\x00", 0x01),  # unrecognized PDU type
    (pdv_pdu(1, 0x03, b"")[:6] + b"\x00\x00\x10\x00\x01\x03", 0x06),  # PDV longer than its PDU
    (pdv_pdu(7, 0x03, b"\x00" * 8), 0x06),  # a context that was never accepted
    (pdv_pdu(1, 0x02, b"\x00" * 8), 0x02),  # a dataset with no command before it
    (request_pdu(CT_CX), 0x02),  # a second A-ASSOCIATE-RQ
])
def test_malformed_pdus_abort_the_association_with_a_provider_reason(make_node, tmp_path,
                                                                     pdu, reason):
    node = make_node()
    peer = Raw(node.port)
    peer.associate()
    peer.send(pdu)
    assert abort_of(peer.pdu()) == (0x02, reason)
    assert peer.closed()
    peer.close()
    node.wait_idle()
    assert node.instances() == [] and not node.leftovers()


def test_peer_closing_mid_dataset_stores_nothing(make_node, tmp_path):
    node = make_node()
    peer = Raw(node.port)
    peer.associate()
    done_sop, done = instance_body(tmp_path)
    peer.send(pdv_pdu(1, 0x03, store_rq(CTImageStorage, done_sop)))
    peer.send(pdv_pdu(1, 0x02, done))
    assert response_of(peer.pdu())["Status"] == 0x0000
    half_sop, half = instance_body(tmp_path, rows=64)
    peer.send(pdv_pdu(1, 0x03, store_rq(CTImageStorage, half_sop, 2)))
    peer.send(pdv_pdu(1, 0x00, half[: len(half) // 2]))  # not the last fragment
    peer.close()
    node.wait_idle()
    assert node.instances() == [done_sop]
    incoming = node.root / "studies" / ".incoming"
    assert not node.leftovers() and [p.name for p in incoming.iterdir()] == [".write.lock"]


def test_idle_association_is_aborted_after_the_network_timeout(make_node):
    node = make_node(network_timeout_s=0.5)
    peer = Raw(node.port)
    peer.associate()
    started = time.monotonic()
    assert abort_of(peer.pdu()) == (0x02, 0x00)
    waited = time.monotonic() - started
    assert 0.4 <= waited < 3, waited
    assert peer.closed()
    peer.close()
    node.wait_idle()


def test_association_limit_counts_both_paths(make_node):
    node = make_node(max_associations=2, peers=[Peer("RAWSCU", query=True)])
    storage = Raw(node.port)
    storage.associate()
    query = Raw(node.port)
    query.associate([(StudyRootQueryRetrieveInformationModelFind, [IMPLICIT])])
    assert (node.fast_active, node.pynetdicom_active) == (1, 1)
    third = Raw(node.port)
    third.send(request_pdu(CT_CX))
    # rejected-transient, service-provider (presentation), local limit exceeded
    assert third.pdu() == b"\x03\x00\x00\x00\x00\x04\x00\x02\x03\x02"
    third.close()
    storage.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert storage.pdu()[0] == 0x06
    storage.close()
    deadline = time.monotonic() + 10
    while node.fast_active:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    again = Raw(node.port)
    again.associate()
    again.close()
    query.close()


def test_eight_parallel_dcmtk_senders(make_node, dcmtk, tmp_path):
    node = make_node()
    _, _, paths = write_series(tmp_path, 16, rows=128, cols=128)
    procs = [subprocess.Popen([dcmtk["storescu"], "-aec", "FIELDAPP", "127.0.0.1", str(node.port),
                               *map(str, paths[i::8])], stderr=subprocess.PIPE,
                              env={**os.environ, "TCP_NODELAY": "1"}) for i in range(8)]
    for proc in procs:
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert sorted(node.instances()) == sorted(str(pydicom.dcmread(p).SOPInstanceUID)
                                              for p in paths)
