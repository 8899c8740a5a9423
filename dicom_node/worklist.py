"""Modality Worklist SCP (Modality Worklist Information Model – FIND, PS3.4 K).

A scanner asks "what is scheduled for me" with a C-FIND whose identifier names the
Scheduled Procedure Step Sequence (modality, station AE, start date/time), patient name
or ID, accession; we answer one Pending response per scheduled order.

The node knows nothing of where orders live: the caller hands it a
:class:`WorklistSource`, a SELECT over its own tables whose output columns carry the
names in :data:`COLUMNS` / :data:`SPS_COLUMNS`, and a connection.  Matching is the same
as the study C-FIND's (:mod:`dicom_node.query`: wildcards, case-insensitive person
names, date and time ranges, value lists); values reach SQL only as parameters.
Date and time ranges are matched separately (not as one combined date-time range).

Only AEs the site added with ``--worklist`` are answered (from their host when one is
given, under the same host rule as ``--query``); every answer is handed to ``on_event``
before any patient data leaves, and a refusal is reported with its reason.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, evt

from dicom_node import query, retrieve
from dicom_node.admission import is_loopback
from dicom_node.node import NodeSettings, peer_allowed, peer_named

log = logging.getLogger("dicom_node.worklist")

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
PENDING = 0xFF00
NOT_AUTHORIZED = 0x0124
UNABLE_TO_PROCESS = 0xC001
SPS = "ScheduledProcedureStepSequence"

# keyword → (column of the source's SELECT, matching kind as in dicom_node.query)
COLUMNS: dict[str, tuple[str, str]] = {
    "PatientName": ("patient_name", "pn"),
    "PatientID": ("patient_id", "text"),
    "IssuerOfPatientID": ("issuer", "text"),
    "PatientBirthDate": ("birth_date", "date"),
    "PatientSex": ("sex", "text"),
    "PatientAge": ("age", "text"),
    "PatientComments": ("patient_comments", "text"),
    "AccessionNumber": ("accession", "text"),
    "StudyInstanceUID": ("study_uid", "uid"),
    "RequestedProcedureID": ("requested_procedure_id", "text"),
    "RequestedProcedureDescription": ("procedure_name", "text"),
    "RequestedProcedurePriority": ("priority", "text"),
    "ReasonForTheRequestedProcedure": ("reason", "text"),
    "RequestedProcedureComments": ("clinical_details", "text"),
}
SPS_COLUMNS: dict[str, tuple[str, str]] = {
    "Modality": ("modality", "text"),
    "ScheduledStationAETitle": ("station_ae", "text"),
    "ScheduledProcedureStepStartDate": ("start_date", "date"),
    "ScheduledProcedureStepStartTime": ("start_time", "time"),
    "ScheduledProcedureStepDescription": ("procedure_name", "text"),
    "ScheduledProcedureStepID": ("sps_id", "text"),
    "ScheduledProcedureStepStatus": ("sps_status", "text"),
}


@dataclass(frozen=True)
class WorklistSource:
    """Where scheduled orders come from: ``sql`` selects them with the columns above."""

    sql: str
    connect: Callable[[], sqlite3.Connection]


@dataclass
class WorklistQuery:
    where: list[str]
    params: list[Any]
    top: list[str]  # keywords to return
    sps: list[str] | None  # keywords inside the SPS item (None: no sequence asked)
    matched: dict[str, str]


def parse(identifier: Dataset) -> WorklistQuery:
    """An MWL identifier → SQL conditions over the source, and the keys to return."""
    q = query.Query(model="worklist", level=query.STUDY)
    top: list[str] = []
    sps: list[str] | None = None
    for elem in identifier:
        keyword = elem.keyword
        if keyword == SPS:
            items = list(elem.value or [])
            sps = []
            item = items[0] if items else Dataset()
            for sub in item:
                if sub.keyword in SPS_COLUMNS:
                    sps.append(sub.keyword)
                    _condition(q, sub.keyword, SPS_COLUMNS[sub.keyword], sub)
            if not items or not sps:
                sps = list(SPS_COLUMNS)  # an empty sequence asks for all of it
            continue
        if elem.tag.is_private or elem.tag.group < 0x0008 or keyword in ("", "SpecificCharacterSet"):
            continue
        top.append(keyword)
        if keyword in COLUMNS and elem.VR != "SQ":
            _condition(q, keyword, COLUMNS[keyword], elem)
    return WorklistQuery(q.where, q.params, top, sps, q.matched_keys)


def _condition(q: query.Query, keyword: str, column: tuple[str, str], elem) -> None:
    value = query._value_of(elem)
    if value and value != "*":
        key = query.Key(keyword, query.STUDY, f"w.{column[0]}", column[1])
        query._add_condition(q, key, value)
        q.matched_keys[keyword] = value


def rows(conn: sqlite3.Connection, source: WorklistSource, wq: WorklistQuery) -> list[sqlite3.Row]:
    text = f"SELECT * FROM ({source.sql}) w"
    if wq.where:
        text += " WHERE " + " AND ".join(wq.where)
    text += " ORDER BY w.start_date, w.start_time, w.accession"
    return conn.execute(text, wq.params).fetchall()


def response(wq: WorklistQuery, row: sqlite3.Row) -> Dataset:
    """One Pending identifier: every requested key, filled from the order or empty."""
    ds = Dataset()
    texts: list[str] = []
    for keyword in wq.top:
        value = row[COLUMNS[keyword][0]] if keyword in COLUMNS else ""
        if keyword == SPS:
            continue
        setattr(ds, keyword, value or "")
        texts.append(str(value or ""))
    if wq.sps is not None:
        item = Dataset()
        for keyword in wq.sps:
            value = row[SPS_COLUMNS[keyword][0]] or ""
            setattr(item, keyword, value)
            texts.append(str(value))
        setattr(ds, SPS, Sequence([item]))
    if not all(t.isascii() for t in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def add_contexts(ae: AE) -> None:
    ae.add_supported_context(MODALITY_WORKLIST_FIND)


def refusal(settings: NodeSettings, ae_title: str, address: str) -> str | None:
    """Why this caller may not read the worklist (or send MPPS), or None when it may."""
    peer = peer_named(settings, ae_title)
    if peer is None:
        return f"AE {ae_title!r} is not a known AE"
    if not getattr(peer, "worklist", False):
        return f"AE {ae_title!r} may not read the worklist (no --worklist)"
    if not peer_allowed(peer, address):
        return f"AE {ae_title!r} is allowed only from {peer.host}"
    if not peer.host and settings.require_host_for_query and not is_loopback(address):
        return (f"AE {ae_title!r} has no --host, so anyone could claim it: refused from "
                f"{address} (dicom.require_host_for_query)")
    return None


class WorklistService:
    """The MWL C-FIND handler; other C-FINDs go to the handler it was given."""

    def __init__(self, settings: NodeSettings, source: WorklistSource,
                 on_event: Callable[[str, dict[str, Any]], None]):
        self.settings = settings
        self.source = source
        self.on_event = on_event

    def handle_find(self, event) -> Iterator[tuple[Any, Dataset | None]]:
        try:
            yield from self._find(event)
        except Exception as e:  # never raise into the association
            log.exception("worklist C-FIND failed")
            yield _status(UNABLE_TO_PROCESS, f"Unable to process: {e}"), None

    def _find(self, event) -> Iterator[tuple[Any, Dataset | None]]:
        calling = str(event.assoc.requestor.ae_title or "").strip()
        address = event.assoc.requestor.address
        who = {"calling_ae": calling, "address": address}
        reason = refusal(self.settings, calling, address)
        if reason:
            log.warning("worklist C-FIND refused: %s", reason, extra=who)
            try:
                self.on_event("dicom.mwl_find.refused", {**who, "reason": reason})
            except Exception:  # refusing anyway; the log line above remains
                log.exception("audit hook failed for a refused worklist C-FIND")
            yield _status(NOT_AUTHORIZED, f"Refused: {reason}"), None
            return
        wq = parse(event.identifier)
        matches = rows(self.source.connect(), self.source, wq)
        try:  # recorded before anything leaves; no record, no answer
            self.on_event("dicom.mwl_find", {**who, "keys": wq.matched, "matches": len(matches),
                                             "accessions": [r["accession"] for r in matches][:1000]})
        except Exception:
            log.exception("audit hook failed for a worklist C-FIND")
            yield _status(UNABLE_TO_PROCESS, "Unable to process: audit trail unavailable"), None
            return
        explicit = retrieve._STREAMABLE.get(str(event.context.transfer_syntax))
        if explicit is not None and getattr(event.assoc.dul, "socket", None) is not None:
            if _stream(event, wq, matches, explicit):  # pynetdicom sends the final response
                yield 0xFE00, None
            return
        for row in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield PENDING, response(wq, row)


def _encode(ds: Dataset, explicit: bool) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, not explicit
    write_dataset(buf, ds)
    return buf.getvalue()


def _stream(event, wq: WorklistQuery, matches: list[sqlite3.Row], explicit: bool) -> bool:
    """Pending responses written straight to the socket in batches, as the study C-FIND does
    (:meth:`dicom_node.retrieve.QueryRetrieve._stream_find`: pynetdicom's ~1 ms per DIMSE
    message otherwise dominates a long worklist).  True when the requester cancelled."""
    assoc = event.assoc
    max_length = assoc.requestor.maximum_length or 0
    context_id = event.context.context_id
    command = retrieve._pdata(context_id, True, retrieve._find_pending_command(
        str(event.request.AffectedSOPClassUID), event.request.MessageID), max_length)
    batch, size = [], 0
    for i, row in enumerate(matches):
        data = _encode(response(wq, row), explicit)
        batch.append(command + retrieve._pdata(context_id, False, data, max_length))
        size += len(batch[-1])
        if size >= retrieve.STREAM_BATCH_BYTES or i == len(matches) - 1:
            assoc.dul.socket.send(b"".join(batch))
            batch, size = [], 0
            if event.is_cancelled:
                return True
            if not assoc.is_established:
                return False
    return False


def bind(handlers: list[tuple], service: WorklistService) -> list[tuple]:
    """The node's handlers with EVT_C_FIND routed by SOP class (pynetdicom binds one per event)."""
    others = [h for e, h in handlers if e is evt.EVT_C_FIND]
    rest = [(e, h) for e, h in handlers if e is not evt.EVT_C_FIND]
    fallback = others[0] if others else None

    def find(event):
        if str(event.request.AffectedSOPClassUID) == MODALITY_WORKLIST_FIND or fallback is None:
            yield from service.handle_find(event)
        else:
            yield from fallback(event)

    return [*rest, (evt.EVT_C_FIND, find)]


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
