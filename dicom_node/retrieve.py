"""C-FIND, C-MOVE and C-GET service providers of the DICOM node.

Thin pynetdicom handlers over :mod:`dicom_node.query` and the study store:

* only AEs the site added with ``--query`` (from their host, when one is
  given) are answered; everyone else gets a refusal with a reason, which is
  logged and handed to ``on_event`` (the appliance audits it);
* every answered request is handed to ``on_event`` *before* any patient data
  leaves (who, from where, level, keys, counts); if that record cannot be
  made, nothing is disclosed;
* C-MOVE sends only to ``--move-destination`` AEs, over its own association
  to the destination's host:port, proposing for each file exactly the
  transfer syntax it was stored in (no transcoding); C-GET returns the files
  over the requester's association;
* each file is checked against the SHA-256 the index holds before it is sent:
  a damaged or missing file is a failed sub-operation, reported, not hidden;
* handlers never raise into the association.

Events handed to ``on_event``: ``dicom.c_find``, ``dicom.c_move``, ``dicom.c_get``
(answered: keys, counts, study UIDs disclosed), the same with ``.refused``
(reason), and ``dicom.retrieve.file_error`` (a stored file failed its checksum).

pynetdicom fixes the shape of a C-MOVE reply: its first answer is the
destination, so a refused or unknown destination can only be reported as
0xA801 (the reason is in the log and the audit trail).
"""

from __future__ import annotations

import hashlib
import io
import logging
import socket
import sqlite3
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicom_node import query
from dicom_node.admission import is_loopback
from dicom_node.node import NodeSettings, peer_allowed, peer_named
from dicom_node.study_store import StudyStore

log = logging.getLogger("dicom_node.retrieve")

MODELS = {
    PatientRootQueryRetrieveInformationModelFind: query.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelMove: query.PATIENT_ROOT,
    PatientRootQueryRetrieveInformationModelGet: query.PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind: query.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelMove: query.STUDY_ROOT,
    StudyRootQueryRetrieveInformationModelGet: query.STUDY_ROOT,
}

PENDING = 0xFF00
CANCEL = 0xFE00
NOT_AUTHORIZED = 0x0124  # PS3.7 C.5: Refused: Not Authorized
UNABLE_TO_PROCESS = 0xC001
MAX_CONTEXTS = 128  # presentation contexts one association may propose
AUDIT_LIST_LIMIT = 1000  # study UIDs / patient IDs named in one audit row


def add_contexts(ae: AE) -> None:
    """Accept the Patient Root and Study Root FIND, MOVE and GET models as SCP."""
    for uid in MODELS:
        ae.add_supported_context(uid)


def handlers(settings: NodeSettings, store: StudyStore,
             on_event: Callable[[str, dict[str, Any]], None]) -> list[tuple]:
    """The (event, handler) pairs the node binds for query/retrieve."""
    service = QueryRetrieve(settings, store, on_event)
    return [(evt.EVT_C_FIND, service.handle_find), (evt.EVT_C_MOVE, service.handle_move),
            (evt.EVT_C_GET, service.handle_get)]


@dataclass
class Caller:
    ae_title: str
    address: str

    def detail(self, **more: Any) -> dict[str, Any]:
        return {"calling_ae": self.ae_title, "address": self.address, **more}


class AuditUnavailable(Exception):
    """The access could not be recorded, so it is not granted."""


def _caller(event) -> Caller:
    return Caller(str(event.assoc.requestor.ae_title or "").strip(), event.assoc.requestor.address)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class QueryRetrieve:
    """The three handlers, sharing the authorization rule and the audit hook."""

    def __init__(self, settings: NodeSettings, store: StudyStore,
                 on_event: Callable[[str, dict[str, Any]], None]):
        self.settings = settings
        self.store = store
        self.on_event = on_event

    # -- shared rules -------------------------------------------------------------
    def refusal(self, caller: Caller) -> str | None:
        """Why this caller may not query or retrieve, or None when it may."""
        peer = peer_named(self.settings, caller.ae_title)
        if peer is None:
            return f"AE {caller.ae_title!r} is not a known AE"
        if not peer.query:
            return f"AE {caller.ae_title!r} is not allowed to query (no --query)"
        if not peer_allowed(peer, caller.address):
            return f"AE {caller.ae_title!r} is allowed only from {peer.host}"
        if not peer.host and self.settings.require_host_for_query \
                and not is_loopback(caller.address):
            return (f"AE {caller.ae_title!r} has no --host, so anyone could claim it: refused "
                    f"from {caller.address} (dicom.require_host_for_query; "
                    f"appliance ae add {caller.ae_title} --host H --query --replace)")
        return None

    def _emit(self, kind: str, detail: dict[str, Any]) -> None:
        """Record an event; a failure to record a disclosure stops the disclosure."""
        try:
            self.on_event(kind, detail)
        except Exception as e:
            log.exception("audit hook failed for %s", kind)
            raise AuditUnavailable(str(e)) from e

    def _refused(self, service: str, caller: Caller, reason: str, **more: Any) -> None:
        log.warning("%s refused: %s", service, reason,
                    extra={"calling_ae": caller.ae_title, "address": caller.address})
        try:
            self._emit(f"dicom.{service.lower().replace('-', '_')}.refused",
                       caller.detail(reason=reason, **more))
        except AuditUnavailable:
            pass  # refusing anyway; the log line above remains

    @staticmethod
    def _model(event) -> str:
        return MODELS.get(str(event.request.AffectedSOPClassUID), query.STUDY_ROOT)

    # -- C-FIND ---------------------------------------------------------------------
    def handle_find(self, event) -> Iterator[tuple[Any, Dataset | None]]:
        caller = _caller(event)
        try:
            yield from self._find(event, caller)
        except Exception as e:  # never raise into the association
            log.exception("C-FIND handler error")
            yield _status(UNABLE_TO_PROCESS, f"Unable to process: {e}"), None

    def _find(self, event, caller: Caller) -> Iterator[tuple[Any, Dataset | None]]:
        reason = self.refusal(caller)
        if reason:
            self._refused("C-FIND", caller, reason)
            yield _status(NOT_AUTHORIZED, f"Refused: {reason}"), None
            return
        try:
            q = query.parse(event.identifier, self._model(event))
        except query.QueryError as e:
            self._refused("C-FIND", caller, e.comment)
            yield _status(e.status, e.comment), None
            return
        matches = query.rows(self.store.conn, q)
        try:
            self._emit("dicom.c_find", caller.detail(
                model=q.model, level=q.level, keys=q.matched_keys, matches=len(matches),
                **(_disclosed(matches, "_patient", "patient_ids") if q.level == query.PATIENT
                   else _disclosed(matches, "_study", "study_uids"))))
        except AuditUnavailable:
            yield _status(UNABLE_TO_PROCESS, "Unable to process: audit trail unavailable"), None
            return
        log.info("C-FIND", extra=caller.detail(level=q.level, matches=len(matches)))
        explicit = _STREAMABLE.get(str(event.context.transfer_syntax))
        if explicit is not None and getattr(event.assoc.dul, "socket", None) is not None:
            # Pending responses go straight to the socket; pynetdicom sends the final one.
            if self._stream_find(event, q, matches, explicit):
                yield CANCEL, None
            return
        for ds in query.responses(q, matches, self.settings.ae_title):
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, ds

    def _stream_find(self, event, q: query.Query, matches: list[sqlite3.Row],
                     explicit: bool) -> bool:
        """Write the Pending C-FIND responses as P-DATA PDUs, in batches.

        pynetdicom builds, encodes and queues every DIMSE message through its
        state machine (~1 ms each here: 500 studies took ~0.6-0.9 s against
        Orthanc's ~0.23 s).  A Pending response is a fixed command set plus an
        identifier, so we frame it ourselves and write it on the association's
        socket from this thread, which is the only one sending while the
        handler runs.  Returns True when the requester cancelled.
        """
        assoc = event.assoc
        max_length = assoc.requestor.maximum_length or 0
        context_id = event.context.context_id
        command = _pdata(context_id, True, _find_pending_command(
            str(event.request.AffectedSOPClassUID), event.request.MessageID), max_length)
        batch, size = [], 0
        for i, row in enumerate(matches):
            data = query.encode_response(q, row, self.settings.ae_title, explicit)
            batch.append(command + _pdata(context_id, False, data, max_length))
            size += len(batch[-1])
            if size >= STREAM_BATCH_BYTES or i == len(matches) - 1:
                assoc.dul.socket.send(b"".join(batch))
                batch, size = [], 0
                if event.is_cancelled:
                    return True
                if not assoc.is_established:
                    return False
        return False

    # -- C-GET ------------------------------------------------------------------------
    def handle_get(self, event) -> Iterator[Any]:
        caller = _caller(event)
        started = False
        try:
            for item in self._get(event, caller):
                started = True
                yield item
        except Exception as e:
            log.exception("C-GET handler error")
            # Before the count, ending the generator makes pynetdicom answer 0xC413.
            if started:
                yield _status(UNABLE_TO_PROCESS, f"Unable to process: {e}"), None

    def _get(self, event, caller: Caller) -> Iterator[Any]:
        instances, failure = self._resolve("C-GET", event, caller)
        if failure is not None:
            # pynetdicom wants a sub-operation count first; the failure then ends it.
            yield 1
            yield failure, None
            return
        yield len(instances)
        yield from self._send(event, instances)

    # -- C-MOVE -----------------------------------------------------------------------
    def handle_move(self, event) -> Iterator[Any]:
        caller = _caller(event)
        answered = 0  # yields so far: destination, count, then statuses
        try:
            for item in self._move(event, caller):
                answered += 1
                yield item
        except Exception as e:
            log.exception("C-MOVE handler error")
            # Before the count, ending the generator makes pynetdicom answer 0xC513/0xC514.
            if answered >= 2:
                yield _status(UNABLE_TO_PROCESS, f"Unable to process: {e}"), None

    def _move(self, event, caller: Caller) -> Iterator[Any]:
        reason = self.refusal(caller)
        destination = str(event.move_destination or "").strip()
        if reason is None:
            reason = self._destination_refusal(destination)
        if reason:
            self._refused("C-MOVE", caller, reason, destination=destination)
            yield None, None  # pynetdicom answers 0xA801 Move Destination Unknown
            return
        peer = peer_named(self.settings, destination)
        instances, failure = self._resolve("C-MOVE", event, caller, destination=destination)
        if failure is not None:
            # The first answer must be a destination; a bare Verification context
            # keeps that association empty while the failure status goes back.
            yield peer.host, peer.port, {"contexts": [build_context("1.2.840.10008.1.1")]}
            yield 1
            yield failure, None
            return
        yield peer.host, peer.port, {"contexts": _contexts_for(instances),
                                     "evt_handlers": [(evt.EVT_CONN_OPEN, _prepare_move_association)]}
        yield len(instances)
        yield from self._send(event, instances)

    def _destination_refusal(self, destination: str) -> str | None:
        peer = peer_named(self.settings, destination)
        if peer is None:
            return f"move destination {destination!r} is unknown"
        if not peer.move_destination:
            return f"AE {destination!r} is not a move destination"
        if not peer.host:
            return f"move destination {destination!r} has no host"
        return None

    # -- shared by MOVE and GET ----------------------------------------------------------
    def _resolve(self, service: str, event, caller: Caller,
                 **more: Any) -> tuple[list[sqlite3.Row], Dataset | None]:
        """The instances to send, or the failure status to answer with instead."""
        reason = self.refusal(caller)
        if reason:
            self._refused(service, caller, reason, **more)
            return [], _status(NOT_AUTHORIZED, f"Refused: {reason}")
        model = self._model(event)
        try:
            identifier = event.identifier
            instances = query.retrieve_instances(self.store.conn, identifier, model)
        except query.QueryError as e:
            self._refused(service, caller, e.comment, **more)
            return [], _status(e.status, e.comment)
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
        try:
            self._emit(f"dicom.{service.lower().replace('-', '_')}", caller.detail(
                model=model, level=level, keys=_retrieve_keys(identifier), instances=len(instances),
                bytes=sum(r["size"] for r in instances), **more,
                **_disclosed(instances, "study_uid", "study_uids")))
        except AuditUnavailable:
            return [], _status(UNABLE_TO_PROCESS, "Unable to process: audit trail unavailable")
        log.info(service, extra=caller.detail(level=level, instances=len(instances), **more))
        return instances, None

    def _send(self, event, instances: list[sqlite3.Row]) -> Iterator[tuple[Any, Dataset | None]]:
        """Yield each stored file as read from disk; a bad file becomes a failed sub-operation."""
        for row in instances:
            if event.is_cancelled:
                yield CANCEL, None
                return
            _still_busy(event.assoc)
            yield PENDING, self._load(row)

    def _load(self, row: sqlite3.Row) -> Dataset:
        try:
            data = self.store.path_of(row["path"]).read_bytes()
            if hashlib.sha256(data).hexdigest() != row["sha256"]:
                raise ValueError("content does not match its index checksum")
            return pydicom.dcmread(io.BytesIO(data))
        except Exception as e:
            log.error("cannot send %s: %s", row["sop_uid"], e)
            self._emit_quietly("dicom.retrieve.file_error", {"sop_uid": row["sop_uid"],
                                                             "path": row["path"], "error": str(e)})
            return _unsendable(row)

    def _emit_quietly(self, kind: str, detail: dict[str, Any]) -> None:
        try:
            self.on_event(kind, detail)
        except Exception:
            log.exception("audit hook failed for %s", kind)


# Identifier encodings we write ourselves (value: explicit VR); others go through pydicom.
_STREAMABLE = {ImplicitVRLittleEndian: False, ExplicitVRLittleEndian: True}
STREAM_BATCH_BYTES = 64 * 1024
_C_FIND_RSP = 0x8020
_DATASET_PRESENT = 0x0001


def _find_pending_command(sop_class_uid: str, message_id: int) -> bytes:
    """The command set of a Pending C-FIND-RSP (PS3.7 9.3.2.2), implicit VR little endian."""
    uid = sop_class_uid.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    body = b"".join([
        struct.pack("<HHI", 0x0000, 0x0002, len(uid)) + uid,
        struct.pack("<HHIH", 0x0000, 0x0100, 2, _C_FIND_RSP),
        struct.pack("<HHIH", 0x0000, 0x0120, 2, message_id),
        struct.pack("<HHIH", 0x0000, 0x0800, 2, _DATASET_PRESENT),
        struct.pack("<HHIH", 0x0000, 0x0900, 2, PENDING),
    ])
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _pdata(context_id: int, is_command: bool, payload: bytes, max_length: int) -> bytes:
    """P-DATA-TF PDUs (PS3.8 9.3.5) carrying one message part, split to the peer's maximum."""
    step = max(max_length - 6, 2) if max_length else max(len(payload), 1)
    pdus = []
    for start in range(0, max(len(payload), 1), step):
        chunk = payload[start:start + step]
        header = (0x01 if is_command else 0x00) | (0x02 if start + step >= len(payload) else 0)
        pdus.append(struct.pack(">BBIIBB", 0x04, 0x00, len(chunk) + 6, len(chunk) + 2,
                                context_id, header) + chunk)
    return b"".join(pdus)


def _prepare_move_association(event) -> None:
    """Ready the association a C-MOVE opens to its destination (on EVT_CONN_OPEN).

    * TCP_NODELAY: each C-STORE waits for its reply, and Nagle plus the
      receiver's delayed ACK stalled a 300-slice move to ~20 instances/s.
    * Only C-STORE's own blocking read may take a message off this
      association's DIMSE queue.  pynetdicom's requestor reactor polls that
      queue between requests, and its pause handshake with ``send_c_store``
      is racy: under load it took a C-STORE response ("Received unexpected
      C-STORE service message"), the sub-operation then waited out the 60 s
      DIMSE timeout and every later one failed.  Nothing but C-STORE
      responses arrives on this association, so the poll gets nothing.
    """
    assoc = event.assoc
    try:
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass
    read = assoc.dimse.get_msg

    def blocking_reads_only(block: bool = False):
        return read(block=True) if block else (None, None)

    assoc.dimse.get_msg = blocking_reads_only


def _still_busy(assoc) -> None:
    """Restart the requester's idle timer while we send sub-operations.

    pynetdicom restarts it only when data arrives; during a C-MOVE the
    requester sends nothing, so a move longer than the network timeout would
    be aborted as idle the moment it finished.
    """
    timer = getattr(getattr(assoc, "dul", None), "_idle_timer", None)
    if timer is not None:
        timer.restart()


def _unsendable(row: sqlite3.Row) -> Dataset:
    """A stand-in pynetdicom cannot send (no transfer syntax): counted failed, UID listed."""
    ds = Dataset()
    ds.SOPClassUID = row["sop_class_uid"]
    ds.SOPInstanceUID = row["sop_uid"]
    return ds


def _contexts_for(instances: list[sqlite3.Row]) -> list:
    """One context per stored (SOP class, transfer syntax) pair: the files go as stored."""
    pairs = list(dict.fromkeys((r["sop_class_uid"], r["transfer_syntax"] or ImplicitVRLittleEndian)
                               for r in instances))
    if len(pairs) > MAX_CONTEXTS:
        log.warning("C-MOVE needs %d presentation contexts; only %d can be proposed",
                    len(pairs), MAX_CONTEXTS)
    return [build_context(sop_class, [ts]) for sop_class, ts in pairs[:MAX_CONTEXTS]] or \
        [build_context("1.2.840.10008.1.1")]


def _retrieve_keys(identifier: Dataset) -> dict[str, str]:
    keys = {}
    for keyword in query.UNIQUE_KEY.values():
        if keyword in identifier:
            keys[keyword] = query._value_of(identifier[keyword])[:2000]
    return keys


def _disclosed(rows: list[sqlite3.Row], column: str, name: str) -> dict[str, Any]:
    """Which patients or studies a response reveals, for the audit row (capped)."""
    values = list(dict.fromkeys(r[column] for r in rows))
    out: dict[str, Any] = {name: values[:AUDIT_LIST_LIMIT]}
    if len(values) > AUDIT_LIST_LIMIT:
        out[f"{name}_total"] = len(values)
    return out
