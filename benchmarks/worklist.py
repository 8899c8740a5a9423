"""Modality Worklist benchmark: our ``appliance dicom`` against dcmtk's ``wlmscpfs``, same run.

1. MWL C-FIND latency with 5,000 scheduled orders: the orders are registered through the
   desk (``appliance.patients.registry``) and the very same orders written as ``.wl`` files
   (pydicom) for ``wlmscpfs``, which reads its directory on every query.  The scanner's
   queries (modality + one day, station AE + one day, patient name wildcard, accession) are
   each sent ``--runs`` times with dcmtk ``findscu -W`` to both; medians and the ratio
   ours / wlmscpfs are printed (target ≤ 1.0×).  Both sides include findscu's start-up.
2. Reconciliation of one 300-instance study (a temporary identity linked to the real one):
   seconds and instances/s (header-only corrected versions, each fsynced, index updated).

Run: ``.venv/bin/python benchmarks/worklist.py [--orders 5000] [--runs 9] [--rows 256]``.
Not run by ``make test``; it prints figures and never fails on a slow machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

# ruff: noqa: E402  (the path fix below must run before the imports)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import argparse
import datetime as dt
import io
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, generate_uid

from appliance.core import config, db
from appliance.patients import orders as order_sql
from appliance.patients import reconciliation, registry
from appliance.setup import site
from dicom_node.study_store import StudyStore

FAMILIES = ["SMITH", "OKAFOR", "MENSAH", "DUPONT", "GARCIA", "NGUYEN", "KOWALSKI", "HASSAN",
            "IVANOV", "TANAKA", "SILVA", "MULLER", "ROSSI", "KHAN", "DIALLO", "BROWN"]
STATIONS = [("CT", "CT1"), ("CT", "CT2"), ("CR", "CR1"), ("CR", "CR2"), ("DX", "DX1"),
            ("US", "US1"), ("MR", "MR1"), ("CT", "CT3")]
PROCEDURE = {"CT": "CTHEAD", "CR": "CRCHEST", "DX": "DXLIMB", "US": "USFAST", "MR": "CTHEAD"}
DAY0 = dt.datetime(2026, 3, 1, 8, 0)
NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"port {port} never opened")


def register_orders(cfg: config.Config, count: int, rng: random.Random) -> None:
    desk = registry.Site.from_config(cfg)
    conn = db.open_db(cfg.db_path)
    with db.transaction(conn):  # one commit: the desk's own speed is not what is measured
        for i in range(count):
            p = registry.register(conn, desk, actor="bench", name=f"{rng.choice(FAMILIES)}^"
                                  f"P{i:05d}", birth="1970-01-01", sex_code=rng.choice("MF"))
            modality, station = rng.choice(STATIONS)
            when = DAY0 + dt.timedelta(days=rng.randrange(50), minutes=rng.randrange(600))
            registry.add_order(conn, desk, p["id"], actor="bench",
                               procedure=PROCEDURE[modality], modality=modality,
                               station_ae=station, reason="benchmark", scheduled=when)
    conn.close()


def write_wl_files(cfg: config.Config, folder: Path) -> int:
    """The same orders as .wl files, from the very rows our worklist answers with."""
    ae_dir = folder / "FIELDAPP"
    ae_dir.mkdir(parents=True)
    (ae_dir / "lockfile").write_text("")
    conn = db.connect(cfg.db_path)
    rows = conn.execute(order_sql.WORKLIST_SQL).fetchall()
    conn.close()
    for i, r in enumerate(rows):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID = r["patient_name"], r["patient_id"]
        ds.PatientBirthDate, ds.PatientSex = r["birth_date"], r["sex"]
        ds.AccessionNumber, ds.StudyInstanceUID = r["accession"], r["study_uid"]
        ds.RequestedProcedureID = r["requested_procedure_id"]
        ds.RequestedProcedureDescription = r["procedure_name"]
        ds.RequestedProcedurePriority = r["priority"]
        ds.ReasonForTheRequestedProcedure = r["reason"]
        ds.ReferringPhysicianName = ""
        ds.AdmissionID = ""
        sps = Dataset()
        sps.Modality, sps.ScheduledStationAETitle = r["modality"], r["station_ae"]
        sps.ScheduledProcedureStepStartDate = r["start_date"]
        sps.ScheduledProcedureStepStartTime = r["start_time"]
        sps.ScheduledProcedureStepDescription = r["procedure_name"]
        sps.ScheduledProcedureStepID = r["sps_id"]
        sps.ScheduledPerformingPhysicianName = ""
        sps.ScheduledProcedureStepStatus = r["sps_status"]
        ds.ScheduledProcedureStepSequence = Sequence([sps])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.31"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(ae_dir / f"order{i:05d}.wl", enforce_file_format=True)
    return len(rows)


QUERIES = {
    "modality CT + one day": ["-k", "(0040,0100)[0].Modality=CT",
                              "-k", "(0040,0100)[0].ScheduledProcedureStepStartDate=20260310"],
    "station CR1 + one day": ["-k", "(0040,0100)[0].ScheduledStationAETitle=CR1",
                              "-k", "(0040,0100)[0].ScheduledProcedureStepStartDate=20260310"],
    "patient name SMITH*": ["-k", "PatientName=SMITH*"],
    "accession": ["-k", "AccessionNumber={acc}"],
}
RETURN_KEYS = ["-k", "PatientName", "-k", "PatientID", "-k", "AccessionNumber",
               "-k", "StudyInstanceUID", "-k", "(0040,0100)[0].Modality",
               "-k", "(0040,0100)[0].ScheduledStationAETitle",
               "-k", "(0040,0100)[0].ScheduledProcedureStepStartDate",
               "-k", "(0040,0100)[0].ScheduledProcedureStepStartTime"]


def timed_find(port: int, keys: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    r = subprocess.run(["findscu", "-v", "-W", "-aet", "CT1", "-aec", "FIELDAPP", "127.0.0.1",
                        str(port), *RETURN_KEYS, *keys], capture_output=True, text=True,
                       env=NODELAY, timeout=120)
    took = time.perf_counter() - started
    return took, (r.stdout + r.stderr).count("(Pending)")


def latency(ports: dict[str, int], runs: int, accession: str) -> None:
    print(f"{'query':<24}{'matches':>8}{'ours ms':>10}{'wlmscpfs ms':>13}{'ratio':>8}")
    for name, keys in QUERIES.items():
        keys = [k.format(acc=accession) for k in keys]
        medians, counts = {}, {}
        for who, port in ports.items():
            times = []
            for _ in range(runs):
                took, n = timed_find(port, keys)
                times.append(took)
                counts[who] = n
            medians[who] = statistics.median(times) * 1000
        ratio = medians["ours"] / medians["wlmscpfs"] if "wlmscpfs" in medians else float("nan")
        same = "" if len(set(counts.values())) == 1 else f"  (matches differ: {counts})"
        print(f"{name:<24}{counts['ours']:>8}{medians['ours']:>10.1f}"
              f"{medians.get('wlmscpfs', float('nan')):>13.1f}{ratio:>7.2f}x{same}")


def reconciliation_figures(base: Path, instances: int, rows: int) -> None:
    from dicom_data import make_instance

    result = site.init_data_dir(base / "recon", site_name="Recon bench")
    cfg = config.load(result.data_dir)
    desk = registry.Site.from_config(cfg)
    conn = db.open_db(cfg.db_path)
    temp = registry.register_trauma(conn, desk, actor="bench")
    real = registry.register(conn, desk, actor="bench", name="REAL^PATIENT", patient_id="MRN-1")
    store = StudyStore(cfg.studies_dir, cfg.db_path, connect=db.connect)
    study, series = generate_uid(), generate_uid()
    for i in range(instances):
        ds = make_instance(study, series, i, rows=rows, cols=rows, patient_id=temp["patient_id"],
                           patient_name=temp["name"])
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        assert store.store(buf.getvalue()).success
    store.close()
    started = time.perf_counter()
    out = reconciliation.link(cfg, conn, temp["patient_id"], real["patient_id"], actor="bench",
                              reason="benchmark")
    took = time.perf_counter() - started
    conn.close()
    print(f"reconciliation of a {instances}-instance study ({rows}x{rows} 16-bit): "
          f"{took:.2f} s, {out['instances'] / took:.0f} instances/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--orders", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--instances", type=int, default=300)
    ap.add_argument("--rows", type=int, default=256)
    args = ap.parse_args()
    rng = random.Random(15)
    base = Path(tempfile.mkdtemp(prefix="bench-worklist-"))
    procs = []
    try:
        result = site.init_data_dir(base / "site", site_name="Worklist bench")
        port = free_port()
        cfg_path = result.data_dir / config.CONFIG_NAME
        cfg_path.write_text(cfg_path.read_text().replace("port: 11112", f"port: {port}")
                            .replace("processes: 2", "processes: 1"))
        config.edit_known_aes(result.data_dir, lambda items: items.append(
            {"name": "CT1", "worklist": True}))
        cfg = config.load(result.data_dir)
        started = time.perf_counter()
        register_orders(cfg, args.orders, rng)
        print(f"{args.orders} orders registered in {time.perf_counter() - started:.1f} s")
        written = write_wl_files(cfg, base / "wl")
        conn = db.connect(cfg.db_path)
        accession = conn.execute("SELECT accession FROM orders ORDER BY id DESC").fetchone()[0]
        conn.close()
        env = {**NODELAY, "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, "-m", "appliance", "dicom", "--data-dir",
                                       str(result.data_dir)], env=env, start_new_session=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ports = {"ours": port}
        if shutil.which("wlmscpfs"):
            wl_port = free_port()
            procs.append(subprocess.Popen(["wlmscpfs", "-dfp", str(base / "wl"), str(wl_port)],
                                          env=NODELAY, start_new_session=True,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports["wlmscpfs"] = wl_port
            wait_port(wl_port)
        else:
            print("wlmscpfs not installed (apt-get install dcmtk): ours only")
        wait_port(port)
        print(f"{written} worklist entries; findscu -W, median of {args.runs} runs each")
        latency(ports, args.runs, accession)
        reconciliation_figures(base, args.instances, args.rows)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
