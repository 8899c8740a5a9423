"""DICOMweb building blocks against a real index and real files (no web server, no mocks)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_data import make_instance
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import RLELossless, generate_uid

from appliance.core import db
from appliance.dicomweb import frames as fr
from appliance.dicomweb import metadata as md
from appliance.dicomweb import query as qido
from dicom_node.study_store import StudyStore


class Store:
    def __init__(self, root: Path):
        self.studies = root / "studies"
        self.db_path = root / "appliance.db"
        db.open_db(self.db_path).close()
        self.store = StudyStore(self.studies, self.db_path, connect=db.connect)
        self.conn = db.connect(self.db_path)

    def put(self, ds: pydicom.Dataset) -> None:
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert self.store.store(buf.getvalue(), calling_ae="TEST").success


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


def _series(store: Store, n: int, **kw) -> tuple[str, str, list[pydicom.Dataset]]:
    st, se = kw.pop("study_uid", None) or generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = make_instance(st, se, i, **kw)
        store.put(ds)
        out.append(ds)
    return st, se, out


def _q(store: Store, level: str, args: dict | list, sites=None, **kw) -> list[dict]:
    items = list(args.items()) if isinstance(args, dict) else args
    return qido.run(store.conn, qido.parse(level, items, **kw), "https://x/dicom-web", sites)


def test_qido_matching_by_keyword_tag_wildcard_and_range(store: Store) -> None:
    a, _, _ = _series(store, 2, patient_id="PAT-A", patient_name="SMITH^ANNA",
                      study_date="20240105", institution="North")
    b, _, _ = _series(store, 1, patient_id="PAT-B", patient_name="JONES^BOB",
                      study_date="20240210", modality="MR", institution="South")
    uids = lambda rs: {r["0020000D"]["Value"][0] for r in rs}  # noqa: E731
    assert uids(_q(store, "study", {"PatientID": "PAT-A"})) == {a}
    assert uids(_q(store, "study", {"00100020": "PAT-B"})) == {b}  # OHIF's priors lookup
    assert uids(_q(store, "study", {"PatientName": "smi*"})) == {a}  # PN: case-insensitive
    assert uids(_q(store, "study", {"PatientName": "bob", "fuzzymatching": "true"})) == {b}
    assert uids(_q(store, "study", {"StudyDate": "20240201-"})) == {b}
    assert uids(_q(store, "study", {"StudyDate": "-20240131"})) == {a}
    assert uids(_q(store, "study", {"ModalitiesInStudy": "MR"})) == {b}
    assert uids(_q(store, "study", {"PatientID": "PAT-?"})) == {a, b}
    assert uids(_q(store, "study", {"PatientID": ""})) == {a, b}  # empty = universal
    assert uids(_q(store, "study", {"StudyInstanceUID": f"{a},{b}"})) == {a, b}
    assert uids(_q(store, "study", {}, sites=["north"])) == {a}
    assert _q(store, "study", {}, sites=[]) == []
    rows = _q(store, "study", {"limit": "1", "offset": "1"})
    assert len(rows) == 1 and uids(rows) == {a}  # newest first: b, then a
    study = _q(store, "study", {"PatientID": "PAT-A"})[0]
    assert study["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "SMITH^ANNA"}]}
    assert study["00201208"] == {"vr": "IS", "Value": [2]}
    assert study["00081190"]["Value"][0] == f"https://x/dicom-web/studies/{a}"


def test_qido_levels_and_includefield(store: Store) -> None:
    st, se, dss = _series(store, 3)
    series = _q(store, "series", {}, study_uid=st)
    assert [s["0020000E"]["Value"][0] for s in series] == [se]
    assert "00100020" not in series[0]  # patient attributes only with includefield
    series = _q(store, "series", {"includefield": "00100020,StudyDescription"}, study_uid=st)
    assert series[0]["00100020"]["Value"] == ["PAT001"]
    assert series[0]["00081030"]["Value"] == ["CT HEAD W/O CONTRAST"]
    everything = _q(store, "instance", {"includefield": "all"})
    assert len(everything) == 3 and "00100010" in everything[0]
    inst = _q(store, "instance", {"InstanceNumber": "2"}, study_uid=st, series_uid=se)
    assert [i["00080018"]["Value"][0] for i in inst] == [dss[1].SOPInstanceUID]


@pytest.mark.parametrize("args, reason", [
    ({"limit": "ten"}, "limit must be a whole number"),
    ({"offset": "-1"}, "must not be negative"),
    ({"NoSuchKeyword": "x"}, "unknown query parameter"),
    ({"99999999": "x"}, "not a tag"),
    ({"StudyDate": "2024-01-01"}, "is not a value or a range"),
    ({"StudyDate": "202401"}, "is not a date"),
    ({"StudyInstanceUID": "1.2.abc"}, "not a valid UID"),
    ({"SOPInstanceUID": "1.2.3"}, "instance-level attribute"),
    ({"fuzzymatching": "maybe"}, "true or false"),
])
def test_qido_bad_parameters_say_why(args: dict, reason: str) -> None:
    with pytest.raises(qido.QueryError, match=reason):
        qido.parse("study", list(args.items()))


def test_qido_unsupported_attribute_is_ignored_with_warning() -> None:
    q = qido.parse("study", [("OtherPatientIDs", "X")])
    assert not q.where and "OtherPatientIDs" in q.warnings[0]


def test_metadata_cache_bulkdata_and_staleness(store: Store) -> None:
    st, se, dss = _series(store, 3, rows=32, cols=32)
    rows = md.instances(store.conn, store.studies, "i.series_uid = ?", (se,))
    body = json.loads(md.render(rows, "https://h/dicom-web"))
    assert len(body) == 3
    first = body[0]
    assert first["00100010"]["Value"][0]["Alphabetic"] == "DOE^JANE"
    assert first["7FE00010"]["BulkDataURI"] == (
        f"https://h/dicom-web/studies/{st}/series/{se}/instances/{dss[0].SOPInstanceUID}"
        "/bulkdata/7FE00010")
    assert "InlineBinary" not in json.dumps(first)
    cached = store.conn.execute("SELECT COUNT(*) FROM dicomweb_metadata").fetchone()[0]
    assert cached == 3
    # A replaced instance (same SOP UID, other bytes) gets fresh metadata, never stale.
    newer = make_instance(st, se, 0, rows=32, cols=32, sop_uid=dss[0].SOPInstanceUID,
                          series_description="REPLACED")
    store.put(newer)
    rows = md.instances(store.conn, store.studies, "i.sop_uid = ?", (dss[0].SOPInstanceUID,))
    assert json.loads(md.render(rows, ""))[0]["0008103E"]["Value"] == ["REPLACED"]


def test_frames_native_and_encapsulated_by_offset(store: Store) -> None:
    st, se = generate_uid(), generate_uid()
    native = make_instance(st, se, 0, rows=40, cols=30)
    rle = make_instance(st, se, 1, rows=40, cols=30)
    rle.compress(RLELossless)
    multi = make_instance(st, se, 2, rows=8, cols=8)
    frames = np.arange(3 * 64, dtype=np.uint16).reshape(3, 8, 8)
    multi.NumberOfFrames, multi.PixelData = 3, frames.tobytes()
    for ds in (native, rle, multi):
        store.put(ds)
    rows = {r["sop_uid"]: r for r in md.instances(store.conn, store.studies, "i.series_uid = ?",
                                                   (se,))}

    def frame(ds, n):
        r = rows[ds.SOPInstanceUID]
        return fr.read_frame(store.studies / r["path"], fr.pixel_info(r["pixel"]), n)

    assert frame(native, 1) == native.PixelData
    assert frame(rle, 1) == next(generate_frames(rle.PixelData, number_of_frames=1))
    assert [frame(multi, n) for n in (1, 2, 3)] == [f.tobytes() for f in frames]
    info = fr.pixel_info(rows[rle.SOPInstanceUID]["pixel"])
    assert info["enc"] and info["ts"] == RLELossless
    decoded = fr.decoded_frame(store.studies / rows[rle.SOPInstanceUID]["path"], 1)
    assert decoded == native.PixelData.__class__(rle.pixel_array.astype("<u2").tobytes())


def test_frame_negotiation() -> None:
    ohif = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    plan = fr.plan_frames(ohif, RLELossless)
    assert (plan.transfer_syntax, plan.part_media, plan.decode) == (RLELossless,
                                                                    "application/octet-stream",
                                                                    False)
    plan = fr.plan_frames('multipart/related; type="application/octet-stream"', RLELossless)
    assert plan.transfer_syntax == fr.EXPLICIT_LE and plan.decode
    plan = fr.plan_frames(None, fr.EXPLICIT_LE)
    assert plan.multipart and not plan.decode
    with pytest.raises(fr.NotAcceptable, match="cannot transcode"):
        fr.plan_frames('multipart/related; type="image/jls"', fr.EXPLICIT_LE)
    with pytest.raises(fr.NotAcceptable, match="not a frame media type"):
        fr.plan_frames("text/html", fr.EXPLICIT_LE)
    assert fr.plan_rendered("image/png", "image/jpeg") == "image/png"  # the parameter wins
    assert fr.plan_rendered(None, "image/png,*/*;q=0.1") == "image/png"
    with pytest.raises(fr.NotAcceptable):
        fr.plan_rendered("image/gif", None)
    with pytest.raises(fr.BadRequest):
        fr.parse_frame_list("1,x", 3)
    with pytest.raises(LookupError):
        fr.parse_frame_list("4", 3)


@pytest.mark.parametrize("ts", fr.LOSSLESS_ENCODE)
def test_frames_transcoded_losslessly_on_request(tmp_path: Path, ts: str) -> None:
    """RLE / JPEG 2000 Lossless on request: the client decodes exactly the stored pixels."""
    from pydicom.encaps import encapsulate

    # RLE is pydicom's own; JPEG 2000 comes with the project's pylibjpeg-openjpeg dependency.
    assert fr.can_encode(ts), f"no encoder for {ts}: is pylibjpeg-openjpeg installed?"
    media = fr.FRAME_MEDIA[ts]
    plan = fr.plan_frames(f'multipart/related; type="{media}"; transfer-syntax={ts}',
                          fr.EXPLICIT_LE)
    assert (plan.transfer_syntax, plan.part_media, plan.encode, plan.decode) == (
        ts, media, True, False)
    ds = make_instance(generate_uid(), generate_uid(), 0, rows=64, cols=48)
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    encoded = fr.frame_bytes(path, None, 1, plan)
    assert encoded != ds.PixelData
    back = pydicom.dcmread(path)
    back.file_meta.TransferSyntaxUID = ts
    back.PixelData = encapsulate([encoded])
    assert np.array_equal(back.pixel_array, ds.pixel_array)
    # A stored RLE frame re-encoded as JPEG 2000 goes through the decoder first.
    assert fr.plan_frames(f'multipart/related; type="{media}"; transfer-syntax={ts}',
                          RLELossless if ts != RLELossless else fr.EXPLICIT_LE).encode


def test_frames_cannot_be_encoded_beyond_what_the_header_allows(tmp_path: Path) -> None:
    ds = make_instance(generate_uid(), generate_uid(), 0, rows=64, cols=64)
    ds.BitsStored, ds.HighBit = 8, 7  # but the values go up to 4095
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    plan = fr.plan_frames('multipart/related; type="image/jp2"; transfer-syntax='
                          '1.2.840.10008.1.2.4.90', fr.EXPLICIT_LE)
    _, index = md.compute(path, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    with pytest.raises(ValueError, match="cannot encode"):  # never silently lossy
        fr.frame_bytes(path, fr.pixel_info(index), 1, plan)


def test_rendered_applies_window_and_viewport(tmp_path: Path) -> None:
    ds = make_instance(generate_uid(), generate_uid(), 0, rows=20, cols=40)
    values = np.zeros((20, 40), dtype=np.uint16)
    values[:, 20:] = 1024 + 80  # HU 80 after the -1024 intercept: top of a 40/80 window
    values[:, 10:20] = 1024 + 40  # HU 40: the centre
    ds.PixelData = values.tobytes()
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    png = fr.render(path, 1, "image/png", fr.RenderParams((40, 80), None, 90))
    img = np.asarray(Image.open(io.BytesIO(png)))
    assert img.shape == (20, 40)
    assert img[0, 0] == 0 and img[0, 35] == 255 and 120 <= img[0, 15] <= 135
    jpg = fr.render(path, 1, "image/jpeg", fr.RenderParams(None, (20, 20), 80))
    assert Image.open(io.BytesIO(jpg)).size == (20, 10)


def test_multipart_parser_streams_parts_and_rejects_truncation() -> None:
    body = (b"preamble\r\n--B\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--B\r\n"
            b"Content-Type: text/plain\r\n\r\nB\r\n--B\r\n\r\nC\r\n--B--\r\n")
    stream = io.BytesIO(body)
    parts = list(fr.iter_parts(lambda n: stream.read(7), b"B"))  # tiny reads: boundaries straddle
    assert [(h.get("content-type"), b) for h, b in parts] == [
        ("application/dicom", b"AAA"), ("text/plain", b"B"), (None, b"C")]
    truncated = io.BytesIO(b"--B\r\nContent-Type: application/dicom\r\n\r\nAAAA")
    with pytest.raises(ValueError, match="ends inside a part"):
        list(fr.iter_parts(truncated.read, b"B"))


def test_sweep_fills_metadata_once_in_batches_and_passes_unreadable_files(store: Store,
                                                                         monkeypatch) -> None:
    class Cfg:
        db_path, studies_dir = store.db_path, store.studies

    monkeypatch.setattr(md, "SWEEP_BATCH", 2)
    _, se, dss = _series(store, 3)
    broken = store.conn.execute("SELECT path FROM instances WHERE sop_uid = ?",
                                (dss[1].SOPInstanceUID,)).fetchone()["path"]
    (store.studies / broken).write_bytes(b"not dicom any more")
    assert md.sweep(Cfg) == 2 and md.sweep(Cfg) == 1 and md.sweep(Cfg) == 0
    made = {r[0] for r in store.conn.execute("SELECT sop_uid FROM dicomweb_metadata")}
    assert made == {dss[0].SOPInstanceUID, dss[2].SOPInstanceUID}
    before = store.conn.execute("SELECT made_at FROM dicomweb_metadata").fetchall()
    _series(store, 1, study_uid=dss[0].StudyInstanceUID)  # only the new instance is read
    assert md.sweep(Cfg) == 1
    assert store.conn.execute("SELECT made_at FROM dicomweb_metadata").fetchall()[:2] == before


def test_instances_are_sent_as_stored_or_decompressed(tmp_path: Path) -> None:
    ds = make_instance(generate_uid(), generate_uid(), 0, rows=16, cols=16)
    ds.compress(RLELossless)
    path = tmp_path / "rle.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert b"".join(fr.instance_chunks(path, RLELossless, "*")) == path.read_bytes()
    assert fr.instance_servable(RLELossless, fr.EXPLICIT_LE) is None
    plain = pydicom.dcmread(io.BytesIO(b"".join(fr.instance_chunks(path, RLELossless,
                                                                    fr.EXPLICIT_LE))))
    assert plain.file_meta.TransferSyntaxUID == fr.EXPLICIT_LE
    assert np.array_equal(plain.pixel_array, ds.pixel_array)
    assert "cannot transcode" in fr.instance_servable(fr.EXPLICIT_LE, "1.2.840.10008.1.2.4.80")


@pytest.mark.parametrize("header, expected", [
    ("gzip, deflate, br", True), ("br;q=1.0, gzip;q=0.8", True), ("gzip;q=0", False),
    ("gzip; q=0.0", False), ("identity", False), (None, False),
])
def test_gzip_only_when_accepted(header, expected) -> None:
    assert fr.wants_gzip(header) is expected


def test_metadata_written_at_ingest_equals_what_the_file_gives(tmp_path: Path) -> None:
    """The store's derive hook writes each row in the index transaction, as reading the file would."""
    studies, db_path = tmp_path / "studies", tmp_path / "appliance.db"
    db.open_db(db_path).close()
    store = StudyStore(studies, db_path, connect=db.connect, derive=md.at_ingest)
    st, se = generate_uid(), generate_uid()
    native = make_instance(st, se, 0, rows=40, cols=30)
    rle = make_instance(st, se, 1, rows=40, cols=30)
    rle.compress(RLELossless)
    multi = make_instance(st, se, 2, rows=8, cols=8)
    multi.NumberOfFrames = 3
    multi.PixelData = np.arange(3 * 64, dtype=np.uint16).tobytes()
    implicit = make_instance(st, se, 3, rows=16, cols=16)
    implicit.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    # Values the raw fast path must leave to pydicom, or read exactly as pydicom does.
    native.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    native.StationName = " LEADING BLANK"
    native.PatientComments = "a\\backslash in LT"
    native.OtherPatientNames = "YAMADA^TARO=山田^太郎"
    native.SpecificCharacterSet = ["ISO_IR 192"]
    native.InstitutionAddress = "Straße 1"
    native.PatientAge = "042Y"
    native.PixelSpacing = ["0.4883", "0.4883"]
    native.WindowCenter = ["40", "400"]
    native.SliceLocation = "-12.50"
    native.NumberOfFrames = "1"
    native.ImageComments = "x\\\\"
    native.Manufacturer = ""
    native.ReferencedImageSequence = [pydicom.Dataset()]
    native.ReferencedImageSequence[0].ReferencedSOPInstanceUID = generate_uid()
    for ds in (native, rle, multi, implicit):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True, implicit_vr=ds is implicit)
        assert store.store(buf.getvalue(), calling_ae="TEST").success
    conn = db.connect(db_path)
    rows = conn.execute("SELECT i.sop_uid, i.path, i.sha256 AS isha, m.sha256, m.json, m.pixel"
                        " FROM instances i JOIN dicomweb_metadata m USING (sop_uid)").fetchall()
    assert len(rows) == 4
    for r in rows:
        assert r["sha256"] == r["isha"]
        assert (r["json"], r["pixel"]) == md.compute(studies / r["path"], st, se, r["sop_uid"])
        # … and element for element what pydicom's own DICOM JSON says.
        prefix = f"{md.BASE_MARKER}/studies/{st}/series/{se}/instances/{r['sop_uid']}/bulkdata/"
        ref = pydicom.dcmread(studies / r["path"], stop_before_pixels=True).to_json_dict(
            bulk_data_threshold=md.BULK_THRESHOLD,
            bulk_data_element_handler=lambda e, p=prefix: p + f"{e.tag:08X}")
        ours = json.loads(r["json"])
        ours.pop("00083002")
        ours.pop("7FE00010")
        assert ours == ref
    assert {json.loads(r["pixel"])["enc"] for r in rows} == {True, False}


def test_a_failing_derivation_still_stores_the_instance(tmp_path: Path) -> None:
    db.open_db(tmp_path / "appliance.db").close()

    def broken(ds, data, rec):
        return lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)")

    store = StudyStore(tmp_path / "studies", tmp_path / "appliance.db", connect=db.connect,
                       derive=broken)
    buf = io.BytesIO()
    make_instance(generate_uid(), generate_uid(), 0).save_as(buf, enforce_file_format=True)
    assert store.store(buf.getvalue(), calling_ae="TEST").outcome == "ok"
    conn = db.connect(tmp_path / "appliance.db")
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 1


def test_metadata_from_a_received_dataset_leaves_it_whole() -> None:
    ds = make_instance(generate_uid(), generate_uid(), 0, rows=8, cols=8)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    parsed = pydicom.dcmread(io.BytesIO(data))
    text, pixel = md.from_received(parsed, data, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                                   ds.SOPInstanceUID)
    assert parsed.PixelData == ds.PixelData  # the store's dataset keeps its pixels
    assert json.loads(text)["7FE00010"]["BulkDataURI"].endswith("/bulkdata/7FE00010")
    assert json.loads(pixel)["size"] == 128


def test_sweep_remakes_rows_of_instances_replaced_without_the_ingest_hook(store: Store,
                                                                         monkeypatch) -> None:
    """A corrected copy stored without ``derive`` (reconciliation) keeps its rowid: the sweep
    still finds it through instance_versions, so no reader's request reads its file."""
    class Cfg:
        db_path, studies_dir = store.db_path, store.studies

    st, se, dss = _series(store, 3, rows=16, cols=16)
    assert md.sweep(Cfg) == 3 and md.sweep(Cfg) == 0
    for ds in dss[:2]:
        store.put(make_instance(st, se, int(ds.InstanceNumber), rows=16, cols=16,
                                sop_uid=ds.SOPInstanceUID, series_description="CORRECTED"))
    assert md.sweep(Cfg) == 2 and md.sweep(Cfg) == 0
    read: list[str] = []
    real = md.compute
    monkeypatch.setattr(md, "compute", lambda p, *a: read.append(p) or real(p, *a))
    body = json.loads(md.render(md.instances(store.conn, store.studies, "i.series_uid = ?",
                                             (se,)), ""))
    assert read == []  # answered from rows only
    assert sorted(m["0008103E"]["Value"][0] for m in body) == ["AXIAL 5MM", "CORRECTED",
                                                                "CORRECTED"]


def test_start_up_recovery_writes_the_metadata_of_files_it_reindexes(tmp_path: Path) -> None:
    studies, db_path = tmp_path / "studies", tmp_path / "appliance.db"
    db.open_db(db_path).close()
    plain = StudyStore(studies, db_path, connect=db.connect)
    st, se = generate_uid(), generate_uid()
    for i in range(2):
        buf = io.BytesIO()
        make_instance(st, se, i, rows=24, cols=24).save_as(buf, enforce_file_format=True)
        assert plain.store(buf.getvalue(), calling_ae="TEST").success
    plain.close()
    conn = db.connect(db_path)
    conn.execute("DELETE FROM instances")  # as if the process died between rename and commit
    store = StudyStore(studies, db_path, connect=db.connect, derive=md.at_ingest)
    assert store.recover()["reindexed"] == 2
    rows = conn.execute("SELECT i.sop_uid, i.path, i.sha256 AS isha, m.sha256, m.json, m.pixel"
                        " FROM instances i JOIN dicomweb_metadata m USING (sop_uid)").fetchall()
    assert len(rows) == 2
    for r in rows:
        assert r["sha256"] == r["isha"]
        assert (r["json"], r["pixel"]) == md.compute(studies / r["path"], st, se, r["sop_uid"])
