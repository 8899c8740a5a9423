"""Report benchmark: signing, document making, and delivery into Debian's Orthanc.

Measured in one run on this machine:

- sign final (durable commit of the signed version, the audit row and the outbox rows), p50/p95;
- making a Basic Text SR (pydicom) and a PDF (fpdf2), median per report;
- delivering N signed reports through the outbox (``report_delivery.run_due``: a lease,
  one association and C-STORE per report, the outcome committed) into a fresh Orthanc;
- the peer: dcmtk's ``storescu`` sending the same N SR files to a fresh Orthanc, once with
  one association per file (what the outbox does) and once with all in one association.

Medians of ``--runs`` repetitions; the ratio is ours / storescu.

Run: ``.venv/bin/python benchmarks/report_delivery.py [--reports 40] [--runs 3]``.
The machine may be shared: compare ratios from one run.
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

from orthanc import Orthanc  # noqa: E402  (the tests' Orthanc helper)
from reporting_site import add_known_ae, add_users, ingest_study, local_site  # noqa: E402

from appliance.core import config, db  # noqa: E402
from appliance.reports import delivery as report_delivery  # noqa: E402
from appliance.reports import documents as report_documents  # noqa: E402
from appliance.reports import model as reports  # noqa: E402

TEMPLATES = reports.load_templates()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def make_reports(conn, cfg, study_uid: str, n: int) -> tuple[list[int], list[float]]:
    """n signed final reports; returns their ids and the sign latencies (ms)."""
    ids, sign_ms = [], []
    for i in range(n):
        rid = reports.create(conn, study_uid=study_uid, author="dr.ray",
                             template_id="ct-head-stroke", templates=TEMPLATES)
        reports.autosave(conn, rid, actor="dr.ray", templates=TEMPLATES, base_revision=0,
                         fields={"haemorrhage": "absent", "aspects": ["M2"]},
                         findings=f"Benchmark report {i}: small left M2 hypodensity.",
                         impression="Early left MCA infarct, ASPECTS 9.")
        t = time.perf_counter()
        report_delivery.sign(conn, cfg, rid, actor="dr.ray", level="final", templates=TEMPLATES)
        sign_ms.append((time.perf_counter() - t) * 1000)
        ids.append(rid)
    return ids, sign_ms


def documents(conn, cfg, ids: list[int], out: Path) -> tuple[list[Path], list[float], list[float]]:
    """Write the SR of each report's queued delivery; time SR and PDF making."""
    paths, sr_ms, pdf_ms = [], [], []
    for rid in ids:
        row = report_delivery.for_report(conn, rid)[0]
        job = report_delivery._job(conn, cfg, row)
        t = time.perf_counter()
        ds = report_documents.build_sr(job.doc)
        sr_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        report_documents.render_pdf(job.doc)
        pdf_ms.append((time.perf_counter() - t) * 1000)
        path = out / f"sr{rid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, sr_ms, pdf_ms


def storescu(paths: list[Path], pacs: Orthanc, one_association: bool) -> float:
    tool = shutil.which("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    base = [tool, "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port)]
    t = time.perf_counter()
    if one_association:
        subprocess.run([*base, *map(str, paths)], check=True, capture_output=True, env=env)
    else:
        for p in paths:
            subprocess.run([*base, str(p)], check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def one_run(work: Path, n: int) -> dict[str, float]:
    site = local_site(work)
    add_users(site)
    study_uid = ingest_study(site, 3)
    results: dict[str, float] = {}
    with Orthanc(work / "pacs", aet="SITEPACS") as pacs:
        add_known_ae(site, "SITEPACS", "127.0.0.1", pacs.dicom_port)
        text = (site.data_dir / "appliance.yaml").read_text()
        (site.data_dir / "appliance.yaml").write_text(
            text.replace('deliver_to: ""', "deliver_to: SITEPACS"))
        cfg = config.load(site.data_dir)
        conn = db.connect(cfg.db_path)
        ids, sign_ms = make_reports(conn, cfg, study_uid, n)
        results["sign_p50_ms"], results["sign_p95_ms"] = pct(sign_ms, .5), pct(sign_ms, .95)
        out = work / "sr"
        out.mkdir()
        paths, sr_ms, pdf_ms = documents(conn, cfg, ids, out)
        results["sr_ms"], results["pdf_ms"] = statistics.median(sr_ms), statistics.median(pdf_ms)
        t = time.perf_counter()
        counts = report_delivery.run_due(cfg, conn=conn, limit=n, budget_s=1e9)
        results["ours_s"] = time.perf_counter() - t
        assert counts == {"delivered": n, "failed": 0}, counts
        assert len(pacs.instances()) == n
        conn.close()
    for key, one in (("storescu_each_s", False), ("storescu_one_assoc_s", True)):
        with Orthanc(work / f"pacs-{key}", aet="SITEPACS") as pacs:
            results[key] = storescu(paths, pacs, one)
            assert len(pacs.instances()) == n
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reports", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not (os.path.exists("/usr/sbin/Orthanc") and shutil.which("storescu")):
        print("needs Debian's orthanc and dcmtk (make test installs them)", file=sys.stderr)
        return 2
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="bench-reports-") as tmp:
            runs.append(one_run(Path(tmp), args.reports))
        print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v:.3f}" for k, v in runs[-1].items()),
              flush=True)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    n = args.reports
    print(f"\nreports: {n} per run, {args.runs} runs (medians)")
    print(f"sign final (durable)         p50 {med['sign_p50_ms']:.1f} ms   "
          f"p95 {med['sign_p95_ms']:.1f} ms")
    print(f"make SR / PDF                {med['sr_ms']:.1f} ms / {med['pdf_ms']:.1f} ms per report")
    print(f"deliver via outbox           {n / med['ours_s']:.1f} reports/s "
          f"({med['ours_s'] * 1000 / n:.1f} ms each, association per report)")
    print(f"storescu, association each   {n / med['storescu_each_s']:.1f} reports/s")
    print(f"storescu, one association    {n / med['storescu_one_assoc_s']:.1f} reports/s")
    print(f"ratio ours/storescu (same association pattern): "
          f"{med['storescu_each_s'] / med['ours_s']:.2f}x throughput")
    print(f"ratio ours/storescu one association:            "
          f"{med['storescu_one_assoc_s'] / med['ours_s']:.2f}x throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
