"""DICOMweb benchmark: our ``appliance web`` against Debian's Orthanc + orthanc-dicomweb, same run.

Measures, printing medians and the ratio ours/Orthanc where Orthanc is installed:

1. QIDO study search p50/p95 with 1,000 studies / 300,000 instances in the
   index (rows written straight into the index tables: QIDO never opens a
   file), for the queries OHIF and a PACS user make; target p95 < 100 ms.
   Orthanc is compared on the same small store both hold (the CT study).
2. Series ``/metadata`` of a 300-slice CT (512×512, 16-bit): ours on the first
   request of the series (the JSON was written at ingest) and warm, Orthanc (it reads every
   file each time; ~240 ms in FIELD-NOTES); target under 100 ms.
3. Frames throughput (MB/s of pixel data delivered) for the whole series with
   4 parallel clients, with and without ``Accept-Encoding: gzip``.
4. A thin link: a pacing proxy (5 Mbit/s each way, 150 ms one way = 300 ms
   round trip; this kernel has no netem) in front of each server. OHIF's
   order: study search, series search, series metadata, then frame 1 (time
   to first image), then every other frame over 6 keep-alive connections
   (time to full series). Bytes on the wire vs raw pixel bytes are printed.
5. OHIF in Chromium through the same thin link: navigation to the first image on
   screen with an empty browser cache, then with the viewer cached, each time a
   different copy of the CT (the same study again would come from the browser's
   cache); ``--waterfall`` prints each load's requests (ours only; FIELD-NOTES has
   the Orthanc figures).

6. ``--thin``: progressive loading over two link profiles (5 Mbit/s with 300 ms
   round trip, 384 kbit/s with 700 ms), head CT phantom of tests/phantoms.py.
   Ours: OHIF's first image (stored frame, gzip), then what our viewer config
   asks for: the first 16 KB of every frame's HTJ2K RPCL codestream (every 4th
   slice, then the rest: the whole stack scrollable at preview quality), then
   the rest of every codestream (full quality). "ours today" and Orthanc: every
   frame whole with gzip (their preview is the full series). Medians of
   ``--thin-runs``; at 384 kbit/s the full-quality pass is skipped unless
   ``--thin-slow-full`` (it takes tens of minutes).

Run: ``.venv/bin/python benchmarks/dicomweb.py [--thin-frames 300] [--runs 30]
[--parts qido,metadata,frames,thin,browser,replaced] [--waterfall]`` (``--parts metadata``:
the metadata figure alone; ``replaced``: the first ``/metadata`` after the series was
replaced without the ingest hook and the worker's sweep ran), or
``benchmarks/dicomweb.py --thin [--thin-frames 100] [--thin-runs 3]``.
The machine is shared: compare ratios from one run, not figures across runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ruff: noqa: E402  (the path fix below must run before the imports)
# a benchmark named like a standard module (it was queue.py) would shadow it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

import numpy as np
import requests
import urllib3

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from dicom_data import make_instance  # noqa: E402  (the tests' data generator)
from pydicom.uid import generate_uid  # noqa: E402

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
OHIF_FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
urllib3.disable_warnings()


# -- plumbing ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60, **kw) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            requests.get(url, timeout=2, verify=False, **kw)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(v: float) -> str:
    return f"{v * 1000:7.1f} ms"


def ratio(ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs:
        return "   n/a"
    return f"{ours / theirs:6.2f}×"


# -- data ------------------------------------------------------------------------------------
def write_ct(out: Path, slices: int, size: int) -> tuple[str, str, list[Path]]:
    """A CT head phantom with scanner-like noise (so compression ratios are not flattering)."""
    out.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    y, x = np.mgrid[-size // 2:size // 2, -size // 2:size // 2]
    r = (x / (size * 0.40)) ** 2 + (y / (size * 0.46)) ** 2
    base = np.where(r < 1, 1024 + 35.0, 24.0)
    base[(r >= 0.85) & (r < 1)] = 1024 + 1200
    rng = np.random.default_rng(7)
    paths = []
    for i in range(slices):
        ds = make_instance(study, series, i, rows=size, cols=size, patient_id="BENCH-CT",
                           patient_name="BENCH^CT", study_description="CT HEAD BENCH")
        img = base + np.where(r < 1, rng.normal(0, 6, (size, size)), 0)
        ds.PixelData = np.clip(img, 0, 4095).astype(np.uint16).tobytes()
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return study, series, paths


def write_head_ct(out: Path, slices: int, size: int) -> tuple[str, str, list[Path]]:
    """The tests' head CT phantom (skull, brain, ventricles, ~5 HU noise), unsigned 12 bits."""
    import phantoms

    study, series = generate_uid(), generate_uid()
    paths = [phantoms.write(phantoms.ct(study, series, i, signed=False, size=size,
                                        patient_id="BENCH-CT"), out, f"ct{i:04d}")
             for i in range(slices)]
    return study, series, paths


def fill_index(db_path: Path, studies: int, per_study: int) -> None:
    """1,000 studies × 300 instances of index rows (3 series each), written in one transaction."""
    from appliance.core import db

    conn = db.connect(db_path)
    now = time.time()
    rng = np.random.default_rng(1)
    conn.execute("BEGIN IMMEDIATE")
    for s in range(studies):
        st = f"1.2.826.0.1.3680043.10.1.{s}"
        date = f"2024{1 + s % 12:02d}{1 + s % 28:02d}"
        conn.execute(
            "INSERT INTO studies (study_uid, patient_id, patient_name, patient_birth_date,"
            " patient_sex, study_date, study_time, accession_number, study_description,"
            " institution_name, modalities, num_series, num_instances, size_bytes,"
            " first_received, last_received) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (st, f"PID{s % 700:05d}", f"{rng.choice(['DOE', 'SMITH', 'NGUYEN', 'GARCIA'])}^P{s}",
             "19600101", "F", date, "101500", f"ACC{s:06d}", "CT HEAD", "Field Hospital", "CT",
             3, per_study, per_study * 525_000, now, now))
        for k in range(3):
            se = f"{st}.{k}"
            n = per_study // 3
            conn.execute("INSERT INTO series (series_uid, study_uid, modality, series_number,"
                          " series_description, num_instances) VALUES (?,?,?,?,?,?)",
                          (se, st, "CT", k + 1, "AXIAL", n))
            conn.executemany(
                "INSERT INTO instances (sop_uid, series_uid, study_uid, sop_class_uid,"
                " instance_number, transfer_syntax, rows, columns, path, size, sha256,"
                " received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(f"{se}.{i}", se, st, "1.2.840.10008.5.1.4.1.1.2", i + 1, "1.2.840.10008.1.2.1",
                  512, 512, f"x/{se}.{i}.dcm", 525_000, "0" * 64, now) for i in range(n)])
    conn.execute("COMMIT")
    conn.close()


# -- servers ---------------------------------------------------------------------------------
@dataclass
class Target:
    name: str
    base: str  # .../dicom-web
    session_kw: dict
    proc: subprocess.Popen | None = None
    cert: Path | None = None

    def session(self, retries: int = 0) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = False
        if retries:  # a server may close an idle keep-alive connection while a request flies
            adapter = requests.adapters.HTTPAdapter(max_retries=urllib3.Retry(
                total=retries, allowed_methods=None, backoff_factor=0))
            s.mount("http://", adapter)
            s.mount("https://", adapter)
        for k, v in self.session_kw.get("headers", {}).items():
            s.headers[k] = v
        return s


def copies(paths: list[Path], count: int) -> list[tuple[str, list[bytes]]]:
    """``count`` more studies with the CT's pixels under new UIDs (other patients' scans).

    The browser step opens a different study each time, as a reader does: the
    same study again would be answered from the browser's cache.
    """
    import io

    import pydicom

    out = []
    for k in range(count):
        study, series, blobs = generate_uid(), generate_uid(), []
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.PatientID = f"BENCH-CT-{k + 2}"
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            blobs.append(buf.getvalue())
        out.append((study, blobs))
    return out


def start_ours(work: Path, paths: list[Path], big_index: bool,
               extra: list[tuple[str, list[bytes]]] = (), htj2k_too: bool = False) -> Target:
    from appliance.accounts import tokens
    from appliance.accounts import users as accounts
    from appliance.core import db
    from dicom_node.study_store import StudyStore

    data = work / "site"
    web_port = free_port()
    subprocess.run([sys.executable, "-m", "appliance", "init", "--data-dir", str(data),
                    "--dicom-port", str(free_port()), "--web-port", str(web_port),
                    "--site-name", "Bench"], check=True, capture_output=True)
    cfg = data / "appliance.yaml"
    cfg.write_text(cfg.read_text().replace("low_water_mb: 500", "low_water_mb: 0")
                   .replace("totp_required_for_readers: true",
                            "totp_required_for_readers: false"))
    conn = db.open_db(data / "appliance.db")
    accounts.add_user(conn, "bench", "radiologist", "bench-password-1")
    token = tokens.create_token(conn, "bench")
    conn.close()
    from appliance.dicomweb import metadata as dicomweb_metadata

    # The node's store: DICOM JSON written at ingest, in each instance's index transaction.
    store = StudyStore(data / "studies", data / "appliance.db", connect=db.connect,
                       derive=dicomweb_metadata.at_ingest)
    for p in paths:  # the same durable path as C-STORE and STOW-RS
        assert store.store(p.read_bytes(), calling_ae="BENCH").success
    for _, blobs in extra:
        for b in blobs:
            assert store.store(b, calling_ae="BENCH").success
    print("  metadata written at ingest by the store (no worker sweep run, no request before)")
    if htj2k_too:
        from appliance.core import config
        from appliance.dicomweb import htj2k_cache

        site_cfg = config.load(data)
        t, swept = time.monotonic(), 0
        while n := htj2k_cache.sweep(site_cfg):
            swept += n
        took = time.monotonic() - t
        print(f"  HTJ2K of {swept} instances encoded by the sweep in {took:.1f} s"
              f" ({swept / max(took, 1e-9):.0f} frames/s, ojph_compress)")
    if big_index:  # index rows only (no files): QIDO never opens a file
        t = time.monotonic()
        fill_index(data / "appliance.db", 1000, 300)
        print(f"  index: 1,000 studies / 300,000 instances written in {time.monotonic() - t:.1f} s")
    proc = subprocess.Popen([sys.executable, "-m", "appliance", "web", "--data-dir", str(data)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = Target("ours", f"https://localhost:{web_port}/dicom-web",
                    {"headers": {"Authorization": f"Bearer {token}"}}, proc,
                    data / "tls" / "server.crt")
    wait_http(f"https://localhost:{web_port}/livez", proc)
    return target


def start_orthanc(work: Path, paths: list[Path]) -> Target | None:
    if not (os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN)):
        print("  Orthanc or orthanc-dicomweb not installed: no comparison")
        return None
    port = free_port()
    conf = {"Name": "bench", "StorageDirectory": str(work / "o-storage"),
            "IndexDirectory": str(work / "o-index"), "HttpPort": port, "DicomPort": free_port(),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (work / "orthanc.json").write_text(json.dumps(conf))
    proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TCP_NODELAY": "1"})
    wait_http(f"http://127.0.0.1:{port}/system", proc)
    s = requests.Session()
    for p in paths:
        s.post(f"http://127.0.0.1:{port}/instances", data=p.read_bytes()).raise_for_status()
    return Target("Orthanc", f"http://127.0.0.1:{port}/dicom-web", {}, proc)


# -- measurements ----------------------------------------------------------------------------
def timed(session: requests.Session, url: str, runs: int, **kw) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        r = session.get(url, **kw)
        r.raise_for_status()
        _ = r.content
        out.append(time.perf_counter() - t)
    return out


def bench_qido(ours: Target, runs: int) -> None:
    s = ours.session()
    queries = {
        "OHIF study list (limit 101, includefield)":
            "/studies?limit=101&offset=0&fuzzymatching=false&includefield=00081030,00080060",
        "by PatientID": "/studies?PatientID=PID00042",
        "priors by tag 00100020": "/studies?00100020=PID00123&includefield=all",
        "PatientName wildcard": "/studies?PatientName=SMITH*&limit=100",
        "StudyDate range": "/studies?StudyDate=20240301-20240331&limit=100",
        "series of a study": "/studies/1.2.826.0.1.3680043.10.1.500/series",
    }
    print(f"\nQIDO with 1,000 studies / 300,000 instances ({runs} runs each, HTTPS keep-alive)")
    allv: list[float] = []
    for label, q in queries.items():
        v = timed(s, ours.base + q, runs)
        allv += v
        print(f"  {label:44s} p50 {ms(pct(v, 50))}  p95 {ms(pct(v, 95))}")
    print(f"  {'all QIDO queries':44s} p50 {ms(pct(allv, 50))}  p95 {ms(pct(allv, 95))}"
          f"   (target p95 < 100 ms)")


def bench_small_qido_and_metadata(targets: list[Target], study: str, series: str,
                                  runs: int) -> None:
    print(f"\nSeries /metadata of the 300-slice CT and QIDO on the CT store ({runs} runs)")
    res: dict[str, dict[str, float]] = {}
    for t in targets:
        s = t.session()
        url = f"{t.base}/studies/{study}/series/{series}/metadata"
        timed(s, f"{t.base}/studies?PatientID=BENCH-CT", 1)  # connection + TLS, not the series
        cold = timed(s, url, 1)[0]  # ours: first request, written at ingest; Orthanc: its read
        warm = timed(s, url, runs)
        qido = timed(s, f"{t.base}/studies?PatientID=BENCH-CT", runs)
        res[t.name] = {"cold": cold, "warm": statistics.median(warm), "p95": pct(warm, 95),
                       "qido": statistics.median(qido)}
        print(f"  {t.name:8s} metadata first {ms(cold)}  p50 {ms(res[t.name]['warm'])}"
              f"  p95 {ms(res[t.name]['p95'])}   QIDO p50 {ms(res[t.name]['qido'])}")
    if "Orthanc" in res:
        o, t = res["ours"], res["Orthanc"]
        print(f"  ours/Orthanc: metadata p50 {ratio(o['warm'], t['warm'])}, first "
              f"{ratio(o['cold'], t['cold'])}, QIDO {ratio(o['qido'], t['qido'])}")


def bench_replaced_metadata(targets: list[Target], study: str, series: str, paths: list[Path],
                            runs: int) -> None:
    """The first ``/metadata`` after every instance of the series was replaced without the
    ingest hook (what identity reconciliation's corrected copies are), once the worker's
    sweep has run as it would within its interval: rows, or every file read by the request."""
    import io

    import pydicom

    from appliance.core import config, db
    from appliance.dicomweb import metadata as dicomweb_metadata
    from dicom_node.study_store import StudyStore

    ours = targets[0]
    data = ours.cert.parent.parent
    site_cfg = config.load(data)
    while dicomweb_metadata.sweep(site_cfg):  # the worker has long passed the CT's rowids
        pass
    store = StudyStore(data / "studies", data / "appliance.db", connect=db.connect)  # no hook
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.SeriesDescription = "CORRECTED"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert store.store(buf.getvalue(), calling_ae="BENCH").success
    store.close()
    t = time.monotonic()
    swept = 0
    while n := dicomweb_metadata.sweep(site_cfg):
        swept += n
    print(f"\nSeries replaced without the ingest hook ({len(paths)} corrected copies), then the"
          f" worker's sweep ({swept} rows looked at, {time.monotonic() - t:.2f} s)")
    s = ours.session()
    url = f"{ours.base}/studies/{study}/series/{series}/metadata"
    timed(s, f"{ours.base}/studies?PatientID=BENCH-CT", 1)
    t = time.perf_counter()
    r = s.get(url)
    r.raise_for_status()
    cold = time.perf_counter() - t
    assert {m["0008103E"]["Value"][0] for m in r.json()} == {"CORRECTED"}
    warm = timed(s, url, runs)
    print(f"  ours     metadata first {ms(cold)}  p50 {ms(statistics.median(warm))}"
          f"   (target first < 100 ms; the corrected header in every instance)")


def _frame_urls(t: Target, study: str, series: str, sops: list[str]) -> list[str]:
    return [f"{t.base}/studies/{study}/series/{series}/instances/{sop}/frames/1" for sop in sops]


def _fetch_all(t: Target, urls: list[str], clients: int, gzip_ok: bool,
               counter: list[int] | None = None, retries: int = 0) -> float:
    """Fetch every URL over ``clients`` keep-alive sessions; return the wall time."""
    local = threading.local()

    def get(url: str) -> int:
        if not hasattr(local, "s"):
            local.s = t.session(retries)
        r = local.s.get(url, headers={"Accept": OHIF_FRAME_ACCEPT,
                                      "Accept-Encoding": "gzip" if gzip_ok else "identity"})
        r.raise_for_status()
        return len(r.content)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        sizes = list(pool.map(get, urls))
    if counter is not None:
        counter.append(sum(sizes))
    return time.perf_counter() - start


def bench_frames(targets: list[Target], study: str, series: str, sops: list[str],
                 raw_bytes: int) -> None:
    print("\nFrames throughput, whole series, 4 parallel clients (each fetches every frame)")
    res: dict[tuple[str, bool], float] = {}
    for t in targets:
        urls = _frame_urls(t, study, series, sops)
        for gz in (False, True):
            _fetch_all(t, urls[:20], 4, gz)  # warm-up (connections, caches)
            wall = _fetch_all(t, urls * 4, 4, gz)
            res[(t.name, gz)] = 4 * raw_bytes / wall / 1e6
            print(f"  {t.name:8s} {'gzip' if gz else 'identity':8s} {res[(t.name, gz)]:8.1f} MB/s"
                  f" of pixels  ({wall:5.2f} s for {4 * len(urls)} frames)")
    if any(k[0] == "Orthanc" for k in res):
        for gz in (False, True):
            print(f"  ours/Orthanc {'gzip' if gz else 'identity'}: "
                  f"{ratio(res[('ours', gz)], res[('Orthanc', gz)])}")


# -- the thin link -------------------------------------------------------------------------------
class PacedLink:
    """A TCP relay that behaves like a thin link: a shared rate each way and a one-way delay.

    Each chunk is serialised onto its direction's link at ``rate_bps`` and
    delivered ``delay_s`` after it has left, in order. Bytes are counted.
    """

    WINDOW = 256 * 1024  # a receive window above this link's bandwidth-delay product

    def __init__(self, target_port: int, rate_bps: float, delay_s: float):
        self.target_port, self.rate, self.delay = target_port, rate_bps, delay_s
        self.port = free_port()
        self.bytes = {"down": 0, "up": 0}
        self._free_at = {"down": 0.0, "up": 0.0}
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.set_exception_handler(lambda _loop, _ctx: None)  # relays cut at shutdown
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._server = server
        self._ready.set()
        self.loop.run_forever()

    def reset(self) -> None:
        self.bytes = {"down": 0, "up": 0}

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pump(cr, sw, "up"), self._pump(sr, cw, "down"))

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: str) -> None:
        """Relay one direction; at most WINDOW bytes in flight per connection, like TCP's window,
        so a connection the client dropped does not keep the link busy."""
        loop = asyncio.get_running_loop()
        deliver = loop.time()
        in_flight = [0]
        drained = asyncio.Event()

        def arrive(data: bytes) -> None:
            _write(dst, data)
            in_flight[0] -= len(data)
            drained.set()

        while True:
            try:
                data = await src.read(16384)
            except ConnectionError:
                data = b""
            now = loop.time()
            if not data or dst.is_closing():
                loop.call_at(max(deliver, now) + 0.001, dst.close)  # after the last write
                return
            start = max(now, self._free_at[way])
            self._free_at[way] = start + len(data) * 8 / self.rate
            deliver = self._free_at[way] + self.delay
            self.bytes[way] += len(data)
            in_flight[0] += len(data)
            loop.call_at(deliver, arrive, data)
            while in_flight[0] > self.WINDOW:
                drained.clear()
                await drained.wait()

    def idle_in(self) -> float:
        """Seconds until both directions of the link have sent what they hold."""
        return max(0.0, max(self._free_at.values()) + self.delay - self.loop.time())

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop)


def _write(w: asyncio.StreamWriter, data: bytes) -> None:
    if not w.is_closing():
        w.write(data)


def bench_thin(targets: list[Target], study: str, series: str, sops: list[str], frames: int,
               frame_bytes: int, rate_mbit: float, rtt_ms: float) -> None:
    print(f"\nThin link: {rate_mbit:g} Mbit/s each way, {rtt_ms:g} ms round trip (pacing proxy);"
          f" OHIF's order; first image, then {frames} frames over 6 connections")
    res = {}
    for t in targets:
        port = int(t.base.split(":")[2].split("/")[0])
        link = PacedLink(port, rate_mbit * 1e6, rtt_ms / 2000)
        scheme = t.base.split(":")[0]
        base = f"{scheme}://localhost:{link.port}/dicom-web"
        thin = Target(t.name, base, t.session_kw)
        s = thin.session(retries=3)
        s.headers["Accept-Encoding"] = "gzip"
        start = time.perf_counter()
        s.get(f"{base}/studies?StudyInstanceUID={study}&includefield=all").raise_for_status()
        s.get(f"{base}/studies/{study}/series").raise_for_status()
        s.get(f"{base}/studies/{study}/series/{series}/metadata").raise_for_status()
        first = s.get(_frame_urls(thin, study, series, sops[:1])[0],
                      headers={"Accept": OHIF_FRAME_ACCEPT})
        first.raise_for_status()
        t_first = time.perf_counter() - start
        rest = _frame_urls(thin, study, series, sops[1:frames])
        _fetch_all(thin, rest, 6, True, retries=3)
        t_full = time.perf_counter() - start
        wire = link.bytes["down"]
        raw = frames * frame_bytes
        res[t.name] = (t_first, t_full)
        print(f"  {t.name:8s} first image {t_first:6.2f} s   {frames} frames {t_full:7.1f} s   "
              f"wire {wire / 1e6:6.1f} MB for {raw / 1e6:6.1f} MB of pixels "
              f"({wire / raw:4.0%})")
        link.close()
    if "Orthanc" in res:
        o, t = res["ours"], res["Orthanc"]
        print(f"  ours/Orthanc: first image {ratio(o[0], t[0])}, full series {ratio(o[1], t[1])}")


PREVIEW_BYTES = 16384  # what the viewer config's preview stage asks for (viewer-app-config.js)
HTJ2K_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.202"
PROFILES = ((5.0, 300.0), (0.384, 700.0))


def _ranges(t: Target, urls: list[str], rng: str, clients: int) -> None:
    """GET each URL's byte range ``rng`` of its HTJ2K frame, over ``clients`` connections."""
    def get(url: str) -> None:
        s = sessions.setdefault(threading.get_ident(), t.session(retries=3))
        r = s.get(url, params={"accept": HTJ2K_ACCEPT},
                  headers={"Accept": OHIF_FRAME_ACCEPT, "Range": rng})
        assert r.status_code in (200, 206), r.status_code
        _ = r.content

    sessions: dict[int, requests.Session] = {}
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(get, urls))


def _thin_once(t: Target, link: PacedLink, study: str, series: str, sops: list[str],
               progressive: bool, full: bool) -> dict[str, float]:
    """One opening over the link: first image, whole stack at preview, at full quality."""
    time.sleep(link.idle_in())
    link.reset()
    port_base = f"{t.base.split(':')[0]}://localhost:{link.port}/dicom-web"
    thin = Target(t.name, port_base, t.session_kw)
    s = thin.session(retries=3)
    s.headers["Accept-Encoding"] = "gzip"
    start = time.perf_counter()
    s.get(f"{port_base}/studies?StudyInstanceUID={study}&includefield=all").raise_for_status()
    s.get(f"{port_base}/studies/{study}/series").raise_for_status()
    s.get(f"{port_base}/studies/{study}/series/{series}/metadata").raise_for_status()
    middle = len(sops) // 2  # the CT head protocol opens at the middle slice
    first_url = _frame_urls(thin, study, series, [sops[middle]])[0]
    s.get(first_url, headers={"Accept": OHIF_FRAME_ACCEPT}).raise_for_status()
    out = {"first": time.perf_counter() - start}
    rest = [sop for i, sop in enumerate(sops) if i != middle]
    order = rest[::4] + [sop for i, sop in enumerate(rest) if i % 4]
    urls = _frame_urls(thin, study, series, order)
    if progressive:
        _ranges(thin, urls, f"bytes=0-{PREVIEW_BYTES - 1}", 6)
        out["preview"] = time.perf_counter() - start
        if full:
            _ranges(thin, urls, f"bytes={PREVIEW_BYTES}-", 6)
            out["full"] = time.perf_counter() - start
    elif full:
        _fetch_all(thin, urls, 6, True, retries=3)
        out["full"] = out["preview"] = time.perf_counter() - start
    out["wire_mb"] = link.bytes["down"] / 1e6
    return out


def bench_thin_progressive(targets: list[Target], study: str, series: str, sops: list[str],
                           frame_bytes: int, runs: int, slow_full: bool) -> None:
    """The issue's figures: medians of ``runs`` openings per link profile and server."""
    print(f"\nProgressive loading over thin links: {len(sops)} frames"
          f" ({len(sops) * frame_bytes / 1e6:.0f} MB of pixels), medians of {runs}")
    rows = [("ours", True), ("ours today", False)] + \
        [("Orthanc", False) for t in targets if t.name == "Orthanc"]
    by_name = {t.name: t for t in targets}
    for rate, rtt in PROFILES:
        full = rate >= 1 or slow_full
        print(f"  {rate * 1000:g} kbit/s, {rtt:g} ms round trip"
              + ("" if full else " (full-quality pass skipped: --thin-slow-full runs it)"))
        res = {}
        for name, progressive in rows:
            t = by_name["ours" if name.startswith("ours") else name]
            port = int(t.base.split(":")[2].split("/")[0])
            link = PacedLink(port, rate * 1e6, rtt / 2000)
            try:
                got = [_thin_once(t, link, study, series, sops, progressive, full)
                       for _ in range(runs)]
            finally:
                link.close()
            med = {k: statistics.median(g[k] for g in got) for k in got[0]}
            res[name] = med
            print(f"    {name:11s} first image {med['first']:6.2f} s   whole stack"
                  f" {'preview' if progressive else 'whole  '} "
                  f"{med.get('preview', float('nan')):7.1f} s   full quality"
                  f" {med.get('full', float('nan')):7.1f} s   wire {med['wire_mb']:6.1f} MB")
        ours = res["ours"]
        for peer in ("ours today", "Orthanc"):
            if peer in res:
                p = res[peer]
                print(f"    ours/{peer}: first image {ratio(ours['first'], p['first'])},"
                      f" stack scrollable {ratio(ours.get('preview'), p.get('preview'))},"
                      f" full quality {ratio(ours.get('full'), p.get('full'))},"
                      f" bytes {ratio(ours['wire_mb'], p['wire_mb'])}")


BROWSER_PASSWORD = "bench-password-1"


def _spki(cert_path: Path) -> str:
    """base64 SHA-256 of a certificate's public key (Chromium's SPKI pin format)."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    der = cert.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()
FIRST_IMAGE_JS = ("() => { const e = window.cornerstone && window.cornerstone.getRenderingEngines()[0];"
                  " const v = e && e.getViewports()[0];"
                  " return !!(v && v.getImageData && v.getImageData()); }")


WATERFALL_JS = """() => {
  const nav = performance.getEntriesByType('navigation')[0];
  const rows = [nav, ...performance.getEntriesByType('resource')];
  return rows.map(e => [e.name.includes('/dicom-web/')
                          ? e.name.replace(location.origin, '') + ' ' + e.initiatorType
                          : e.name.replace(location.origin, '').slice(0, 70),
                        e.startTime,
                        e.responseStart || e.startTime, e.responseEnd, e.transferSize || 0]);
}"""


def _print_waterfall(page) -> None:
    """Requests of the page load that used the network (start, first byte, end in ms, bytes)."""
    rows = sorted(page.evaluate(WATERFALL_JS), key=lambda r: r[1])
    cached = 0
    for name, start, first, end, size in rows:
        if size == 0 and "/dicom-web/" not in name:
            cached += 1
            continue
        print(f"      {start:7.0f} {first:7.0f} {end:7.0f} ms {size / 1e3:8.1f} kB  {name}")
    print(f"      (+ {cached} requests answered by the browser cache)")


def bench_browser(ours: Target, studies: list[str], rate_mbit: float, rtt_ms: float,
                  waterfall: bool = False) -> None:
    """Chromium + OHIF through the thin link: first image with an empty cache, then cached."""
    chromium = "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("\n  playwright not installed: no browser measurement")
        return
    from appliance.dicomweb import viewer

    if not (os.path.exists(chromium) and viewer.installed()):
        print("\n  chromium or the OHIF build missing: no browser measurement")
        return
    port = int(ours.base.split(":")[2].split("/")[0])
    link = PacedLink(port, rate_mbit * 1e6, rtt_ms / 2000)
    base = f"https://localhost:{link.port}"
    print(f"\nOHIF in Chromium over the thin link ({rate_mbit:g} Mbit/s, {rtt_ms:g} ms RTT):"
          " time from navigation to the first image on screen")
    args = ["--no-sandbox", "--disable-gpu", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
            "--disable-background-networking", "--no-first-run",
            # Trust the site's certificate like an installed CA would: Chromium keeps nothing
            # in its HTTP cache from a page with a certificate error.
            f"--ignore-certificate-errors-spki-list={_spki(ours.cert)}"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            ctx = browser.new_context(viewport={"width": 1400, "height": 900})
            page = ctx.new_page()
            page.goto(base + "/login")
            page.fill("input[name=username]", "bench")
            page.fill("input[name=password]", BROWSER_PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_load_state()
            # The third load also finds V8's code cache (kept from the second): less CPU to boot.
            labels = ("empty cache", "viewer cached", "cached again")
            for label, study in zip(labels, studies, strict=True):
                time.sleep(link.idle_in())  # let the link drain what the last page left
                page = ctx.new_page()
                if waterfall:
                    page.on("request", lambda r: "/dicom-web/" in r.url and print(
                        "      request", r.resource_type, r.url.rsplit("/", 3)[-3][-12:],
                        r.url.rsplit("/", 1)[-1][:40], r.headers.get("accept")))
                link.reset()
                t = time.perf_counter()
                page.goto(f"{base}/viewer?StudyInstanceUIDs={study}")
                page.wait_for_function(FIRST_IMAGE_JS, timeout=120_000, polling=50)
                took = time.perf_counter() - t
                boot = page.evaluate("() => performance.getEntriesByType('resource')"
                                     ".filter(e => e.name.includes('/dicom-web/')"
                                     " && e.initiatorType === 'xmlhttprequest')"
                                     ".map(e => e.startTime).reduce((a, b) => Math.min(a, b),"
                                     " 1e9) / 1000")
                print(f"  ours     {label:14s} first image {took:6.2f} s   (OHIF's first DICOMweb"
                      f" request at {boot:5.2f} s)  {link.bytes['down'] / 1e6:5.1f} MB down")
                if waterfall:
                    _print_waterfall(page)
                page.close()
        finally:
            browser.close()
            link.close()
    print("  (FIELD-NOTES, OHIF + Orthanc over the same kind of link: 14.6 s from an empty"
          " cache, 3.1 s with the viewer cached)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--thin-frames", type=int, default=300,
                    help="frames fetched over the thin link (all 300 take minutes at 5 Mbit/s)")
    ap.add_argument("--rate-mbit", type=float, default=5)
    ap.add_argument("--rtt-ms", type=float, default=300)
    ap.add_argument("--parts", default="qido,metadata,frames,thin,browser",
                    help="which measurements to run (comma-separated)")
    ap.add_argument("--waterfall", action="store_true",
                    help="print every request of each browser page load (start/first byte/end)")
    ap.add_argument("--thin", action="store_true",
                    help="progressive loading (HTJ2K byte ranges) over the two link profiles")
    ap.add_argument("--thin-runs", type=int, default=3)
    ap.add_argument("--thin-slow-full", action="store_true",
                    help="also the full-quality pass at 384 kbit/s (tens of minutes)")
    args = ap.parse_args()
    if args.thin:
        return main_thin(args)

    with tempfile.TemporaryDirectory(prefix="bench-dicomweb-") as tmp:
        work = Path(tmp)
        print(f"CT phantom: {args.slices} × {args.size}×{args.size} 16-bit")
        study, series, paths = write_ct(work / "ct", args.slices, args.size)
        import pydicom

        sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
        frame_bytes = args.size * args.size * 2
        targets = []
        try:
            parts = set(args.parts.split(","))
            extra = copies(paths, 2) if "browser" in parts else []
            targets.append(start_ours(work, paths, "qido" in parts, extra))
            orthanc = start_orthanc(work, paths) if parts & {"metadata", "frames", "thin"} \
                else None
            if orthanc:
                targets.append(orthanc)
            if "qido" in parts:
                bench_qido(targets[0], args.runs)
            if "metadata" in parts:
                bench_small_qido_and_metadata(targets, study, series, args.runs)
            if "frames" in parts:
                bench_frames(targets, study, series, sops, len(sops) * frame_bytes)
            if "thin" in parts:
                bench_thin(targets, study, series, sops, min(args.thin_frames, len(sops)),
                           frame_bytes, args.rate_mbit, args.rtt_ms)
            if "browser" in parts:
                bench_browser(targets[0], [study] + [uid for uid, _ in extra], args.rate_mbit,
                              args.rtt_ms, args.waterfall)
            if "replaced" in parts:  # last: it replaces the instances the others read as sent
                bench_replaced_metadata(targets, study, series, paths, args.runs)
        finally:
            for t in targets:
                if t.proc:
                    stop(t.proc)
    return 0


def main_thin(args: argparse.Namespace) -> int:
    """``--thin``: the head CT phantom on ours (HTJ2K cache made by the sweep) and Orthanc."""
    with tempfile.TemporaryDirectory(prefix="bench-dicomweb-thin-") as tmp:
        work = Path(tmp)
        slices = min(args.thin_frames, args.slices)
        print(f"Head CT phantom (tests/phantoms.py): {slices} × {args.size}×{args.size} 16-bit")
        study, series, paths = write_head_ct(work / "ct", slices, args.size)
        import pydicom

        sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths]
        targets = []
        try:
            targets.append(start_ours(work, paths, False, htj2k_too=True))
            orthanc = start_orthanc(work, paths)
            if orthanc:
                targets.append(orthanc)
            bench_thin_progressive(targets, study, series, sops, args.size * args.size * 2,
                                   args.thin_runs, args.thin_slow_full)
        finally:
            for t in targets:
                if t.proc:
                    stop(t.proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
