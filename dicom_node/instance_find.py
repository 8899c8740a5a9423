"""A C-FIND SCU (Study Root, IMAGE level) that asks which instances of a series a remote AE
files under one Patient ID.

Why by Patient ID: after an identity correction the corrected copy keeps its SOP Instance
UID, so "the PACS holds this SOP Instance" proves nothing about which identity it holds it
under.  A PACS that names instances by SOP Instance UID alone replaced the old copy when the
corrected one arrived (or ignored the corrected one as a duplicate); one that hashes the
patient in (Orthanc) holds both.  Asking with the Patient ID tells these apart.

One association per question: pynetdicom drops a response now and then when several C-FINDs
share one (pynetdicom issue #875), and these questions are few.  Nothing here touches the
appliance's database.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

log = logging.getLogger("dicom_node.instance_find")


@dataclass(frozen=True)
class Peer:
    """Where to ask: our AE title, theirs, host, port, and the time allowed per step."""

    calling_ae: str
    called_ae: str
    host: str
    port: int
    timeout: float = 10.0


class FindFailed(Exception):
    """No association, a failure status, or no answer: nothing can be concluded."""


def _nodelay(event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def held(peer: Peer, patient_id: str, study_uid: str, series_uid: str) -> set[str]:
    """SOP Instance UIDs the peer holds in this series under exactly ``patient_id``.

    A Patient ID holding ``*``, ``?`` or ``\\`` would match as a wildcard or value list, so it
    is refused rather than asked (the answer could name other patients' copies)."""
    if any(c in patient_id for c in "*?\\"):
        raise FindFailed(f"Patient ID {patient_id!r} holds a C-FIND wildcard: cannot ask")
    ae = AE(ae_title=peer.calling_ae)
    ae.acse_timeout = ae.network_timeout = peer.timeout
    ae.dimse_timeout = peer.timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind,
                             [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.called_ae,
                         evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise FindFailed(f"{peer.called_ae} at {peer.host}:{peer.port} "
                         f"{'rejected' if assoc.is_rejected else 'did not accept'} the association")
    try:
        return _ask(assoc, peer.called_ae, patient_id, study_uid, series_uid)
    finally:
        if assoc.is_established:
            assoc.release()


def _ask(assoc, called: str, patient_id: str, study_uid: str, series_uid: str) -> set[str]:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.PatientID = patient_id
    q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study_uid, series_uid, ""
    found: set[str] = set()
    for status, ident in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind):
        if status is None or "Status" not in status:
            raise FindFailed(f"{called} gave no C-FIND answer")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01):
            if ident is not None and str(ident.get("PatientID", patient_id)) == patient_id:
                found.add(str(ident.get("SOPInstanceUID", "")))
        elif code != 0x0000:
            raise FindFailed(f"{called} answered the C-FIND with 0x{code:04X}")
    return found
