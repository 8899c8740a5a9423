"""DICOMweb (PS3.18) under ``/dicom-web``: QIDO-RS, WADO-RS, STOW-RS for OHIF and any client.

Every route needs a signed-in reader or admin (session cookie or ``Bearer``
token). Who sees which study is ``appliance.accounts.permissions.decide``: a
``site:<InstitutionName>`` tag limits a user to that institution, a reader to
the reading pools that admit them, and a break-glass grant opens its study
(searches leave the others out; a direct request is a 403, audited; STOW-RS
into such a study is refused). Every search and retrieval is audited; frame and rendered image
requests, which a viewer makes by the hundred, are audited once per user and
series per minute and process (the first one always).

STOW-RS stores each part through the same durable path as C-STORE
(:class:`dicom_node.study_store.StudyStore`), so a 200 means every instance
is fsynced and indexed; one malformed part fails alone.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pydicom
from flask import Blueprint, Response, current_app, jsonify, request

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.core import db
from appliance.dicomweb import frames as frames_mod
from appliance.dicomweb import htj2k, htj2k_cache, metadata
from appliance.dicomweb import query as qido
from appliance.web import get_db
from dicom_node import study_store

bp = Blueprint("dicomweb", __name__, url_prefix="/dicom-web")

ROLES = permissions.IMAGE_VIEWERS
DICOM_JSON = "application/dicom+json"
IMMUTABLE = "private, max-age=31536000, immutable"
# Searches and series/study metadata may change as images arrive, but OHIF asks for the
# same ones several times while it opens a study: a few seconds of freshness saves those
# round trips (300 ms each on a thin link) and is too short to hide a new series for long.
BRIEFLY = "private, max-age=10"
AUDIT_COALESCE_S = 60.0
GZIP_MIN_BYTES = 1024

# PS3.18 Table 10.5.3-2 / PS3.4 Annex B failure reasons used in STOW-RS responses.
FAILURE_CODES = {
    study_store.INVALID: 0xC000,  # cannot understand
    study_store.NO_SPACE: 0xA700,  # out of resources
    study_store.FAILED: 0x0110,  # processing failure
    study_store.MOVED: 0xA900,  # data set does not match: the SOP instance is in another study
}
STUDY_MISMATCH = 0xA900  # data set does not match: StudyInstanceUID differs from the URL
UNSUPPORTED_PART = 0xC000
NOT_AUTHORIZED = 0x0124  # PS3.7 Annex C "Refused: Not authorized": another site's study

_audit_seen: dict[tuple[str, str, str], float] = {}
_audit_lock = threading.Lock()
_stores: dict[str, study_store.StudyStore] = {}
_stores_lock = threading.Lock()


class HttpError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@bp.errorhandler(HttpError)
def _http_error(e: HttpError):
    resp = jsonify(error=e.message)
    resp.status_code = e.status
    return resp


def _fail(status: int, message: str) -> HttpError:
    return HttpError(status, message)


# -- who may see what ----------------------------------------------------------------------
# The decision is appliance.accounts.permissions': site, pool and break-glass, as everywhere.
def may_see(study_uid: str) -> bool | None:
    """Whether the caller may see this study; None: no such study."""
    return permissions.may_see(study_uid)


def _check_study(study_uid: str) -> None:
    """404 for an unknown study, 403 (audited) for one the caller may not see."""
    try:
        permissions.check_study(study_uid, "dicomweb.denied")
    except permissions.Refused as e:
        raise _fail(e.status, e.message) from None


def _audit(action: str, study_uid: str, detail: dict[str, Any], coalesce_key: str = "") -> None:
    """Audit a retrieval; high-rate ones (frames, thumbnails) at most once a minute per series."""
    if coalesce_key:
        user = (auth.current_user() or {}).get("username", "")
        key, now = (user, action, coalesce_key), time.monotonic()
        with _audit_lock:
            last = _audit_seen.get(key)
            if last is not None and now - last < AUDIT_COALESCE_S:
                return
            if len(_audit_seen) > 10_000:
                _audit_seen.clear()
            _audit_seen[key] = now
    auth.audit_event(action, study_uid, detail=detail)


def _base_url() -> str:
    """Where URLs we emit (BulkDataURI, RetrieveURL) point: never the request's Host header.

    A client chooses its Host header, so URLs built from it would let anyone
    make the appliance hand out links to another server (into a shared cache,
    a report, a log). With ``web.public_url`` set they are absolute under it;
    without, they are path-absolute (``/dicom-web/…``), which OHIF 3.13 and
    any RFC 3986 client resolve against the address they already use.
    """
    public = str(current_app.config["SITE"]["web"].get("public_url") or "")
    return public.rstrip("/") + bp.url_prefix


# -- responses -------------------------------------------------------------------------------
def _json_response(body: bytes, etag: str | None = None, cache: str = BRIEFLY):
    headers = {"Cache-Control": cache, "Vary": "Accept-Encoding"}
    if etag:
        headers["ETag"] = f'"{etag}"'
        if _not_modified(etag):
            return Response(status=304, headers=headers)
    if len(body) >= GZIP_MIN_BYTES and frames_mod.wants_gzip(request.headers.get("Accept-Encoding")):
        body = gzip.compress(body, compresslevel=5)
        headers["Content-Encoding"] = "gzip"
    return Response(body, status=200, mimetype=DICOM_JSON, headers=headers)


def _not_modified(etag: str) -> bool:
    sent = request.headers.get("If-None-Match", "")
    return any(t.strip().strip('"').removesuffix("-gz") == etag
               for t in sent.split(",") if t.strip())


def _dumps(obj: Any) -> bytes:
    import json

    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- QIDO-RS ---------------------------------------------------------------------------------------
def _search(level: str, study_uid: str | None = None, series_uid: str | None = None):
    if study_uid is not None:
        _check_study(study_uid)
    try:
        q = qido.parse(level, request.args.items(multi=True), study_uid, series_uid)
    except qido.QueryError as e:
        raise _fail(400, str(e)) from None
    results = qido.run(get_db(), q, _base_url(),
                       scope=permissions.caller_scope_sql("st.study_uid"))
    _audit("dicomweb.search", study_uid or "", {
        "level": level, "series": series_uid, "query": request.query_string.decode()[:500],
        "results": len(results)})
    resp = _json_response(_dumps(results))
    if q.warnings:
        resp.headers["Warning"] = "299 appliance: " + "; ".join(q.warnings)
    return resp


@bp.get("/studies")
@auth.require(*ROLES)
@permissions.patient_data("list")
def search_studies():
    return _search(qido.STUDY)


@bp.get("/series")
@auth.require(*ROLES)
@permissions.patient_data("list")
def search_all_series():
    return _search(qido.SERIES)


@bp.get("/instances")
@auth.require(*ROLES)
@permissions.patient_data("list")
def search_all_instances():
    return _search(qido.INSTANCE)


@bp.get("/studies/<study>/series")
@auth.require(*ROLES)
@permissions.patient_data("study")
def search_series(study: str):
    return _search(qido.SERIES, study)


@bp.get("/studies/<study>/instances")
@auth.require(*ROLES)
@permissions.patient_data("study")
def search_study_instances(study: str):
    return _search(qido.INSTANCE, study)


@bp.get("/studies/<study>/series/<series>/instances")
@auth.require(*ROLES)
@permissions.patient_data("study")
def search_series_instances(study: str, series: str):
    return _search(qido.INSTANCE, study, series)


# -- WADO-RS: selection ------------------------------------------------------------------------
def _instances(study: str, series: str | None = None, sop: str | None = None) -> list[dict]:
    """Cache rows of the selected instances (404 when none), after the site check."""
    _check_study(study)
    where, params = "i.study_uid = ?", [study]
    if series is not None:
        where += " AND i.series_uid = ?"
        params.append(series)
    if sop is not None:
        where += " AND i.sop_uid = ?"
        params.append(sop)
    rows = metadata.instances(get_db(), current_app.config["SITE"].studies_dir, where,
                              tuple(params))
    if not rows:
        what = f"instance {sop}" if sop else f"series {series}" if series else f"study {study}"
        raise _fail(404, f"no {what} in study {study}" if sop or series else f"no {what}")
    return rows


def _path(row: dict):
    return current_app.config["SITE"].studies_dir / row["path"]


def _etag(rows: list[dict], *extra: str) -> str:
    h = hashlib.sha256()
    for r in rows:
        h.update(r["sha256"].encode())
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:32]


# -- WADO-RS: instances ---------------------------------------------------------------------------
def _retrieve(study: str, series: str | None = None, sop: str | None = None):
    try:
        wanted, shape = frames_mod.plan_instances(request.headers.get("Accept"))
    except frames_mod.NotAcceptable as e:
        raise _fail(406, str(e)) from None
    rows = _instances(study, series, sop)
    for r in rows:
        reason = frames_mod.instance_servable(r["transfer_syntax"], wanted)
        if reason:
            raise _fail(406, f"{reason} (instance {r['sop_uid']}); ask with transfer-syntax=*")
    etag = _etag(rows, wanted, shape)
    headers = {"ETag": f'"{etag}"', "Cache-Control": IMMUTABLE if sop else "private, no-cache"}
    _audit("dicomweb.retrieve", study, {"series": series, "sop": sop, "instances": len(rows),
                                        "what": "instances"})
    if _not_modified(etag):
        return Response(status=304, headers=headers)
    if shape == "single":
        if len(rows) != 1:
            raise _fail(406, "application/dicom without multipart is for one instance; "
                             'ask for multipart/related; type="application/dicom"')
        r = rows[0]
        return Response(frames_mod.instance_chunks(_path(r), r["transfer_syntax"], wanted),
                        mimetype="application/dicom", headers=headers, direct_passthrough=True)
    boundary = frames_mod.new_boundary()
    files = [(_path(r), r["transfer_syntax"]) for r in rows]  # the stream runs outside the app

    def parts() -> Iterator[tuple[str, Iterable[bytes]]]:
        for path, stored in files:
            ts = stored if wanted == "*" else wanted
            yield (f"application/dicom; transfer-syntax={ts}",
                   frames_mod.instance_chunks(path, stored, wanted))

    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return Response(frames_mod.multipart(parts(), boundary), content_type=ctype, headers=headers,
                    direct_passthrough=True)


@bp.get("/studies/<study>")
@auth.require(*ROLES)
@permissions.patient_data("study")
def retrieve_study(study: str):
    return _retrieve(study)


@bp.get("/studies/<study>/series/<series>")
@auth.require(*ROLES)
@permissions.patient_data("study")
def retrieve_series(study: str, series: str):
    return _retrieve(study, series)


@bp.get("/studies/<study>/series/<series>/instances/<sop>")
@auth.require(*ROLES)
@permissions.patient_data("study")
def retrieve_instance(study: str, series: str, sop: str):
    return _retrieve(study, series, sop)


# -- WADO-RS: metadata -----------------------------------------------------------------------------
def _metadata(study: str, series: str | None = None, sop: str | None = None):
    rows = _instances(study, series, sop)
    _audit("dicomweb.metadata", study, {"series": series, "sop": sop, "instances": len(rows)})
    etag = _etag(rows, _base_url())
    return _json_response(metadata.render(rows, _base_url()), etag=etag,
                          cache=IMMUTABLE if sop else BRIEFLY)


@bp.get("/studies/<study>/metadata")
@auth.require(*ROLES)
@permissions.patient_data("study")
def study_metadata(study: str):
    return _metadata(study)


@bp.get("/studies/<study>/series/<series>/metadata")
@auth.require(*ROLES)
@permissions.patient_data("study")
def series_metadata(study: str, series: str):
    return _metadata(study, series)


@bp.get("/studies/<study>/series/<series>/instances/<sop>/metadata")
@auth.require(*ROLES)
@permissions.patient_data("study")
def instance_metadata(study: str, series: str, sop: str):
    return _metadata(study, series, sop)


# -- WADO-RS: frames and bulk data -------------------------------------------------------------------
def _pixel_response(blobs: Iterator[bytes], count: int, part_media: str, ts: str,
                    multipart: bool, etag: str, compressible: bool):
    """Frames/bulk data as multipart/related (or one body), gzip when it helps and is accepted."""
    gz = compressible and frames_mod.wants_gzip(request.headers.get("Accept-Encoding"))
    etag = etag + ("-gz" if gz else "")
    headers = {"ETag": f'"{etag}"', "Cache-Control": IMMUTABLE, "Vary": "Accept, Accept-Encoding"}
    if _not_modified(etag.removesuffix("-gz")):
        return Response(status=304, headers=headers)
    part_type = f"{part_media}; transfer-syntax={ts}"
    if multipart:
        boundary = etag if count == 1 else frames_mod.new_boundary()
        body: Iterable[bytes] = frames_mod.multipart(((part_type, [b]) for b in blobs), boundary)
        ctype = f'multipart/related; type="{part_media}"; boundary={boundary}'
    else:
        body, ctype = blobs, part_type
    if gz:
        headers["Content-Encoding"] = "gzip"
        body = frames_mod.gzip_stream(body)
    if count == 1:  # one frame: small enough to send with a length (keep-alive friendly)
        data = b"".join(body)
        if gz:
            return Response(data, content_type=ctype, headers=headers)
        # Byte ranges (RFC 9110 §14): a viewer reads the first kilobytes of an HTJ2K RPCL
        # codestream as a preview and the rest later. The boundary comes from the ETag, so
        # every range of one representation cuts the same bytes.
        resp = Response(data, content_type=ctype, headers=headers)
        return resp.make_conditional(request, accept_ranges=True, complete_length=len(data))
    return Response(body, content_type=ctype, headers=headers, direct_passthrough=True)


@bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<frame_list>")
@auth.require(*ROLES)
@permissions.patient_data("study")
def retrieve_frames(study: str, series: str, sop: str, frame_list: str):
    row = _instances(study, series, sop)[0]
    pixel = frames_mod.pixel_info(row["pixel"])
    if pixel is None and not _has_pixels(row):
        raise _fail(404, f"instance {sop} has no pixel data")
    count = frames_mod.frame_count(pixel, None)
    try:
        numbers = frames_mod.parse_frame_list(frame_list, count)
        # The ``accept`` query parameter (PS3.18 §8.3.3.1) wins over the header: a viewer
        # whose loader always sends ``transfer-syntax=*`` can still ask for HTJ2K.
        plan = frames_mod.plan_frames(request.args.get("accept") or request.headers.get("Accept"),
                                      row["transfer_syntax"])
    except frames_mod.BadRequest as e:
        raise _fail(400, str(e)) from None
    except LookupError as e:
        raise _fail(404, str(e)) from None
    except frames_mod.NotAcceptable as e:
        raise _fail(406, str(e)) from None
    _audit("dicomweb.frames", study, {"series": series, "sop": sop}, coalesce_key=series)
    path = _path(row)
    blobs: Iterable[bytes] = (frames_mod.frame_bytes(path, pixel, n, plan) for n in numbers)
    if plan.derived:  # HTJ2K from the derived cache, encoded now when not there yet
        cfg = current_app.config["SITE"]
        try:
            blobs = [htj2k_cache.frame(cfg, row, n) for n in numbers]
        except (htj2k.EncodeError, ValueError) as e:
            raise _fail(406, f"{e}; ask with transfer-syntax=* for the stored frames") from None
    elif plan.encode:  # compressed on request: done before answering, so a failure is a 406
        try:
            blobs = [frames_mod.frame_bytes(path, pixel, n, plan) for n in numbers]
        except ValueError as e:
            raise _fail(406, f"{e}; ask with transfer-syntax=* for the stored frames") from None
    return _pixel_response(
        iter(blobs), len(numbers),
        plan.part_media, plan.transfer_syntax, plan.multipart,
        _etag([row], "frames", frame_list, plan.transfer_syntax, plan.part_media,
              str(plan.multipart)),
        compressible=plan.transfer_syntax in frames_mod.NATIVE)


def _has_pixels(row: dict) -> bool:
    return '"7FE00010"' in row["json"]


@bp.get("/studies/<study>/series/<series>/instances/<sop>/bulkdata/<tag>")
@auth.require(*ROLES)
@permissions.patient_data("study")
def retrieve_bulkdata(study: str, series: str, sop: str, tag: str):
    row = _instances(study, series, sop)[0]
    tag = tag.upper()
    if not (len(tag) == 8 and all(c in "0123456789ABCDEF" for c in tag)):
        raise _fail(400, f"bulk data is addressed by an 8-digit tag, got {tag!r}")
    accept = frames_mod.parse_accept(request.headers.get("Accept"))
    multipart = not any(m.media == "application/octet-stream" for m in accept)
    _audit("dicomweb.bulkdata", study, {"series": series, "sop": sop, "tag": tag},
           coalesce_key=series)
    path = _path(row)
    if tag == "7FE00010":
        pixel = frames_mod.pixel_info(row["pixel"])
        count = frames_mod.frame_count(pixel, None)
        ts = row["transfer_syntax"]
        return _pixel_response(
            (frames_mod.read_frame(path, pixel, n) for n in range(1, count + 1)), count,
            "application/octet-stream", ts, multipart, _etag([row], "bulk", tag, str(multipart)),
            compressible=ts in frames_mod.NATIVE)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    elem = ds.get(int(tag, 16))
    if elem is None or not isinstance(elem.value, bytes | bytearray):
        raise _fail(404, f"instance {sop} has no bulk data element {tag}")
    value = bytes(elem.value)
    return _pixel_response(iter([value]), 1, "application/octet-stream", row["transfer_syntax"],
                           multipart, _etag([row], "bulk", tag, str(multipart)),
                           compressible=True)


# -- WADO-RS: rendered and thumbnails -------------------------------------------------------------
def _rendered(row: dict, study: str, frame: int, thumbnail: bool):
    try:
        media = frames_mod.plan_rendered(request.args.get("accept"), request.headers.get("Accept"))
        params = frames_mod.parse_render_params(request.args, thumbnail=thumbnail)
    except frames_mod.NotAcceptable as e:
        raise _fail(406, str(e)) from None
    except frames_mod.BadRequest as e:
        raise _fail(400, str(e)) from None
    pixel = frames_mod.pixel_info(row["pixel"])
    if pixel is None and not _has_pixels(row):
        raise _fail(404, f"instance {row['sop_uid']} has no pixel data to render")
    if frame > frames_mod.frame_count(pixel, None):
        raise _fail(404, f"frame {frame} does not exist")
    _audit("dicomweb.rendered", study, {"series": row["series_uid"], "sop": row["sop_uid"]},
           coalesce_key=row["series_uid"])
    etag = _etag([row], "rendered", str(frame), media, str(params))
    headers = {"ETag": f'"{etag}"', "Cache-Control": IMMUTABLE, "Vary": "Accept"}
    if _not_modified(etag):
        return Response(status=304, headers=headers)
    data = frames_mod.render(_path(row), frame, media, params)
    return Response(data, mimetype=media, headers=headers)


def _middle(rows: list[dict]) -> dict:
    """The representative image of a series or study: the middle one of the first series."""
    first = [r for r in rows if r["series_uid"] == rows[0]["series_uid"] and _has_pixels(r)]
    if not first:
        raise _fail(404, "nothing to render: no image in this series")
    return first[len(first) // 2]


@bp.get("/studies/<study>/series/<series>/instances/<sop>/rendered")
@auth.require(*ROLES)
@permissions.patient_data("study")
def rendered_instance(study: str, series: str, sop: str):
    return _rendered(_instances(study, series, sop)[0], study, 1, False)


@bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<int:frame>/rendered")
@auth.require(*ROLES)
@permissions.patient_data("study")
def rendered_frame(study: str, series: str, sop: str, frame: int):
    return _rendered(_instances(study, series, sop)[0], study, frame, False)


@bp.get("/studies/<study>/thumbnail")
@auth.require(*ROLES)
@permissions.patient_data("study")
def thumbnail_study(study: str):
    return _rendered(_middle(_instances(study)), study, 1, True)


@bp.get("/studies/<study>/series/<series>/thumbnail")
@auth.require(*ROLES)
@permissions.patient_data("study")
def thumbnail_series(study: str, series: str):
    return _rendered(_middle(_instances(study, series)), study, 1, True)


@bp.get("/studies/<study>/series/<series>/instances/<sop>/thumbnail")
@auth.require(*ROLES)
@permissions.patient_data("study")
def thumbnail_instance(study: str, series: str, sop: str):
    return _rendered(_instances(study, series, sop)[0], study, 1, True)


@bp.get("/studies/<study>/series/<series>/instances/<sop>/frames/<int:frame>/thumbnail")
@auth.require(*ROLES)
@permissions.patient_data("study")
def thumbnail_frame(study: str, series: str, sop: str, frame: int):
    return _rendered(_instances(study, series, sop)[0], study, frame, True)


# -- STOW-RS -----------------------------------------------------------------------------------------
def _store() -> study_store.StudyStore:
    cfg = current_app.config["SITE"]
    key = str(cfg.db_path)
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = study_store.StudyStore(
                cfg.studies_dir, cfg.db_path, low_water_mb=cfg["dicom"]["low_water_mb"],
                connect=db.connect, derive=metadata.at_ingest)
        return store


def _boundary(content_type: str) -> bytes:
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        raise _fail(415, 'STOW-RS takes multipart/related; type="application/dicom"')
    values = {k.strip().lower(): v.strip().strip('"') for k, _, v in
              (p.partition("=") for p in params)}
    if values.get("type", "application/dicom").lower() != "application/dicom":
        raise _fail(415, f"STOW-RS parts must be application/dicom, not {values['type']}"
                         " (DICOM JSON + bulk data uploads are not supported)")
    if not values.get("boundary"):
        raise _fail(400, "multipart/related without a boundary parameter")
    return values["boundary"].encode("latin-1")


def _as_part10(data: bytes) -> bytes:
    """Give a part that starts with its meta group but lacks preamble and 'DICM' both.

    Some clients (dicomweb-client, pydicom's plain ``dcmwrite``) send that; the
    stored file is then a proper PS3.10 file like every other.
    """
    if data[128:132] != b"DICM" and data[:2] == b"\x02\x00":
        return b"\0" * 128 + b"DICM" + data
    return data


def _peek_uids(data: bytes) -> tuple[str, str, str]:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"])
        return (str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", "")),
                str(ds.get("StudyInstanceUID", "")))
    except Exception:
        return "", "", ""


def _stow_refusal(data: bytes, study_uid: str) -> str | None:
    """Why the caller may not store into this part's study (another site's, outside their
    pool), or None. A study not yet here is judged by the part's own InstitutionName."""
    facts = permissions.studies(get_db(), [study_uid]).get(study_uid) if study_uid else None
    if facts is None:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                 specific_tags=["InstitutionName"])
            institution = str(ds.get("InstitutionName", "") or "")
        except Exception:
            return None  # unreadable: the study store refuses it with its own reason
        facts = permissions.Study(study_uid, institution)
    granted = bool(study_uid) and auth.has_break_glass(study_uid)
    decision = permissions.decide(auth.current_user(), facts, granted)
    if decision:
        return None
    permissions.deny("dicomweb.store", study_uid, decision.reason)
    return decision.reason


def _stow(study: str | None):
    if study is not None and permissions.studies(get_db(), [study]):
        _check_study(study)  # storing into a study is seeing it: another site's is a 403
    boundary = _boundary(request.headers.get("Content-Type", ""))
    store, addr, base = _store(), auth.client_address(), _base_url()
    ok_items, failed_items, reasons = [], [], []
    try:
        for i, (headers, data) in enumerate(frames_mod.iter_parts(request.stream.read, boundary), 1):
            data = _as_part10(data)
            sop_class, sop, st = _peek_uids(data)
            ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
            if ctype != "application/dicom":
                code, why = UNSUPPORTED_PART, f"part {i}: {ctype} is not application/dicom"
            elif study is not None and st and st != study:
                code, why = STUDY_MISMATCH, f"part {i}: StudyInstanceUID {st} is not {study}"
            elif (refusal := _stow_refusal(data, st)) is not None:
                code, why = NOT_AUTHORIZED, f"part {i}: {refusal}"
            else:
                result = store.store(data, calling_ae="STOW", remote_addr=addr)
                if result.success:
                    rec = result.record
                    _audit_replacement(result)
                    ok_items.append({
                        "00081150": {"vr": "UI", "Value": [rec.sop_class_uid]},
                        "00081155": {"vr": "UI", "Value": [rec.sop_uid]},
                        "00081190": {"vr": "UR", "Value": [
                            f"{base}/studies/{rec.study_uid}/series/{rec.series_uid}"
                            f"/instances/{rec.sop_uid}"]},
                    })
                    continue
                code, why = FAILURE_CODES.get(result.outcome, 0x0110), f"part {i}: {result.comment}"
            reasons.append(why)
            item = {"00081197": {"vr": "US", "Value": [code]},
                    "00000902": {"vr": "LO", "Value": [why[:64]]}}
            if sop_class:
                item["00081150"] = {"vr": "UI", "Value": [sop_class]}
            if sop:
                item["00081155"] = {"vr": "UI", "Value": [sop]}
            failed_items.append(dict(sorted(item.items())))
    except ValueError as e:
        reasons.append(f"request body: {e}")
        if not ok_items and not failed_items:
            raise _fail(400, f"malformed multipart body: {e}") from None
    auth.audit_event("dicomweb.store", study or "", outcome="ok" if not reasons else "partial",
                     detail={"stored": len(ok_items), "failed": len(failed_items),
                             "reasons": reasons[:20]})
    body: dict[str, Any] = {}
    if study:
        body["00081190"] = {"vr": "UR", "Value": [f"{base}/studies/{study}"]}
    if failed_items:
        body["00081198"] = {"vr": "SQ", "Value": failed_items}
    if ok_items:
        body["00081199"] = {"vr": "SQ", "Value": ok_items}
    status = 200 if not reasons else 202 if ok_items else 409
    return Response(_dumps(body), status=status, mimetype=DICOM_JSON)


def _audit_replacement(result: study_store.StoreResult) -> None:
    """A STOW part that replaced a stored instance is audited as a C-STORE replacement is."""
    if result.replaced is not None:
        auth.audit_event("instance.replaced", result.replaced["sop_uid"],
                         detail={**result.replaced, "calling_ae": "STOW"})


@bp.post("/studies")
@auth.require(*ROLES)
@permissions.patient_data("study")
def store_instances():
    return _stow(None)


@bp.post("/studies/<study>")
@auth.require(*ROLES)
@permissions.patient_data("study")
def store_study_instances(study: str):
    return _stow(study)
