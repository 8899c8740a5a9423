"""Modality Performed Procedure Step SCP (N-CREATE, N-SET; PS3.4 F.7).

A scanner reports that it started (N-CREATE, status IN PROGRESS), finished (N-SET,
COMPLETED) or abandoned (N-SET, DISCONTINUED) the procedure it took from the worklist.
The node only checks the message and who sent it; what a step means (an order moves
to in progress / completed / discontinued) is the caller's ``record`` callback, handed
a :class:`StepReport`.  ``record`` returns None when done or the status and reason to
refuse with (an unknown instance, a step already final …); it must be idempotent for
a repeated N-SET.  Only AEs allowed the worklist may report steps.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from dicom_node.node import NodeSettings
from dicom_node.worklist import refusal

log = logging.getLogger("dicom_node.mpps")

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
SUCCESS = 0x0000
NOT_AUTHORIZED = 0x0124
PROCESSING_FAILURE = 0x0110
NO_SUCH_INSTANCE = 0x0112
DUPLICATE_INSTANCE = 0x0111
INVALID_ATTRIBUTE_VALUE = 0x0106
MAY_NO_LONGER_BE_UPDATED = 0xA710  # PS3.4 F.7.2.2: a final step cannot be set again
STATUSES = ("IN PROGRESS", "COMPLETED", "DISCONTINUED")


@dataclass
class StepReport:
    """What one N-CREATE or N-SET said, in plain values."""

    action: str  # "create" | "set"
    mpps_uid: str
    status: str  # "" when an N-SET leaves the status unchanged
    calling_ae: str
    address: str
    study_uids: list[str] = field(default_factory=list)
    accessions: list[str] = field(default_factory=list)
    sps_ids: list[str] = field(default_factory=list)
    patient_id: str = ""
    patient_name: str = ""


Record = Callable[[StepReport], "tuple[int, str] | None"]


def add_contexts(ae: AE) -> None:
    ae.add_supported_context(MPPS_SOP_CLASS)


def _report(action: str, uid: str, ds: Dataset, event) -> StepReport:
    steps = list(ds.get("ScheduledStepAttributesSequence", None) or [])
    rep = StepReport(action, uid, str(ds.get("PerformedProcedureStepStatus", "") or "").strip(),
                     str(event.assoc.requestor.ae_title or "").strip(),
                     event.assoc.requestor.address,
                     patient_id=str(ds.get("PatientID", "") or ""),
                     patient_name=str(ds.get("PatientName", "") or ""))
    for step in steps:
        for name, out in (("StudyInstanceUID", rep.study_uids), ("AccessionNumber", rep.accessions),
                          ("ScheduledProcedureStepID", rep.sps_ids)):
            value = str(step.get(name, "") or "").strip()
            if value:
                out.append(value)
    return rep


class MppsService:
    def __init__(self, settings: NodeSettings, record: Record,
                 on_event: Callable[[str, dict[str, Any]], None]):
        self.settings = settings
        self.record = record
        self.on_event = on_event

    def _refused(self, event, what: str) -> tuple[int, None] | None:
        calling = str(event.assoc.requestor.ae_title or "").strip()
        reason = refusal(self.settings, calling, event.assoc.requestor.address)
        if not reason:
            return None
        log.warning("MPPS %s refused: %s", what, reason)
        try:
            self.on_event("dicom.mpps.refused", {"calling_ae": calling, "reason": reason,
                                                 "address": event.assoc.requestor.address})
        except Exception:
            log.exception("audit hook failed for a refused MPPS")
        return NOT_AUTHORIZED, None

    def handle_create(self, event):
        try:
            refused = self._refused(event, "N-CREATE")
            if refused:
                return refused
            ds = event.attribute_list
            uid = str(event.request.AffectedSOPInstanceUID or "") or generate_uid()
            rep = _report("create", uid, ds, event)
            if rep.status != "IN PROGRESS":
                return _failure(INVALID_ATTRIBUTE_VALUE,
                                "N-CREATE must have PerformedProcedureStepStatus IN PROGRESS")
            outcome = self.record(rep)
            if outcome:
                return _failure(*outcome)
            return SUCCESS, ds
        except Exception as e:  # never raise into the association
            log.exception("MPPS N-CREATE failed")
            return _failure(PROCESSING_FAILURE, f"processing failure: {e}")

    def handle_set(self, event):
        try:
            refused = self._refused(event, "N-SET")
            if refused:
                return refused
            ds = event.modification_list
            uid = str(event.request.RequestedSOPInstanceUID or "")
            rep = _report("set", uid, ds, event)
            if rep.status and rep.status not in STATUSES:
                return _failure(INVALID_ATTRIBUTE_VALUE,
                                f"unknown PerformedProcedureStepStatus {rep.status!r}")
            outcome = self.record(rep)
            if outcome:
                return _failure(*outcome)
            return SUCCESS, ds
        except Exception as e:
            log.exception("MPPS N-SET failed")
            return _failure(PROCESSING_FAILURE, f"processing failure: {e}")


def handlers(service: MppsService) -> list[tuple]:
    return [(evt.EVT_N_CREATE, service.handle_create), (evt.EVT_N_SET, service.handle_set)]


def _failure(code: int, comment: str) -> tuple[Dataset, None]:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds, None
