"""What OHIF 3.13 asks for first when it opens a study, so the viewer page can ask at once.

Over a 300 ms link each DICOMweb request of OHIF's opening chain costs a round
trip, and OHIF only starts the chain once its JavaScript has booted (1.5-3 s
with the viewer cached on this machine): study search, then the series search
and the patient's priors search, then each series' metadata, then the first
frame. The viewer page carries those URLs in a small script at its top that
fetches them, with the Accept headers OHIF will send, in parallel with the
JavaScript start-up; OHIF's own requests are then answered by the browser's
HTTP cache (frames are immutable, searches and metadata fresh for 10 s; the
answers vary by Cookie, and OHIF's first start in a browser sets a language
cookie, so that one opening misses them). ``<link rel=preload>`` does
not do it: Chromium does not hand preloads to XMLHttpRequest, and a preload's
``Accept: */*`` misses frames, whose responses vary by Accept.

The URLs must be byte-for-byte those OHIF builds (pinned 3.13.2 with our
``viewer-app-config.js``), and the first frame is the one our hanging protocol
(or OHIF's default) shows first: the same series choice as the JavaScript, and
OHIF's slice order (descending position along the slice normal; the middle
is index ``ceil((n - 1) / 2)``). A wrong guess costs one frame's bytes, never a
wrong image: OHIF still asks for what it needs. The page reads only the
metadata cache the worker's sweep keeps, never files. ``tests/test_viewer_e2e.py``
checks that the preloads are the requests OHIF makes.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass
from urllib.parse import quote

# OHIF's query strings for a study opened by StudyInstanceUIDs (fuzzy matching on, as
# our app-config says; includefield lists as OHIF 3.13.2 sends them).
STUDY_SEARCH = ("/dicom-web/studies?limit=101&offset=0&fuzzymatching=true"
                "&includefield=00081030%2C00080060%2C00080090%2C00100030&StudyInstanceUID={study}")
PRIORS_SEARCH = ("/dicom-web/studies?00100020={patient}&limit=101&offset=0&fuzzymatching=true"
                 "&includefield=00081030%2C00080060%2C00080090%2C00100030")
SERIES_SEARCH = "/dicom-web/studies/{study}/series?includefield=00080021%2C00080031%2C0008103E%2C00200011"
SERIES_METADATA = "/dicom-web/studies/{study}/series/{series}/metadata"
FRAME = "/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/1"
MAX_SERIES = 12  # a study with more series gets its searches preloaded, not every series

# The CT head (stroke) rules of viewer-app-config.js, in Python.
HEAD_BODY_PARTS = {"HEAD", "BRAIN", "SKULL", "HEADNECK"}
HEAD_WORDS = re.compile(r"\b(head|brain|stroke|neuro|skull|cranial|intracranial|cerebral)\b",
                        re.IGNORECASE)
OTHER_KERNELS = re.compile(r"\b(bone|lung|mip|minip|sag|sagittal|cor|coronal|3d|vr)\b",
                           re.IGNORECASE)
MIN_STACK_IMAGES = 10
# OHIF puts these last when it sorts series (isLowPriorityModality) and hangs none of them.
LOW_PRIORITY = {"SEG", "RTSTRUCT", "RTPLAN", "PR", "SR", "KO", "DOC", "RTDOSE", "REG", "OT"}
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


@dataclass
class Slice:
    sop_uid: str
    position: list[float] | None
    orientation: list[float] | None
    image_type: list[str]
    thickness: float | None


def _slices(conn: sqlite3.Connection, series_uid: str) -> list[Slice]:
    """Position, orientation, ImageType and thickness of each instance, from cached metadata.

    Only from the cache the worker's sweep keeps (seconds after ingest): the page
    must not wait while metadata is made. A series not fully cached yet gives []
    (its slice order is unknown), and its frame is simply not fetched ahead; the
    metadata request fetched ahead makes the cache in parallel with OHIF's start.
    """
    rows = conn.execute(
        "SELECT i.sop_uid, m.json, m.sha256 = i.sha256 AS fresh FROM instances i"
        " LEFT JOIN dicomweb_metadata m ON m.sop_uid = i.sop_uid WHERE i.series_uid = ?",
        (series_uid,)).fetchall()
    if not rows or not all(r["fresh"] for r in rows):
        return []
    out = []
    for r in rows:
        attrs = json.loads(r["json"])

        def values(tag: str, attrs: dict = attrs) -> list:
            return list(attrs.get(tag, {}).get("Value") or [])

        ipp, iop, thick = values("00200032"), values("00200037"), values("00180050")
        try:
            thickness = float(thick[0]) if thick else None
        except (TypeError, ValueError):
            thickness = None
        out.append(Slice(r["sop_uid"], [float(v) for v in ipp] if len(ipp) == 3 else None,
                         [float(v) for v in iop] if len(iop) == 6 else None,
                         [str(v).upper() for v in values("00080008")], thickness))
    return out


def _normal(iop: list[float]) -> tuple[float, float, float]:
    r, c = iop[:3], iop[3:]
    return (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])


def ordered(slices: list[Slice]) -> list[Slice]:
    """OHIF's stack order: ascending position along the normal of the middle instance."""
    if len(slices) <= 1:
        return slices
    ref = slices[len(slices) // 2]
    if not ref.orientation or any(s.position is None for s in slices):
        return slices
    n = _normal(ref.orientation)
    return sorted(slices, key=lambda s: sum(p * k for p, k in zip(s.position, n, strict=True)))


def is_head_study(study: sqlite3.Row, series: list[sqlite3.Row]) -> bool:
    """A CT whose body part or a description says head/brain/stroke (viewer-app-config.js)."""
    for se in series:
        if se["modality"] != "CT":
            continue
        part = re.sub(r"[^A-Z]", "", (se["body_part"] or "").upper())
        if part in HEAD_BODY_PARTS or HEAD_WORDS.search(study["study_description"] or "") \
                or HEAD_WORDS.search(se["series_description"] or ""):
            return True
    return False


def _head_stack(conn: sqlite3.Connection,
                series: list[sqlite3.Row]) -> tuple[str, list[Slice]]:
    """The axial soft-tissue stack our protocol hangs: axial, not bone/lung, most images, thinnest."""
    best, best_rank, best_slices = "", None, []
    for se in series:
        if se["modality"] != "CT":
            continue
        slices = _slices(conn, se["series_uid"])
        if len(slices) < MIN_STACK_IMAGES or not slices:
            continue
        first = slices[0]
        if "LOCALIZER" in first.image_type:
            continue
        axial = bool(first.orientation) and abs(_normal(first.orientation)[2]) > 0.9
        rank = (0 if axial else 1, 1 if OTHER_KERNELS.search(se["series_description"] or "") else 0,
                -len(slices), first.thickness or 99)
        if best_rank is None or rank < best_rank:
            best, best_rank, best_slices = se["series_uid"], rank, slices
    return best, best_slices


def first_frame(conn: sqlite3.Connection, study: sqlite3.Row,
                series: list[sqlite3.Row]) -> tuple[str, str] | None:
    """(series UID, SOP UID) of the image OHIF shows first, or None when we cannot tell.

    OHIF's viewport lists a stack from the highest position along the normal
    down (seen in Chromium: its first image is the top slice), so position
    ``k`` of the viewport is ``ordered(...)[last - k]``.
    """
    if is_head_study(study, series):
        uid, slices = _head_stack(conn, series)
        if uid:
            stack = ordered(slices)
            last = len(stack) - 1
            middle = last // 2 if last % 2 == 0 else (last + 1) // 2  # OHIF's 'middle' preset
            return uid, stack[last - middle].sop_uid
    images = [se for se in series if (se["modality"] or "") not in LOW_PRIORITY
              and se["num_instances"]]
    if not images:
        return None
    stack = ordered(_slices(conn, images[0]["series_uid"]))
    return (images[0]["series_uid"], stack[-1].sop_uid) if stack else None


JSON_ACCEPT = "application/dicom+json"
FRAME_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"


def accept_for(url: str) -> str:
    """The Accept header OHIF sends for that URL (responses to frames vary by it)."""
    return FRAME_ACCEPT if "/frames/" in url else JSON_ACCEPT


def first_requests(conn: sqlite3.Connection, study_uid: str) -> list[str]:
    """The DICOMweb URLs OHIF requests first for ``study_uid`` (empty for an unknown study)."""
    if not UID.match(study_uid) or len(study_uid) > 64:
        return []
    study = conn.execute("SELECT study_uid, study_description, patient_id FROM studies"
                         " WHERE study_uid = ?", (study_uid,)).fetchone()
    if study is None:
        return []
    series = conn.execute(
        "SELECT series_uid, modality, series_number, series_description, body_part,"
        " num_instances FROM series WHERE study_uid = ? ORDER BY series_number IS NULL,"
        " series_number, series_date || ' ' || series_time, series_uid", (study_uid,)).fetchall()
    urls = [STUDY_SEARCH.format(study=study_uid), SERIES_SEARCH.format(study=study_uid)]
    if study["patient_id"]:  # OHIF's priors search, which the first frame waits for
        # encodeURIComponent, as dicomweb-client builds its query strings
        urls.append(PRIORS_SEARCH.format(patient=quote(study["patient_id"], safe="!~*'()")))
    if len(series) > MAX_SERIES:
        return urls
    urls += [SERIES_METADATA.format(study=study_uid, series=se["series_uid"]) for se in series]
    frame = first_frame(conn, study, series)
    if frame:
        urls.append(FRAME.format(study=study_uid, series=frame[0], sop=frame[1]))
    return urls
