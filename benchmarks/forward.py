"""Forwarding benchmark: a 300-slice CT forwarded to Debian's Orthanc, with storage commitment,
next to dcmtk's ``storescu`` pushing the same files to the same Orthanc in the same run.

- ours: the outbox's sending pass (``appliance.forwarding.sending.run_due``: leases, one
  association per batch, each outcome committed to SQLite, then an N-ACTION) until every
  row is ``delivered`` by the commitment report Orthanc sends to our DICOM node;
- the peer: ``storescu`` (one association, ``TCP_NODELAY=1``) of the same files, no
  commitment; and, for a like-for-like view of our ``forwarding.associations`` lanes, as
  many storescu processes side by side, each a share; Orthanc's copy of the study is
  deleted between runs;
- hand-back of N instances (``--handback``; small images): instances/s, and the time to
  build and verify the signed manifest.

Medians of ``--runs``; the ratio is storescu's time / ours (≥ 0.8 is the target).
Run: ``.venv/bin/python benchmarks/forward.py [--slices 300] [--runs 3] [--handback 5000]``.
The machine may be shared: compare the ratio from one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
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

from dicom_data import write_series  # noqa: E402
from forwarding_site import forwarding_site, site_pacs, store_files  # noqa: E402

from appliance.core import db  # noqa: E402
from appliance.forwarding import handback, outbox, sending  # noqa: E402
from appliance.runtime import dicom_service  # noqa: E402


def clear(pacs) -> None:
    for study in pacs.studies():
        pacs.request("DELETE", f"/studies/{study}")


def ours(cfg, conn, study_uid: str, n: int) -> float:
    conn.execute("DELETE FROM forward_outbox")
    conn.commit()
    t0 = time.perf_counter()
    with db.transaction(conn):
        outbox.enqueue_study(conn, study_uid, ["SITEPACS"], "stat")
    while conn.execute("SELECT COUNT(*) FROM forward_outbox WHERE state = 'delivered'"
                       ).fetchone()[0] < n:
        if sending.run_due(cfg, conn=conn)["stored"] == 0:
            time.sleep(0.005)  # waiting for the commitment report
    return time.perf_counter() - t0


def _storescu(storescu: str, pacs, files: list[Path]) -> list[str]:
    return [storescu, "-aet", "BENCH", "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port),
            *map(str, files)]


NODELAY = {**os.environ, "TCP_NODELAY": "1"}


def peer(storescu: str, pacs, files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(_storescu(storescu, pacs, files), check=True, env=NODELAY,
                   capture_output=True)
    return time.perf_counter() - t0


def peer_side_by_side(storescu: str, pacs, files: list[Path], lanes: int) -> float:
    """``lanes`` storescu processes at once, each a share of the files (as our lanes)."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(_storescu(storescu, pacs, files[i::lanes]), env=NODELAY,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for i in range(lanes)]
    if any(p.wait() for p in procs):
        raise RuntimeError("storescu failed")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--handback", type=int, default=5000, help="instances (0: skip)")
    ap.add_argument("--associations", type=int, default=0,
                    help="forwarding.associations (0: the default)")
    args = ap.parse_args()
    storescu = shutil.which("storescu")
    if not storescu:
        print("storescu (dcmtk) is not installed")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-forward-"))
    pacs = site_pacs(work / "orthanc")
    pacs.start()
    node = None
    try:
        extra = {"associations": args.associations} if args.associations else {}
        site, cfg = forwarding_site(work, pacs, commitment=True, batch=300, **extra)
        for f in (site.data_dir / "workflows").glob("*.yaml"):
            f.unlink()
        study_uid, _s, files = write_series(work / "ct", args.slices, rows=512, cols=512)
        store_files(site, files)
        node = dicom_service.build_node(cfg)  # receives Orthanc's commitment reports
        node.start()
        conn = db.connect(cfg.db_path)
        mine, theirs, wide = [], [], []
        lanes = cfg["forwarding"]["associations"]
        for _ in range(args.runs):
            clear(pacs)
            theirs.append(peer(storescu, pacs, files))
            clear(pacs)
            wide.append(peer_side_by_side(storescu, pacs, files, lanes))
            clear(pacs)
            mine.append(ours(cfg, conn, study_uid, args.slices))
        mb = sum(f.stat().st_size for f in files) / 1e6
        m, t = statistics.median(mine), statistics.median(theirs)
        print(f"CT {args.slices} slices, {mb:.0f} MB, medians of {args.runs} runs")
        w = statistics.median(wide)
        print(f"  ours (outbox + C-STORE + storage commitment, {lanes} associations):"
              f" {m:.2f} s, {args.slices / m:.0f} inst/s, {mb / m:.0f} MB/s")
        print(f"  storescu TCP_NODELAY=1 (one association, no commitment): {t:.2f} s,"
              f" {args.slices / t:.0f} inst/s, {mb / t:.0f} MB/s")
        print(f"  {lanes} storescu side by side (no commitment): {w:.2f} s,"
              f" {args.slices / w:.0f} inst/s, {mb / w:.0f} MB/s")
        print(f"  ratio storescu time / ours: {t / m:.2f} (target >= 0.8);"
              f" {lanes} storescu / ours: {w / m:.2f}")
        if args.handback:
            bench_handback(work, pacs, site, cfg, conn, args.handback)
    finally:
        if node is not None:
            node.stop()
        pacs.stop(kill=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def bench_handback(work: Path, pacs, site, cfg, conn, n: int) -> None:
    clear(pacs)
    conn.execute("DELETE FROM forward_outbox")
    conn.commit()
    per_series = 100
    for i in range(0, n, per_series):
        _st, _se, files = write_series(work / f"hb{i}", min(per_series, n - i), rows=64, cols=64,
                                       accession=f"HB{i}")
        store_files(site, files)
        shutil.rmtree(work / f"hb{i}")
    t0 = time.perf_counter()
    result = handback.run(conn, cfg, "SITEPACS")
    total = time.perf_counter() - t0
    t1 = time.perf_counter()
    check = handback.verify(cfg, Path(result["manifest"]),
                            (cfg.keys_dir / "identity.pub").read_bytes(), cfg.known_ae("SITEPACS"))
    verify_s = time.perf_counter() - t1
    print(f"hand-back of {result['instances']} instances (64x64): {total:.1f} s,"
          f" {result['sent'] / total:.0f} inst/s (plan, send, commit, sign manifest);"
          f" verify {verify_s:.2f} s, missing {len(check['missing'])}")


if __name__ == "__main__":
    raise SystemExit(main())
