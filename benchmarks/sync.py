"""Sync benchmark: bundle build + encrypt against plain ``tar | age``, and upload to S3.

1. A generated CT study (default 300 × 512×512 16-bit, ~157 MB) is stored through the
   real study store, then bundled by ``appliance.bundle.build`` (streaming tar, age v1
   via pyrage, SHA-256 of every file checked, Ed25519 signatures, fsync) and, as the
   baseline, by ``tar -cf - DIR | age -r KEY -o FILE`` (Debian's age) of the same files.
   Throughput in MB/s of study data, median of the runs; ratio ours / baseline.
2. The bundle is uploaded to a local S3 API (``moto_server`` on loopback) in 8 MiB
   parts, one part at a time and four in parallel; MB/s, median of the runs.

Run: ``.venv/bin/python benchmarks/sync.py [--slices 300] [--runs 3]``.
The machine may be shared: figures are noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import pyrage  # noqa: E402
from conftest import free_port, wait_for_port  # noqa: E402
from dicom_data import write_series  # noqa: E402

from appliance.core import config, db, identity  # noqa: E402
from appliance.setup import site  # noqa: E402
from appliance.sync import bundle as bnd  # noqa: E402
from appliance.sync import targets as st  # noqa: E402
from dicom_node.study_store import StudyStore  # noqa: E402


def _mb_s(nbytes: int, seconds: float) -> float:
    return nbytes / 1e6 / seconds


def prepare(work: Path, slices: int) -> tuple[config.Config, str, list[bnd.Entry], int]:
    site.init_data_dir(work / "site", site_name="Bench site", dicom_port=free_port(),
                       web_port=free_port())
    cfg = config.load(work / "site")
    study_uid, _, paths = write_series(work / "gen", slices, rows=512, cols=512)
    store = StudyStore(cfg.studies_dir, cfg.db_path, connect=db.connect)
    for p in paths:
        assert store.store(p.read_bytes(), "BENCH").success
    shutil.rmtree(work / "gen")
    conn = db.connect(cfg.db_path)
    rows = conn.execute("SELECT sop_uid, sha256, path, size FROM instances WHERE study_uid=?",
                        (study_uid,)).fetchall()
    conn.close()
    entries = [bnd.Entry(f"dicom/{r['path']}", r["sha256"], r["size"],
                         source=cfg.studies_dir / r["path"], meta={"sop_uid": r["sop_uid"]})
               for r in rows]
    return cfg, study_uid, entries, sum(r["size"] for r in rows)


def bench_build(cfg, study_uid, entries, total, pubs, runs, work):
    key = identity.load_signing_key(cfg.keys_dir)
    ours, base, durable = [], [], []
    out = work / "study.bundle"
    age = shutil.which("age")
    for i in range(runs):
        subprocess.run(["sync"], check=False)
        t = time.perf_counter()
        bnd.build(out, bnd.new_bundle_id("bench-site", i + 1), key, pubs, entries)
        ours.append(_mb_s(total, time.perf_counter() - t))
        if age:
            subprocess.run(["sync"], check=False)
            t = time.perf_counter()
            cmd = (f"tar -cf - -C {cfg.studies_dir} {study_uid} | age "
                   + " ".join(f"-r {p}" for p in pubs) + f" -o {work / 'plain.age'}")
            subprocess.run(["sh", "-c", cmd], check=True)
            base.append(_mb_s(total, time.perf_counter() - t))
            # The same with the output made durable, as ours is (fsync before "built").
            t = time.perf_counter()
            subprocess.run(["sh", "-c", f"{cmd} && sync {work / 'plain.age'}"], check=True)
            durable.append(_mb_s(total, time.perf_counter() - t))
    nan = float("nan")
    return (statistics.median(ours), statistics.median(base) if base else nan,
            statistics.median(durable) if durable else nan, out)


def bench_upload(path: Path, runs: int, work: Path) -> dict[int, float]:
    exe = Path(sys.executable).parent / "moto_server"
    port = free_port()
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(work / "moto.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_port(port, proc=proc)
        target = st.S3Target("bench", url=f"http://127.0.0.1:{port}",
                             credentials=("bench", "bench"), timeout_s=60)
        target.client.create_bucket(Bucket="bench")
        size = path.stat().st_size
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        out: dict[int, float] = {}
        for parallel in (1, 4):
            speeds = []
            for i in range(runs):
                job = st.UploadJob(key=f"p{parallel}-{i}.bundle", path=path, size=size,
                                   sha256=sha, upload_id=None, part_size=8 << 20,
                                   parallel=parallel)
                t = time.perf_counter()
                assert target.upload(job) == st.DONE
                speeds.append(_mb_s(size, time.perf_counter() - t))
                target.client.delete_object(Bucket="bench", Key=job.key)
            out[parallel] = statistics.median(speeds)
        return out
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        work = Path(tmp)
        pubs = [str(pyrage.x25519.Identity.generate().to_public()) for _ in range(2)]
        cfg, study_uid, entries, total = prepare(work, args.slices)
        print(f"study: {len(entries)} instances, {total / 1e6:.1f} MB; recipients: 2 "
              f"(cloud + escrow); runs: {args.runs}")
        ours, base, durable, bundle_path = bench_build(cfg, study_uid, entries, total, pubs,
                                                       args.runs, work)
        print("bundle build+encrypt (ours: tar + age + SHA-256 of every file checked")
        print(f"  + Ed25519 + fsync):             {ours:8.1f} MB/s")
        print(f"tar | age (baseline):             {base:8.1f} MB/s")
        print(f"tar | age && sync FILE:           {durable:8.1f} MB/s")
        print(f"ratio ours / tar|age:             {ours / base:8.2f}")
        print(f"ratio ours / tar|age && sync:     {ours / durable:8.2f}")
        up = bench_upload(bundle_path, args.runs, work)
        print(f"upload to moto_server, 1 part at a time:  {up[1]:8.1f} MB/s")
        print(f"upload to moto_server, 4 parts parallel:  {up[4]:8.1f} MB/s")
        print(f"ratio 4 / 1:                              {up[4] / up[1]:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
