"""A C-STORE SCU that sends stored files as they are, and a Storage Commitment request on the
same association (PS3.4 Annex B and J).

Each file goes in the transfer syntax it was stored in when the destination accepted that
syntax for its SOP class; otherwise, if the PACS accepted only uncompressed syntaxes, the
pixel data is decompressed to Explicit VR Little Endian (a lossless step; nothing here
ever encodes lossy) and the outcome says so.  A SOP class the PACS accepted in no syntax is
a permanent refusal.  The caller gets one :class:`Sent` per file *as soon as* its C-STORE
response arrives, so it can record it before the next file goes (a process killed at any
line has recorded everything it knows).  Nothing here touches the appliance's database.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
)

log = logging.getLogger("dicom_node.store_scu")

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # PS3.8: odd presentation context IDs 1..255
# Status codes after which sending the same object again cannot succeed (PS3.4 B.2.3, C.4).
PERMANENT = {0x0122: "SOP class not supported", 0xA900: "dataset does not match SOP class",
             0x0124: "not authorised", 0x0112: "no such SOP instance"}
FIND_TIMEOUT_S = 5.0
STORED_CODES = {0x0000, 0xB000, 0xB006, 0xB007}  # success, or warnings: stored


@dataclass(frozen=True)
class Item:
    """One file to send: its SOP class and instance, stored transfer syntax, absolute path."""

    sop_class: str
    sop_uid: str
    transfer_syntax: str
    path: Path


@dataclass
class Sent:
    """What became of one file: ``stored``, ``refused`` (permanent) or ``retry``."""

    item: Item
    outcome: str
    status: int | None = None
    syntax: str = ""
    note: str = ""


class AssociationFailed(Exception):
    """No association: ``unreachable`` (no answer / abort) or rejected by the peer."""

    def __init__(self, message: str, unreachable: bool):
        super().__init__(message)
        self.unreachable = unreachable


def _contexts(items: Iterable[Item]) -> list[tuple[str, list[str]]]:
    """Per SOP class: its stored syntaxes proposed one per context, then the uncompressed two."""
    wanted: list[tuple[str, list[str]]] = []
    seen: set[tuple[str, str]] = set()
    for it in items:
        for ts in ((it.transfer_syntax,) if it.transfer_syntax not in UNCOMPRESSED else ()):
            if (it.sop_class, ts) not in seen:
                seen.add((it.sop_class, ts))
                wanted.append((it.sop_class, [ts]))
        if (it.sop_class, "") not in seen:
            seen.add((it.sop_class, ""))
            wanted.append((it.sop_class, list(UNCOMPRESSED)))
    return wanted


def _nodelay(event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Connection:
    """One association to a destination for a batch of files (and its commitment request)."""

    def __init__(self, calling_ae: str, called_ae: str, host: str, port: int,
                 items: list[Item], timeout: float = 10.0, commitment: bool = False,
                 verify: bool = False, on_report: Callable[[Dataset], None] | None = None):
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.network_timeout = timeout
        ae.dimse_timeout = timeout * 3
        ae.maximum_pdu_size = 0
        contexts = _contexts(items)
        if len(contexts) + int(commitment) > MAX_CONTEXTS:
            raise ValueError(f"{len(contexts)} presentation contexts: send fewer classes at once")
        for sop_class, syntaxes in contexts:
            ae.add_requested_context(sop_class, syntaxes)
        if commitment:
            ae.add_requested_context(StorageCommitmentPushModel, list(UNCOMPRESSED))
        if verify:
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind,
                                     list(UNCOMPRESSED))
        handlers = [(evt.EVT_CONN_OPEN, _nodelay)]
        if on_report is not None:  # a report may come back on this association (PS3.4 J.3.3)
            handlers.append((evt.EVT_N_EVENT_REPORT, _report_handler(on_report)))
        self.called = called_ae
        self.assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=handlers)
        if not self.assoc.is_established:
            why = ("rejected the association" if self.assoc.is_rejected else
                   "aborted the association" if self.assoc.is_aborted else "did not answer")
            raise AssociationFailed(f"{called_ae} at {host}:{port} {why}",
                                    unreachable=not self.assoc.is_rejected)
        keep_responses(self.assoc)
        self.accepted: dict[str, set[str]] = {}
        for cx in self.assoc.accepted_contexts:
            self.accepted.setdefault(cx.abstract_syntax, set()).add(cx.transfer_syntax[0])

    def close(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def alive(self) -> bool:
        return self.assoc.is_established

    def send(self, item: Item) -> Sent:
        """C-STORE one file; never raises for what the PACS answers."""
        syntaxes = self.accepted.get(item.sop_class, set())
        if not syntaxes:
            return Sent(item, "refused", 0x0122,
                        note=f"{self.called} accepts no transfer syntax for SOP class"
                             f" {item.sop_class} (SOP class not supported)")
        try:
            if item.transfer_syntax in syntaxes:
                status, used, note = self._as_stored(item), item.transfer_syntax, "as stored"
            else:
                status, used, note = self._decompressed(item, syntaxes)
        except (OSError, ValueError, NotImplementedError, RuntimeError) as e:
            if not self.alive:
                return Sent(item, "retry", note=f"association lost: {e}")
            return Sent(item, "refused", note=f"cannot send {item.path.name}: {e}")
        if status is None or "Status" not in status:
            return Sent(item, "retry", syntax=used, note="no C-STORE response (connection lost)")
        code = int(status.Status)
        comment = str(status.get("ErrorComment", "")).strip()
        if code in STORED_CODES:
            return Sent(item, "stored", code, used, note)
        why = PERMANENT.get(code) or ("refused" if code >> 12 in (0xA, 0xC) else "error")
        outcome = "refused" if code in PERMANENT or code >> 8 == 0xA9 else "retry"
        return Sent(item, outcome, code, used, f"status 0x{code:04X} {why} {comment}".strip())

    def send_dataset(self, ds: Dataset) -> Sent:
        """C-STORE a dataset built in memory (a report document), in a syntax the PACS took."""
        item = Item(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, Path())
        if not self.accepted.get(item.sop_class):
            return Sent(item, "refused", 0x0122, note=f"{self.called} does not accept"
                        f" SOP class {item.sop_class}")
        status = self.assoc.send_c_store(ds)
        if status is None or "Status" not in status:
            return Sent(item, "retry", note="no C-STORE response (connection lost)")
        code = int(status.Status)
        if code in STORED_CODES:
            return Sent(item, "stored", code, ExplicitVRLittleEndian, "stored")
        return Sent(item, "refused" if code in PERMANENT else "retry", code,
                    note=f"status 0x{code:04X} {PERMANENT.get(code, '')}".strip())

    def _as_stored(self, item: Item) -> Dataset | None:
        _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file's bytes, never re-encode
        return self.assoc.send_c_store(item.path)

    def _decompressed(self, item: Item, syntaxes: set[str]) -> tuple[Dataset | None, str, str]:
        if not UID(item.transfer_syntax).is_compressed or ExplicitVRLittleEndian not in syntaxes:
            if ImplicitVRLittleEndian in syntaxes and not UID(item.transfer_syntax).is_compressed:
                ds = dcmread(item.path)
                return self.assoc.send_c_store(ds), ImplicitVRLittleEndian, "as Implicit VR"
            raise ValueError(f"{self.called} accepts neither {item.transfer_syntax} nor"
                             " Explicit VR Little Endian for this class")
        ds = dcmread(item.path)
        ds.decompress(generate_instance_uid=False)  # the same object, not a new instance
        log.info("sent %s decompressed: %s did not accept %s", item.sop_uid, self.called,
                 item.transfer_syntax)
        return (self.assoc.send_c_store(ds), ExplicitVRLittleEndian,
                f"decompressed from {item.transfer_syntax} to Explicit VR Little Endian")

    def find_instances(self, study_uid: str, series_uid: str,
                       patient_id: str | None = None) -> set[str] | None:
        """SOP Instance UIDs the PACS holds in a series (C-FIND, IMAGE level), only those
        under ``patient_id`` when given; None on no answer."""
        q = Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        if patient_id is not None:
            q.PatientID = patient_id
        q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study_uid, series_uid, ""
        found: set[str] = set()
        self.assoc.dimse_timeout = FIND_TIMEOUT_S  # a dropped response (pynetdicom #875) costs
        try:                                       # this, and the caller asks again
            self._msg_id = getattr(self, "_msg_id", 0) % 65535 + 1  # one ID per request
            for status, ident in self.assoc.send_c_find(
                    q, StudyRootQueryRetrieveInformationModelFind, msg_id=self._msg_id):
                if status is None or "Status" not in status:
                    return None
                if int(status.Status) in (0xFF00, 0xFF01) and ident is not None:
                    found.add(str(ident.get("SOPInstanceUID", "")))
                elif int(status.Status) != 0x0000:
                    log.warning("C-FIND to %s answered 0x%04X", self.called, int(status.Status))
                    return None
        except (ValueError, RuntimeError) as e:
            log.warning("C-FIND to %s failed: %s", self.called, e)
            return None
        return found

    # -- Storage Commitment (PS3.4 J.3.2) --------------------------------------------------
    def request_commitment(self, transaction_uid: str,
                           refs: list[tuple[str, str]]) -> int | None:
        """N-ACTION (action type 1) for ``(sop_class, sop_uid)`` pairs; the N-ACTION status."""
        ds = commitment_request(transaction_uid, refs)
        status, _reply = self.assoc.send_n_action(ds, 1, StorageCommitmentPushModel,
                                                  "1.2.840.10008.1.20.1.1")
        return int(status.Status) if status is not None and "Status" in status else None


def keep_responses(assoc) -> None:
    """Give a response the association's reactor took back to the request waiting for it.

    pynetdicom pauses its reactor thread while a ``send_*`` call waits for its response,
    but the pause is a flag the two threads race on: between two C-STOREs sent back to back
    the reactor may wake, take the next C-STORE response off the queue, log "Received
    unexpected C-STORE service message" and drop it, and the sender then waits out the whole
    DIMSE timeout (30 s here) for an answer that came in a millisecond.  A response is never
    something the reactor serves, so it goes back on the queue (once) for the sender."""
    serve = assoc._serve_request

    def serve_or_return(msg, context_id: int) -> None:
        if not msg.is_valid_request and not assoc._sent_release \
                and not getattr(msg, "_given_back", False):
            msg._given_back = True
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_return


def commitment_request(transaction_uid: str, refs: list[tuple[str, str]]) -> Dataset:
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    seq = []
    for sop_class, sop_uid in refs:
        r = Dataset()
        r.ReferencedSOPClassUID = sop_class
        r.ReferencedSOPInstanceUID = sop_uid
        seq.append(r)
    ds.ReferencedSOPSequence = seq
    return ds


@dataclass
class CommitmentResult:
    """An N-EVENT-REPORT of Storage Commitment: who is committed, who failed and why."""

    transaction_uid: str
    committed: list[str]
    failed: list[tuple[str, int]]


def parse_report(ds: Dataset) -> CommitmentResult:
    committed = [str(r.ReferencedSOPInstanceUID) for r in ds.get("ReferencedSOPSequence", [])]
    failed = [(str(r.ReferencedSOPInstanceUID), int(r.get("FailureReason", 0x0110)))
              for r in ds.get("FailedSOPSequence", [])]
    return CommitmentResult(str(ds.get("TransactionUID", "")), committed, failed)


def _report_handler(on_report: Callable[[Dataset], None]):
    def handle(event) -> Dataset:
        """Hand the report's dataset over; answer Success (0x0000) or Processing failure."""
        status = Dataset()
        try:
            if event.request.EventTypeID not in (1, 2) or \
                    event.request.AffectedSOPClassUID != StorageCommitmentPushModel:
                status.Status = 0x0112
                return status, None
            on_report(event.event_information)
            status.Status = 0x0000
        except Exception:  # a handler never raises into the association
            log.exception("storage commitment report not recorded")
            status.Status = 0x0110
        return status, None
    return handle


def report_handlers(on_report: Callable[[Dataset], None]) -> list[tuple]:
    """Handlers for a node that accepts reports on associations the PACS opens to it."""
    return [(evt.EVT_N_EVENT_REPORT, _report_handler(on_report))]


def add_report_context(ae: AE) -> None:
    """Accept Storage Commitment Push Model with us in the SCU role (the PACS as requestor
    sends N-EVENT-REPORT in its SCP role, PS3.4 J.3.3)."""
    ae.add_supported_context(StorageCommitmentPushModel, list(UNCOMPRESSED), scu_role=True,
                             scp_role=True)
