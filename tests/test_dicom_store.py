"""C-STORE into the running node through real clients: dcmtk ``storescu`` and pynetdicom's SCU.

What is compared: the node writes its own File Meta Information (group 0002:
implementation UID, the transfer syntax of the presentation context), so "byte
identical" means the dataset after the meta group is exactly the bytes the
client sent, and the meta names the same SOP instance and transfer syntax.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from conftest import Site, make_site, missing
from dicom_data import make_instance, write_series
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, generate_uid
from pynetdicom import AE, _config

EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture(autouse=True)
def send_files_verbatim(monkeypatch):
    """pynetdicom's SCU sends a file's bytes as they are (no decode/re-encode) in this mode."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# -- helpers ----------------------------------------------------------------------------
def dataset_bytes(raw: bytes) -> bytes:
    """The dataset of a Part 10 file: everything after the File Meta group."""
    assert raw[128:132] == b"DICM"
    tag, vr, length = struct.unpack("<4s2sH", raw[132:140])
    assert tag == b"\x02\x00\x00\x00" and vr == b"UL" and length == 4, "meta group length first"
    (group_length,) = struct.unpack("<I", raw[140:144])
    return raw[144 + group_length:]


def indexed(site: Site) -> dict[str, dict]:
    conn = site.db()
    try:
        return {r["sop_uid"]: dict(r) for r in conn.execute("SELECT * FROM instances")}
    finally:
        conn.close()


def assert_stored_as_sent(site: Site, sent: list[Path]) -> None:
    """Every sent file is indexed, readable, and its dataset bytes are the stored ones."""
    rows = indexed(site)
    for path in sent:
        raw = path.read_bytes()
        sop = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert sop in rows, f"{path.name} not indexed"
        stored = (site.data_dir / "studies" / rows[sop]["path"]).read_bytes()
        assert dataset_bytes(stored) == dataset_bytes(raw), f"{path.name} differs"
        meta = pydicom.dcmread(io.BytesIO(stored), stop_before_pixels=True).file_meta
        assert meta.MediaStorageSOPInstanceUID == sop
        assert meta.TransferSyntaxUID == pydicom.dcmread(path, stop_before_pixels=True) \
            .file_meta.TransferSyntaxUID == rows[sop]["transfer_syntax"]


def stored_files(site: Site) -> list[Path]:
    return sorted(p for p in (site.data_dir / "studies").rglob("*") if p.is_file())


def storescu(dcmtk: dict, site: Site, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen([dcmtk["storescu"], "-aet", "MODALITY", "-aec", site.ae_title,
                             "127.0.0.1", str(site.dicom_port), *map(str, files)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "TCP_NODELAY": "1"})


def part10(path: Path, body: bytes, *, sop_uid: str | None = None, syntax: str = EXPLICIT_LE,
           sop_class: str = CTImageStorage) -> Path:
    """A file whose meta names a SOP instance and syntax and whose dataset is ``body`` verbatim."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(buf.getvalue() + body)
    return path


def file_body(name: str) -> bytes:
    """The dataset bytes of one of pydicom's bundled test files (no meta)."""
    raw = Path(get_testdata_file(name)).read_bytes()
    return dataset_bytes(raw) if raw[128:132] == b"DICM" else raw


def associate(site: Site, contexts: list[tuple[str, str]]):
    ae = AE(ae_title="PYSCU")
    for abstract, syntax in contexts:
        ae.add_requested_context(abstract, syntax)
    assoc = ae.associate("127.0.0.1", site.dicom_port, ae_title=site.ae_title)
    assert assoc.is_established
    return assoc


def stop_node(site: Site, sig: int = signal.SIGTERM) -> None:
    """Stop the node and wait until nothing listens on its port any more.

    ``Site.stop`` waits for the parent only; its other node processes may hold
    the port a moment longer, and a restart must not be mistaken for ready
    because a dying process still accepted the test's probe.
    """
    site.stop("dicom", sig)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", site.dicom_port), timeout=0.5).close()
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError(f"port {site.dicom_port} still open after the node stopped")


def status_of(result) -> tuple[int, str]:
    return int(result.Status), str(result.get("ErrorComment", ""))


# -- whole series with storescu -----------------------------------------------------------
@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> list[Path]:
    """50 slices of 512×512 16-bit CT, generated once for the module."""
    _, _, paths = write_series(tmp_path_factory.mktemp("ct"), 50, rows=512, cols=512)
    return paths


def test_ct_series_in_one_association_is_stored_byte_for_byte(dicom_site, dcmtk, ct_series):
    proc = storescu(dcmtk, dicom_site, ct_series)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out.decode()
    assert len(indexed(dicom_site)) == 50
    assert_stored_as_sent(dicom_site, ct_series)
    conn = dicom_site.db()
    study = conn.execute("SELECT * FROM studies").fetchone()
    series = conn.execute("SELECT * FROM series").fetchone()
    conn.close()
    assert (study["num_instances"], study["num_series"], study["modalities"]) == (50, 1, "CT")
    assert study["size_bytes"] == sum(r["size"] for r in indexed(dicom_site).values())
    assert (study["patient_name"], study["accession_number"]) == ("DOE^JANE", "ACC001")
    assert series["num_instances"] == 50 and series["body_part"] == "HEAD"
    assert study["calling_ae"] == "MODALITY"
    # The File Meta the node writes itself: read back by pydicom and by dcmtk's dcmdump.
    stored = dicom_site.data_dir / "studies" / next(iter(indexed(dicom_site).values()))["path"]
    meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
    assert meta.SourceApplicationEntityTitle == "MODALITY"
    assert meta.ImplementationClassUID and meta.FileMetaInformationVersion == b"\x00\x01"
    dump = subprocess.run([dcmtk["dcmdump"], "-q", str(stored)], capture_output=True, text=True)
    assert dump.returncode == 0 and not dump.stderr, dump.stderr


def test_ct_series_from_four_parallel_storescu(dicom_site, dcmtk, ct_series):
    procs = [storescu(dcmtk, dicom_site, ct_series[i::4]) for i in range(4)]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out.decode()
    assert len(indexed(dicom_site)) == 50
    assert_stored_as_sent(dicom_site, ct_series)
    conn = dicom_site.db()
    assert conn.execute("SELECT num_instances FROM studies").fetchone()[0] == 50
    assert conn.execute("SELECT num_instances FROM series").fetchone()[0] == 50
    conn.close()
    assert not list((dicom_site.data_dir / "studies").rglob("*.part"))


def test_mr_and_cr_are_stored(dicom_site, dcmtk, tmp_path):
    _, _, mr = write_series(tmp_path / "mr", 3, modality="MR", rows=128, cols=128)
    _, _, cr = write_series(tmp_path / "cr", 1, modality="CR", rows=256, cols=256,
                            patient_id="PAT002")
    proc = storescu(dcmtk, dicom_site, mr + cr)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert_stored_as_sent(dicom_site, mr + cr)
    conn = dicom_site.db()
    mods = sorted(r[0] for r in conn.execute("SELECT modalities FROM studies"))
    classes = {r[0] for r in conn.execute("SELECT sop_class_uid FROM instances")}
    conn.close()
    assert mods == ["CR", "MR"]
    assert classes == {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.1"}


# -- compressed transfer syntaxes -----------------------------------------------------------
# (transfer syntax, pydicom's bundled sample, or (sample to take the codestream from, why)).
SYNTAX_SAMPLES = [
    ("1.2.840.10008.1.2.1.99", "image_dfl.dcm"),  # Deflated Explicit VR LE
    ("1.2.840.10008.1.2.5", "MR_small_RLE.dcm"),  # RLE Lossless
    ("1.2.840.10008.1.2.4.50", "SC_rgb_jpeg_dcmtk.dcm"),  # JPEG Baseline
    ("1.2.840.10008.1.2.4.51", "JPGExtended.dcm"),  # JPEG Extended
    # No Process 14 sample is bundled; an SV1 stream is a Process 14 stream (selection value 1).
    ("1.2.840.10008.1.2.4.57", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG Lossless P14
    ("1.2.840.10008.1.2.4.70", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG Lossless P14 SV1
    ("1.2.840.10008.1.2.4.80", "MR_small_jpeg_ls_lossless.dcm"),  # JPEG-LS lossless
    ("1.2.840.10008.1.2.4.81", "JPEGLSNearLossless_16.dcm"),  # JPEG-LS near-lossless
    ("1.2.840.10008.1.2.4.90", "MR_small_jp2klossless.dcm"),  # JPEG 2000 lossless
    ("1.2.840.10008.1.2.4.91", "JPEG2000.dcm"),  # JPEG 2000
    # No HTJ2K sample is bundled and no HTJ2K encoder is installed: a JPEG 2000 codestream
    # encapsulated under the HTJ2K syntaxes.  The node stores as received and never decodes,
    # so what is tested is that it accepts and keeps these syntaxes byte for byte.
    ("1.2.840.10008.1.2.4.201", "MR_small_jp2klossless.dcm"),  # HTJ2K lossless
    ("1.2.840.10008.1.2.4.202", "MR_small_jp2klossless.dcm"),  # HTJ2K lossless RPCL
    ("1.2.840.10008.1.2.4.203", "JPEG2000.dcm"),  # HTJ2K
]


def sample_in_syntax(tmp_path: Path, syntax: str, name: str) -> Path:
    """A bundled sample with a fresh SOP UID, labelled with ``syntax``."""
    source = get_testdata_file(name)
    assert source, f"pydicom sample {name} is not bundled"
    ds = pydicom.dcmread(source)
    # pydicom's MR_small_* samples share one SOP Instance UID (they would replace each
    # other), so each gets a fresh one; the JPEG-LS near-lossless samples carry no
    # Study/Series UID: add them.  The pixel data is left as bundled.
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / f"{syntax}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_one_sample_per_compressed_syntax_is_stored_as_received(dicom_site, tmp_path):
    files = [sample_in_syntax(tmp_path, syntax, name) for syntax, name in SYNTAX_SAMPLES]
    contexts = []
    for path, (syntax, _) in zip(files, SYNTAX_SAMPLES, strict=True):
        contexts.append((str(pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID), syntax))
    assoc = associate(dicom_site, contexts)
    try:
        for (abstract, syntax), path in zip(contexts, files, strict=True):
            accepted = [cx for cx in assoc.accepted_contexts
                        if cx.abstract_syntax == abstract and cx.transfer_syntax[0] == syntax]
            assert accepted, f"{syntax} not accepted"
            assert status_of(assoc.send_c_store(path)) == (0, ""), syntax
    finally:
        assoc.release()
    assert_stored_as_sent(dicom_site, files)
    syntaxes = {r["transfer_syntax"] for r in indexed(dicom_site).values()}
    assert syntaxes == {syntax for syntax, _ in SYNTAX_SAMPLES}


# -- associations, duplicates, versions -----------------------------------------------------
def test_eight_concurrent_associations_are_accepted(dicom_site, tmp_path):
    _, _, paths = write_series(tmp_path, 8, rows=32, cols=32)
    assocs = [associate(dicom_site, [(CTImageStorage, EXPLICIT_LE)]) for _ in range(8)]
    try:
        assert all(a.is_established for a in assocs)  # all eight open at the same time
        for assoc, path in zip(assocs, paths, strict=True):
            assert status_of(assoc.send_c_store(path))[0] == 0
    finally:
        for assoc in assocs:
            assoc.release()
    assert len(indexed(dicom_site)) == 8


def test_same_instance_again_identical_is_success_and_stored_once(dicom_site, tmp_path):
    _, _, (path,) = write_series(tmp_path, 1, rows=32, cols=32)
    assoc = associate(dicom_site, [(CTImageStorage, EXPLICIT_LE)])
    try:
        assert status_of(assoc.send_c_store(path))[0] == 0
        assert status_of(assoc.send_c_store(path))[0] == 0
    finally:
        assoc.release()
    assert len(indexed(dicom_site)) == 1
    assert len([p for p in stored_files(dicom_site) if ".incoming" not in p.parts]) == 1
    conn = dicom_site.db()
    assert conn.execute("SELECT num_instances FROM studies").fetchone()[0] == 1
    assert conn.execute("SELECT COUNT(*) FROM instance_versions").fetchone()[0] == 0
    conn.close()


def test_same_instance_with_different_bytes_keeps_both_serves_newer_audits(dicom_site, tmp_path):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    older = tmp_path / "older.dcm"
    newer = tmp_path / "newer.dcm"
    make_instance(study, series, 0, rows=32, cols=32, seed=1, sop_uid=sop).save_as(
        older, enforce_file_format=True)
    make_instance(study, series, 0, rows=32, cols=32, seed=2, sop_uid=sop).save_as(
        newer, enforce_file_format=True)
    assoc = associate(dicom_site, [(CTImageStorage, EXPLICIT_LE)])
    try:
        assert status_of(assoc.send_c_store(older))[0] == 0
        assert status_of(assoc.send_c_store(newer))[0] == 0
    finally:
        assoc.release()
    row = indexed(dicom_site)[sop]
    served = (dicom_site.data_dir / "studies" / row["path"]).read_bytes()
    assert dataset_bytes(served) == dataset_bytes(newer.read_bytes())
    conn = dicom_site.db()
    version = conn.execute("SELECT * FROM instance_versions WHERE sop_uid = ?", (sop,)).fetchone()
    audit = conn.execute("SELECT * FROM audit WHERE action = 'instance.replaced'").fetchall()
    counts = conn.execute("SELECT num_instances, size_bytes FROM studies").fetchone()
    conn.close()
    kept = (dicom_site.data_dir / "studies" / version["path"]).read_bytes()
    assert dataset_bytes(kept) == dataset_bytes(older.read_bytes())
    assert len(audit) == 1 and audit[0]["object"] == sop
    assert counts["num_instances"] == 1 and counts["size_bytes"] == row["size"]
    from appliance.core import audit as audit_mod

    conn = dicom_site.db()
    assert audit_mod.verify(conn)
    conn.close()


# -- bad input --------------------------------------------------------------------------------
def bad_inputs(tmp_path: Path) -> list[tuple[str, Path]]:
    study, series = generate_uid(), generate_uid()
    out = []
    out.append(("unparseable bytes", part10(tmp_path / "garbage.dcm", os.urandom(4000))))
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        ds = make_instance(study, series, 0, rows=16, cols=16)
        sop = ds.SOPInstanceUID
        delattr(ds, keyword)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((f"no {keyword}", part10(tmp_path / f"no-{keyword}.dcm",
                                            dataset_bytes(buf.getvalue()), sop_uid=sop)))
    for name in ("no_meta.dcm", "badVR.dcm", "MR_truncated.dcm"):
        out.append((name, part10(tmp_path / name, file_body(name))))
    return out


def test_malformed_datasets_fail_with_a_comment_and_the_association_goes_on(dicom_site, tmp_path):
    _, _, (good,) = write_series(tmp_path / "good", 1, rows=16, cols=16)
    assoc = associate(dicom_site, [(CTImageStorage, EXPLICIT_LE)])
    try:
        for label, path in bad_inputs(tmp_path):
            code, comment = status_of(assoc.send_c_store(path))
            assert 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF, (label, hex(code))
            assert comment, f"{label}: no Error Comment"
            assert assoc.is_established, label
        assert status_of(assoc.send_c_store(good)) == (0, "")
    finally:
        assoc.release()
    assert list(indexed(dicom_site)) == [str(pydicom.dcmread(good).SOPInstanceUID)]
    files = [p for p in stored_files(dicom_site) if ".incoming" not in p.parts]
    assert len(files) == 1 and not list((dicom_site.data_dir / "studies").rglob("*.part"))


def test_error_comments_say_what_is_wrong(dicom_site, tmp_path):
    assoc = associate(dicom_site, [(CTImageStorage, EXPLICIT_LE)])
    try:
        comments = {label: status_of(assoc.send_c_store(path))
                    for label, path in bad_inputs(tmp_path)}
    finally:
        assoc.release()
    assert comments["no StudyInstanceUID"] == (0xA900, "missing StudyInstanceUID")
    assert comments["no SOPInstanceUID"] == (0xA900, "missing SOPInstanceUID")
    assert "truncated" in comments["MR_truncated.dcm"][1]
    assert "NumberOfFrames" in comments["badVR.dcm"][1]


# -- low disk ---------------------------------------------------------------------------------
def set_low_water(site: Site, mb: int) -> None:
    cfg = site.data_dir / "appliance.yaml"
    text = cfg.read_text()
    assert "low_water_mb: 0" in text
    cfg.write_text(text.replace("low_water_mb: 0", f"low_water_mb: {mb}"))


def test_below_low_water_mark_refuses_before_writing_and_keeps_what_is_stored(site, tmp_path):
    _, _, paths = write_series(tmp_path, 3, rows=64, cols=64)
    site.start_dicom()
    assoc = associate(site, [(CTImageStorage, EXPLICIT_LE)])
    assert status_of(assoc.send_c_store(paths[0]))[0] == 0
    assoc.release()
    stop_node(site)
    before = {p: p.read_bytes() for p in stored_files(site)}
    set_low_water(site, 10_000_000)  # ~10 TB: above any free space here
    site.start_dicom()
    assoc = associate(site, [(CTImageStorage, EXPLICIT_LE)])
    try:
        code, comment = status_of(assoc.send_c_store(paths[1]))
    finally:
        assoc.release()
    assert code == 0xA700 and "low-water" in comment
    assert {p: p.read_bytes() for p in stored_files(site)} == before  # not even a temp file
    assert_stored_as_sent(site, paths[:1])
    assert len(indexed(site)) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 5 MiB tmpfs (needs root): the site's whole data directory lives on it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        missing(f"cannot mount a tmpfs (root needed): {result.stderr.strip()}")
    site = make_site(mount)
    yield site
    site.stop_all()
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_answers_out_of_resources_and_keeps_what_is_stored(small_disk, tmp_path):
    site = small_disk
    _, _, paths = write_series(tmp_path, 60, rows=256, cols=256)  # 128 KiB each, 7.7 MB in all
    site.start_dicom()
    assoc = associate(site, [(CTImageStorage, EXPLICIT_LE)])
    ok, refused = [], []
    try:
        for path in paths:
            code, comment = status_of(assoc.send_c_store(path))
            if code == 0:
                assert not refused, "a store succeeded after the disk was full"
                ok.append(path)
            else:
                assert code == 0xA700, (hex(code), comment)
                refused.append(path)
                if len(refused) >= 3:
                    break
    finally:
        assoc.release()
    assert ok and refused
    assert_stored_as_sent(site, ok)
    assert set(indexed(site)) == {str(pydicom.dcmread(p).SOPInstanceUID) for p in ok}
    assert not list((site.data_dir / "studies").rglob("*.part"))
    files = [p for p in stored_files(site) if ".incoming" not in p.parts]
    assert len(files) == len(ok)


# -- start-up recovery ------------------------------------------------------------------------
def test_start_removes_temp_files_and_indexes_unindexed_files(dicom_site, tmp_path):
    site = dicom_site
    _, _, paths = write_series(tmp_path, 2, rows=32, cols=32)
    assoc = associate(site, [(CTImageStorage, EXPLICIT_LE)])
    assert status_of(assoc.send_c_store(paths[0]))[0] == 0
    assoc.release()
    stop_node(site)
    studies = site.data_dir / "studies"
    stored = studies / indexed(site)[str(pydicom.dcmread(paths[0]).SOPInstanceUID)]["path"]
    # What a crash leaves: temp files, and a file renamed into place whose row never committed.
    leftovers = [studies / ".incoming" / ".4242.7f.0.part", stored.parent / ".x.dcm.1.2.part"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    orphan_sop = str(pydicom.dcmread(paths[1]).SOPInstanceUID)
    orphan = stored.parent / f"{orphan_sop}.dcm"
    shutil.copy(paths[1], orphan)
    site.start_dicom()
    assert not any(p.exists() for p in leftovers)
    row = indexed(site).get(orphan_sop)
    assert row and (studies / row["path"]) == orphan
    conn = site.db()
    assert conn.execute("SELECT num_instances FROM studies").fetchone()[0] == 2
    # …with its DICOMweb metadata written by the recovery, so no reader's request reads the file.
    made = conn.execute("SELECT m.sha256 FROM dicomweb_metadata m WHERE m.sop_uid = ?",
                        (orphan_sop,)).fetchone()
    assert made and made[0] == row["sha256"]
    recovered = conn.execute("SELECT detail FROM audit WHERE action = 'store.recovered'").fetchone()
    conn.close()
    assert recovered and '"reindexed":1' in recovered[0] and '"temp_files_removed":2' in recovered[0]


# -- the index values read without pydicom's conversion ---------------------------------------
def edge_cases() -> list:
    """Headers whose values take each branch of the plain readers."""
    from pydicom.dataset import Dataset as Ds

    out = []
    for number, name, charset in [("1.0", "DOE^JANE", None), ("+5", "  PADDED^NAME  ", None),
                                  ("", "M\xfcller^J\xfcrgen", "ISO_IR 100"),
                                  ("7\\8", "A^B\\C^D", None), ("x1", "\u5c71\u7530", "ISO_IR 192")]:
        ds = make_instance(generate_uid(), generate_uid(), 0, rows=8, cols=8)
        if charset:
            ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.SeriesNumber = number if number != "x1" else None
        ds.StudyDescription = "TRAILING NULL\0"
        out.append(ds)
    implicit = make_instance(generate_uid(), generate_uid(), 0, rows=8, cols=8)
    implicit.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    out.append(implicit)
    out.append(Ds())
    return out


def test_index_values_read_plainly_equal_pydicoms(tmp_path):
    """Every generated series, pydicom's bundled files and odd values: same index either way."""
    from pydicom.data.data_manager import DATA_ROOT

    from dicom_node import index as idx
    from dicom_node import study_store as ss

    sources = [pydicom.dcmread(p) for p in write_series(tmp_path / "ct", 2)[2]]
    sources += [pydicom.dcmread(p) for p in write_series(tmp_path / "mr", 1, modality="MR")[2]]
    sources += edge_cases()
    compared = 0
    bundled = sorted(str(p) for p in (Path(DATA_ROOT) / "test_files").rglob("*") if p.is_file())
    for ds in sources + bundled:  # pydicom's own files, read locally (nothing downloaded)
        buf = io.BytesIO()
        try:
            if isinstance(ds, str):
                buf.write(Path(ds).read_bytes())
            else:
                ds.save_as(buf, enforce_file_format=bool(getattr(ds, "file_meta", None)))
            raw = buf.getvalue()
            expected = idx.attributes(pydicom.dcmread(io.BytesIO(raw), force=True))
        except Exception:
            continue  # a file pydicom cannot read either: the store refuses it the same way
        plain = pydicom.dcmread(io.BytesIO(raw), force=True)
        assert idx.attributes(plain, text=ss.plain_text, integer=ss.plain_int) == expected, ds
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            converted = ss._uid(pydicom.dcmread(io.BytesIO(raw), force=True), keyword)
            assert ss.plain_uid(plain, keyword) == converted
        compared += 1
    assert compared > 80


def test_instances_waiting_together_commit_as_one_group(tmp_path) -> None:
    """Group commit: what queued while another writer held the turn shares one transaction."""
    import io as _io
    import threading as _threading

    from dicom_data import make_instance as _make
    from pydicom.uid import generate_uid as _uid

    from appliance.core import db as _db
    from dicom_node.study_store import StudyStore as _Store

    _db.open_db(tmp_path / "appliance.db").close()
    commits: list[str] = []

    def connect(path):
        conn = _db.connect(path)
        conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
        return conn

    store = _Store(tmp_path / "studies", tmp_path / "appliance.db", connect=connect)
    st, se = _uid(), _uid()
    blobs = []
    for i in range(4):
        buf = _io.BytesIO()
        _make(st, se, i).save_as(buf, enforce_file_format=True)
        blobs.append(buf.getvalue())
    results: list = []
    with store._write_mutex:  # another writer's turn: all four queue behind it
        threads = [_threading.Thread(target=lambda b=b: results.append(store.store(b, "T")))
                   for b in blobs]
        for t in threads:
            t.start()
        while len(store._group) < 4:
            _threading.Event().wait(0.01)
        assert results == []  # nobody is answered before the commit
    for t in threads:
        t.join()
    assert sorted(r.outcome for r in results) == ["ok"] * 4
    assert commits == ["COMMIT"]  # one transaction (and one directory fsync) for the group
    conn = _db.connect(tmp_path / "appliance.db")
    paths = [r[0] for r in conn.execute("SELECT path FROM instances")]
    assert len(paths) == 4 and all((tmp_path / "studies" / p).is_file() for p in paths)
