"""HTJ2K frames over WADO-RS: pixel-exact on every modality, byte ranges, the derived cache.

A running site (DICOM node + ``appliance web``) receives phantoms with dcmtk
``storescu``: a signed and an unsigned head CT, MR, CR and an RGB ultrasound.
Every HTJ2K frame served is decoded by OpenJPEG (pydicom's plugin, not the
encoder's own library) and compared with the stored pixels.
"""

from __future__ import annotations

import subprocess
import time
from email import message_from_bytes
from pathlib import Path

import numpy as np
import phantoms
import pydicom
import pytest
import requests
from conftest import make_site, require_tool
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_modality_lut
from pydicom.uid import generate_uid

from appliance.accounts import tokens
from appliance.accounts import users as accounts
from appliance.core import config
from appliance.dicomweb import htj2k, htj2k_cache

RPCL, PLAIN = htj2k.HTJ2K_RPCL, htj2k.HTJ2K_LOSSLESS


class Site:
    """One site with DICOM and web running and the phantom studies pushed."""

    def __init__(self, base: Path):
        storescu = require_tool("storescu")
        require_tool(htj2k.TOOL)
        self.site = make_site(base)
        self.site.start_dicom()
        self.site.start("web", wait_port=self.site.web_port)
        self.url = f"https://localhost:{self.site.web_port}/dicom-web"
        self.study, self.series = generate_uid(), generate_uid()
        self.stat_study, stat_series = generate_uid(), generate_uid()
        made = {
            "ct_signed": phantoms.ct(self.study, self.series, 0),
            "ct_unsigned": phantoms.ct(self.study, self.series, 1, signed=False),
            "mr": phantoms.mr(self.study, generate_uid()),
            "cr": phantoms.cr(self.study, generate_uid()),
            "us": phantoms.us(self.study, generate_uid()),
            "stat_ct": phantoms.ct(self.stat_study, stat_series, 0, size=128),
        }
        self.paths = {k: phantoms.write(ds, base / "in", k) for k, ds in made.items()}
        subprocess.run([storescu, "-aec", self.site.ae_title, "localhost",
                        str(self.site.dicom_port), *map(str, self.paths.values())],
                       check=True, capture_output=True, timeout=120)
        conn = self.site.db()
        accounts.add_user(conn, "reader", "radiologist", "reader-password-1")
        self.token = tokens.create_token(conn, "reader")
        conn.close()
        self.cfg = config.load(self.site.data_dir)

    def session(self) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.site.data_dir / "tls" / "ca.crt")
        s.headers["Authorization"] = f"Bearer {self.token}"
        return s

    def frame_url(self, name: str) -> str:
        ds = pydicom.dcmread(self.paths[name], stop_before_pixels=True)
        return (f"{self.url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
                f"/instances/{ds.SOPInstanceUID}/frames/1")


@pytest.fixture(scope="module")
def hs(tmp_path_factory: pytest.TempPathFactory):
    s = Site(tmp_path_factory.mktemp("htj2k"))
    yield s
    s.site.stop_all()


def _one_part(r: requests.Response) -> tuple[str, bytes]:
    """(part Content-Type, body) of a one-part multipart/related answer."""
    msg = message_from_bytes(b"Content-Type: " + r.headers["Content-Type"].encode() + b"\r\n\r\n"
                             + r.content)
    parts = msg.get_payload()
    assert len(parts) == 1
    return parts[0]["Content-Type"], parts[0].get_payload(decode=True)


def _decoded(path: Path, codestream: bytes, ts: str) -> np.ndarray:
    """The codestream decoded by OpenJPEG inside the original header (Bits Stored, sign)."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([codestream])
    return ds.pixel_array


@pytest.mark.parametrize("ts", [RPCL, PLAIN])
def test_htj2k_frames_decode_to_the_stored_pixels(hs: Site, ts: str) -> None:
    s = hs.session()
    for name in ("ct_signed", "ct_unsigned", "mr", "cr", "us"):
        r = s.get(hs.frame_url(name), headers={
            "Accept": f'multipart/related; type="image/jphc"; transfer-syntax={ts}'})
        assert r.status_code == 200, (name, r.text)
        part_type, body = _one_part(r)
        assert part_type == f"image/jphc; transfer-syntax={ts}"
        assert body[:2] == b"\xff\x4f" and len(body) < len(pydicom.dcmread(hs.paths[name]).PixelData)
        stored = pydicom.dcmread(hs.paths[name])
        got = _decoded(hs.paths[name], body, ts)
        assert got.dtype == stored.pixel_array.dtype, name
        assert np.array_equal(got, stored.pixel_array), name
        if name.startswith("ct"):  # Rescale still applies to what was served: HU unchanged
            hu = apply_modality_lut(got, stored)
            assert np.array_equal(hu, apply_modality_lut(stored.pixel_array, stored))
            assert hu.min() < -900 and hu.max() > 1000  # air and skull, negative values kept


def test_accept_query_parameter_asks_for_htj2k_over_the_loaders_header(hs: Site) -> None:
    """cornerstone's loader always sends ``transfer-syntax=*``; the viewer adds ``accept=``."""
    s = hs.session()
    star = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    stored = s.get(hs.frame_url("ct_signed"), headers={"Accept": star})
    assert f"transfer-syntax={pydicom.uid.ExplicitVRLittleEndian}" in _one_part(stored)[0]
    wanted = f"multipart/related; type=application/octet-stream; transfer-syntax={RPCL}"
    r = s.get(hs.frame_url("ct_signed"), params={"accept": wanted}, headers={"Accept": star})
    part_type, body = _one_part(r)
    assert part_type == f"application/octet-stream; transfer-syntax={RPCL}"
    assert np.array_equal(_decoded(hs.paths["ct_signed"], body, RPCL),
                          pydicom.dcmread(hs.paths["ct_signed"]).pixel_array)


def test_byte_ranges_return_the_right_slices_of_the_codestream(hs: Site, tmp_path: Path) -> None:
    s = hs.session()
    accept = {"Accept": f'multipart/related; type="image/jphc"; transfer-syntax={RPCL}'}
    full = s.get(hs.frame_url("ct_signed"), headers=accept)
    assert full.status_code == 200 and full.headers["Accept-Ranges"] == "bytes"
    body, total = full.content, len(full.content)
    first = s.get(hs.frame_url("ct_signed"), headers={**accept, "Range": "bytes=0-16383"})
    assert first.status_code == 206
    assert first.headers["Content-Range"] == f"bytes 0-16383/{total}"
    assert first.content == body[:16384]
    assert first.headers["Content-Type"] == full.headers["Content-Type"]  # same boundary
    rest = s.get(hs.frame_url("ct_signed"), headers={**accept, "Range": "bytes=16384-"})
    assert rest.status_code == 206 and first.content + rest.content == body
    tail = s.get(hs.frame_url("ct_signed"), headers={**accept, "Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == body[-100:]
    beyond = s.get(hs.frame_url("ct_signed"), headers={**accept, "Range": f"bytes={total}-"})
    assert beyond.status_code == 416 and beyond.headers["Content-Range"] == f"bytes */{total}"
    # The first 1/16 of an RPCL codestream is a whole preview at 1/4 resolution (what the
    # viewer's first pass shows): decoded here by OpenJPH, which reads truncated streams.
    r = s.get(hs.frame_url("ct_unsigned"), headers={**accept, "Range": f"bytes=0-{total // 16}"})
    _, head = _one_part_partial(r)
    stored = pydicom.dcmread(hs.paths["ct_unsigned"]).pixel_array.astype(float)
    preview = _ojph_preview(head, tmp_path, skip=2, shape=(128, 128))
    quarter = stored.reshape(128, 4, 128, 4).mean(axis=(1, 3))
    assert np.abs(preview - quarter).mean() < 60  # the same head, smaller (air vs skull: 3000)


def _one_part_partial(r: requests.Response) -> tuple[str, bytes]:
    """(part Content-Type, bytes so far) of the first bytes of a one-part multipart body."""
    head, _, body = r.content.partition(b"\r\n\r\n")
    ctype = [h for h in head.decode().split("\r\n") if h.lower().startswith("content-type:")]
    return ctype[0].split(":", 1)[1].strip(), body


def _ojph_preview(codestream: bytes, tmp: Path, skip: int, shape: tuple[int, int]) -> np.ndarray:
    src, out = tmp / "head.j2c", tmp / "preview.raw"
    src.write_bytes(codestream)
    subprocess.run(["ojph_expand", "-i", str(src), "-o", str(out), "-skip_res", str(skip),
                    "-resilient", "true"], check=True, capture_output=True, timeout=30)
    return np.fromfile(out, dtype="<u2").reshape(shape).astype(float)


def test_worker_sweep_caches_stat_first_prunes_by_size_and_rebuilds(hs: Site) -> None:
    conn = hs.site.db()
    now = time.time()
    conn.execute(  # the STAT study is in the read queue as STAT (the reading sweep's job)
        "INSERT INTO read_items (study_uid, priority, priority_rank, sla_minutes,"
        " first_received, due_at, created_at, updated_at, pool, pool_roles)"
        " VALUES (?, 'stat', 0, 30, ?, ?, ?, ?, 'neuro', 'radiologist')",
        (hs.stat_study, now, now + 1800, now, now))
    order = [r["study_uid"] for r in htj2k_cache.pending(conn)]
    assert order[0] == hs.stat_study and hs.study in order
    assert htj2k_cache.sweep(hs.cfg, budget_s=0.0) == 1  # one instance per run at least
    done = conn.execute("SELECT study_uid, frames, bytes FROM htj2k_cache").fetchall()
    assert [(d["study_uid"], d["frames"]) for d in done] == [(hs.stat_study, 1)]
    while htj2k_cache.pending(conn):
        htj2k_cache.sweep(hs.cfg)
    rows = conn.execute("SELECT sop_uid, frames, bytes, error FROM htj2k_cache").fetchall()
    assert len(rows) == 6 and all(r["frames"] == 1 and r["bytes"] > 0 and not r["error"]
                                  for r in rows)
    cached = htj2k_cache.root(hs.cfg)
    on_disk = sorted(p.stat().st_size for p in cached.rglob("*.j2c"))
    assert sum(on_disk) == htj2k_cache.cached_bytes(conn)
    # A cached frame is what the request serves: overwrite one, the answer follows the cache.
    ds = pydicom.dcmread(hs.paths["mr"], stop_before_pixels=True)
    row = conn.execute("SELECT sha256 FROM instances WHERE sop_uid = ?",
                       (ds.SOPInstanceUID,)).fetchone()
    frame_file = htj2k_cache.instance_dir(hs.cfg, hs.study, ds.SOPInstanceUID,
                                          row["sha256"]) / "1.j2c"
    assert frame_file.is_file()
    accept = {"Accept": f'multipart/related; type="image/jphc"; transfer-syntax={RPCL}'}
    original = frame_file.read_bytes()
    marked = original[:-2] + b"\x00\x00\xff\xd9"
    frame_file.write_bytes(marked)
    assert _one_part(hs.session().get(hs.frame_url("mr"), headers=accept))[1] == marked
    frame_file.write_bytes(original[: len(original) // 2])  # torn (no EOC): made again
    assert _one_part(hs.session().get(hs.frame_url("mr"), headers=accept))[1] == original
    # Pruned by size: the oldest study goes first, its rows stay (not re-encoded by the sweep).
    stat_dir = cached / hs.stat_study
    import os

    os.utime(stat_dir, (now - 3600, now - 3600))
    total = htj2k_cache.cached_bytes(conn)
    assert htj2k_cache.prune(conn, hs.cfg, total - 1) == 1
    assert not stat_dir.exists() and (cached / hs.study).is_dir()
    assert htj2k_cache.pending(conn) == []
    # A pruned frame is encoded on demand and still exact.
    s = hs.session()
    r = s.get(hs.frame_url("stat_ct"), headers={
        "Accept": f'multipart/related; type="image/jphc"; transfer-syntax={RPCL}'})
    assert np.array_equal(_decoded(hs.paths["stat_ct"], _one_part(r)[1], RPCL),
                          pydicom.dcmread(hs.paths["stat_ct"]).pixel_array)
    assert stat_dir.is_dir()
    # After a restore the box has the studies but no cache rows: the sweep rebuilds.
    import shutil

    shutil.rmtree(cached)
    conn.execute("DELETE FROM htj2k_cache")
    assert len(htj2k_cache.pending(conn)) == 6
    while htj2k_cache.pending(conn):
        htj2k_cache.sweep(hs.cfg)
    assert sorted(p.stat().st_size for p in cached.rglob("*.j2c")) == on_disk
    conn.close()


def test_frames_that_cannot_be_coded_get_a_clear_406(hs: Site) -> None:
    s = hs.session()
    r = s.get(hs.frame_url("ct_signed"), headers={
        "Accept": 'multipart/related; type="image/jphc"; transfer-syntax=1.2.840.10008.1.2.4.203'})
    assert r.status_code == 406 and "cannot transcode" in r.json()["error"]
    assert RPCL in r.json()["error"]  # the error lists what is available
