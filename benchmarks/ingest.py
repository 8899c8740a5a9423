"""Ingest benchmark: our DICOM node against Debian's Orthanc, in the same run.

Pushes a generated CT series (300 × 512×512 16-bit, ~0.5 MB each) with dcmtk
``storescu`` in one association and in 4 parallel ones, as shipped (Nagle left
on in DCMTK) and with ``TCP_NODELAY=1`` in the environment of storescu and of
Orthanc.  Each push goes to a freshly started, empty server (so no push is
answered as a duplicate), and each is repeated; medians are printed with the
ratio ours/Orthanc.  C-STORE latency p50/p99 is measured with a pynetdicom SCU
that times each ``send_c_store`` on one association (storescu prints no
timestamps); study-level C-FIND latency is the wall time of one ``findscu``
process, median of ≥10, against a store holding the CT plus 200 small studies.

Run: ``make bench`` or ``.venv/bin/python benchmarks/ingest.py [--runs 3]``.
The machine may be shared: figures are noisy, compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, this folder is sys.path[0]: drop it so a sibling benchmark's module
# name (it was queue.py) cannot shadow the standard library's.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT / "tests"))

from dicom_data import write_series  # noqa: E402  (test-data generator shared with the tests)

ORTHANC = "/usr/sbin/Orthanc"
CALLING_AE = "BENCH"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- the two servers ------------------------------------------------------------------
@dataclass
class Server:
    """One running, empty SCP; ``count()`` says how many instances it holds."""

    name: str
    aet: str
    port: int
    proc: subprocess.Popen
    count: Callable[[], int]
    workdir: Path

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def cpu_seconds(self) -> float:
        """User + system CPU so far of the server and its child processes (from /proc)."""
        return sum(_cpu_of(pid) for pid in [self.proc.pid, *_children(self.proc.pid)])


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()  # fields after the command name


def _cpu_of(pid: int) -> float:
    try:
        fields = _stat_fields(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == pid:
                    out.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return out


def start_ours(base: Path, env: dict[str, str], processes: int | None) -> Server:
    """``appliance init`` + ``appliance dicom`` on free ports, with a query AE for findscu."""
    work = Path(tempfile.mkdtemp(dir=base, prefix="ours-"))
    data = work / "site"
    port = free_port()
    appliance = [sys.executable, "-m", "appliance"]
    subprocess.run([*appliance, "init", "--data-dir", str(data), "--dicom-port", str(port),
                    "--web-port", str(free_port())], check=True, capture_output=True)
    if processes:
        cfg = data / "appliance.yaml"
        text = cfg.read_text()
        if "processes:" in text:
            cfg.write_text(_set_yaml_int(text, "processes", processes))
    subprocess.run([*appliance, "ae", "add", CALLING_AE, "--query", "--data-dir", str(data)],
                   check=True, capture_output=True)
    log = open(work / "dicom.out", "wb")
    proc = subprocess.Popen([*appliance, "dicom", "--data-dir", str(data)], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_for_port(port, proc)

    def count() -> int:
        import sqlite3

        with sqlite3.connect(data / "appliance.db") as conn:
            return conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]

    return Server("ours", "FIELDAPP", port, proc, count, work)


def _set_yaml_int(text: str, key: str, value: int) -> str:
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip().startswith(f"{key}:"):
            indent = line[: len(line) - len(line.lstrip())]
            lines[i] = f"{indent}{key}: {value}\n"
    return "".join(lines)


def start_orthanc(base: Path, env: dict[str, str]) -> Server:
    """Debian's Orthanc on loopback with its own temp storage, no auth, any called AET."""
    work = Path(tempfile.mkdtemp(dir=base, prefix="orthanc-"))
    port, http = free_port(), free_port()
    conf = {
        "Name": "bench", "StorageDirectory": str(work / "storage"),
        "IndexDirectory": str(work / "index"), "DicomAet": "ORTHANC", "DicomPort": port,
        "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True, "Plugins": [], "StorageCompression": False,
        "SaveJobs": False,
    }
    (work / "orthanc.json").write_text(json.dumps(conf))
    log = open(work / "orthanc.out", "wb")
    proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_for_port(http, proc)
    wait_for_port(port, proc)

    def count() -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/statistics", timeout=10) as r:
            return json.load(r)["CountInstances"]

    return Server("orthanc", "ORTHANC", port, proc, count, work)


# -- measurements ---------------------------------------------------------------------
def push_storescu(server: Server, files: list[Path], parallel: int, env: dict[str, str]) -> float:
    """Seconds to push ``files`` with ``parallel`` storescu processes (one association each)."""
    chunks = [files[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", CALLING_AE, "-aec", server.aet, "127.0.0.1",
                               str(server.port), *map(str, chunk)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
             for chunk in chunks]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - started
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {server.name} failed: {err.decode()[-500:]}")
    stored = server.count()
    if stored != len(files):
        raise RuntimeError(f"{server.name} holds {stored} instances after pushing {len(files)}")
    return elapsed


def store_latencies(server: Server, files: list[Path]) -> list[float]:
    """Per-instance C-STORE round trip (seconds) with a pynetdicom SCU on one association."""
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import CTImageStorage

    _config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes, no re-encoding
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")

    def nodelay(event) -> None:  # pynetdicom leaves Nagle on; the SCU must not be the limit
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    assoc = ae.associate("127.0.0.1", server.port, ae_title=server.aet,
                         evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)])
    if not assoc.is_established:
        raise RuntimeError(f"association to {server.name} failed")
    out = []
    try:
        for path in files:
            t0 = time.perf_counter()
            status = assoc.send_c_store(path)
            out.append(time.perf_counter() - t0)
            if getattr(status, "Status", None) != 0:
                raise RuntimeError(f"C-STORE to {server.name} failed: {status}")
    finally:
        assoc.release()
    return out


def find_latencies(server: Server, repeats: int, env: dict[str, str]) -> list[float]:
    """Wall time of a study-level ``findscu`` (all studies, common return keys)."""
    cmd = ["findscu", "-S", "-aet", CALLING_AE, "-aec", server.aet, "127.0.0.1", str(server.port),
           "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "PatientName",
           "-k", "PatientID", "-k", "StudyDate", "-k", "AccessionNumber",
           "-k", "StudyDescription", "-k", "ModalitiesInStudy"]
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, env=env)
        out.append(time.perf_counter() - t0)
        if r.returncode != 0 or b"Failed" in r.stderr:
            raise RuntimeError(f"findscu on {server.name} failed: {r.stderr.decode()[-300:]}")
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


# -- the run ----------------------------------------------------------------------------
@dataclass
class Figures:
    """Medians per (server, case)."""

    rates: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu_ms: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # per instance

    def add(self, server: str, case: str, value: float) -> None:
        self.rates.setdefault((server, case), []).append(value)

    def add_cpu(self, server: str, case: str, ms_per_instance: float) -> None:
        self.cpu_ms.setdefault((server, case), []).append(ms_per_instance)

    def median(self, server: str, case: str) -> float | None:
        values = self.rates.get((server, case))
        return statistics.median(values) if values else None


def environments(nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def run_pushes(args, base: Path, files: list[Path], mb: float, figs: Figures,
               servers: list[str]) -> None:
    for nodelay in (False, True):
        env = environments(nodelay)
        mode = "TCP_NODELAY=1" if nodelay else "as shipped"
        for parallel in (1, 4):
            case = f"{mode}, {parallel} assoc"
            for run in range(args.runs):
                for name in servers:
                    server = start_server(name, base, env, args.processes)
                    try:
                        cpu = server.cpu_seconds()
                        secs = push_storescu(server, files, parallel, env)
                        cpu = server.cpu_seconds() - cpu
                    finally:
                        server.close()
                    figs.add(name, case, len(files) / secs)
                    figs.add_cpu(name, case, cpu * 1e3 / len(files))
                    print(f"  {case:<28} run {run + 1} {name:<8} {len(files) / secs:7.1f} inst/s"
                          f"  {mb / secs:6.1f} MB/s", flush=True)


def start_server(name: str, base: Path, env: dict[str, str], processes: int | None) -> Server:
    return start_ours(base, env, processes) if name == "ours" else start_orthanc(base, env)


def run_latency_and_find(args, base: Path, files: list[Path], small: list[Path],
                         servers: list[str]) -> dict[str, dict[str, float]]:
    env = environments(True)
    out: dict[str, dict[str, float]] = {}
    for name in servers:
        server = start_server(name, base, env, args.processes)
        try:
            lat = store_latencies(server, files)
            push_storescu_extra(server, small, env)
            finds = find_latencies(server, args.finds, env) if name != "ours" or \
                has_query_service() else []
        finally:
            server.close()
        out[name] = {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                     "find": statistics.median(finds) if finds else float("nan")}
    return out


def push_storescu_extra(server: Server, files: list[Path], env: dict[str, str]) -> None:
    r = subprocess.run(["storescu", "-aet", CALLING_AE, "-aec", server.aet, "127.0.0.1",
                        str(server.port), *map(str, files)], capture_output=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"storescu (small studies) failed: {r.stderr.decode()[-300:]}")


def has_query_service() -> bool:
    return (ROOT / "dicom_node" / "retrieve.py").exists()


def ratio(ours: float | None, theirs: float | None) -> str:
    if not ours or not theirs or theirs != theirs or ours != ours:
        return "   n/a"
    return f"{ours / theirs:6.2f}×"


def report(figs: Figures, lat: dict[str, dict[str, float]], mb_per_inst: float) -> None:
    print("\nMedians (instances/s, MB/s); ratio = ours / Orthanc, same run:")
    cases = sorted({case for _, case in figs.rates}, key=lambda c: (c.startswith("TCP"), c))
    for case in cases:
        o, t = figs.median("ours", case), figs.median("orthanc", case)
        print(f"  {case:<28} ours {_fmt(o, mb_per_inst)}  orthanc {_fmt(t, mb_per_inst)}"
              f"  ratio {ratio(o, t)}")
    print("\nServer CPU per instance (user + system, all its processes; ms), medians:")
    for case in cases:
        o, t = (statistics.median(figs.cpu_ms.get((n, case)) or [float("nan")])
                for n in ("ours", "orthanc"))
        print(f"  {case:<28} ours {o:5.2f}  orthanc {t:5.2f}  ratio {ratio(o, t)}")
    print("\nC-STORE latency, pynetdicom SCU, one association, TCP_NODELAY on both sides (ms):")
    for name, v in lat.items():
        print(f"  {name:<8} p50 {v['p50'] * 1e3:6.1f}  p99 {v['p99'] * 1e3:6.1f}")
    if "ours" in lat and "orthanc" in lat:
        print(f"  ratio p50 {ratio(lat['ours']['p50'], lat['orthanc']['p50'])}"
              f"  p99 {ratio(lat['ours']['p99'], lat['orthanc']['p99'])}")
        print("\nStudy-level C-FIND, findscu wall time incl. process start, median (ms):")
        print(f"  ours {lat['ours']['find'] * 1e3:6.1f}  orthanc {lat['orthanc']['find'] * 1e3:6.1f}"
              f"  ratio {ratio(lat['ours']['find'], lat['orthanc']['find'])}")
    _targets(figs, lat)


def _fmt(rate: float | None, mb_per_inst: float) -> str:
    return "    n/a" if rate is None else f"{rate:7.1f} ({rate * mb_per_inst:5.1f} MB/s)"


def _targets(figs: Figures, lat: dict[str, dict[str, float]]) -> None:
    print("\nTargets (issue 2):")
    for par in (1, 4):
        o = figs.median("ours", f"TCP_NODELAY=1, {par} assoc")
        t = figs.median("orthanc", f"TCP_NODELAY=1, {par} assoc")
        if o and t:
            print(f"  TCP_NODELAY=1, {par} assoc: ours ≥ 0.8× Orthanc: {o / t:.2f}× "
                  f"{'PASS' if o / t >= 0.8 else 'FAIL'}")
        o = figs.median("ours", f"as shipped, {par} assoc")
        t = figs.median("orthanc", f"as shipped, {par} assoc")
        if o and t:
            print(f"  Nagle on in sender, {par} assoc: ours ≥ 4× Orthanc as shipped: {o / t:.2f}× "
                  f"{'PASS' if o / t >= 4 else 'FAIL'}")
    if "ours" in lat and "orthanc" in lat and lat["ours"]["find"] == lat["ours"]["find"]:
        ok = lat["ours"]["find"] <= lat["orthanc"]["find"]
        print(f"  study C-FIND no slower than Orthanc: {'PASS' if ok else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=300, help="instances in the CT (default 300)")
    p.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    p.add_argument("--runs", type=int, default=3, help="repeats of each push (default 3)")
    p.add_argument("--finds", type=int, default=11, help="findscu repeats (default 11)")
    p.add_argument("--processes", type=int, default=None,
                   help="set dicom.processes for our node (default: as configured)")
    p.add_argument("--only", choices=("ours", "orthanc"), help="benchmark one server only")
    args = p.parse_args(argv)
    for tool in ("storescu", "findscu"):
        if not shutil.which(tool):
            print(f"error: {tool} missing (apt-get install dcmtk)", file=sys.stderr)
            return 1
    servers = ["ours", "orthanc"] if os.path.exists(ORTHANC) else ["ours"]
    if args.only:
        servers = [args.only]
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        base = Path(tmp)
        _, _, files = write_series(base / "ct", args.count, rows=args.size, cols=args.size)
        small = [write_series(base / f"small{i}", 1, rows=16, cols=16, patient_id=f"P{i:04d}")[2][0]
                 for i in range(200)]
        total_mb = sum(f.stat().st_size for f in files) / 1e6
        print(f"{args.count} CT instances, {total_mb:.1f} MB; servers: {', '.join(servers)}; "
              f"{os.cpu_count()} CPUs (shared: figures are noisy, compare ratios)", flush=True)
        figs = Figures()
        run_pushes(args, base, files, total_mb, figs, servers)
        lat = run_latency_and_find(args, base, files, small, servers)
        report(figs, lat, total_mb / args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
