"""Return to service against a real Orthanc: ``handback`` sends only what the PACS lacks,
the signed manifest verifies, a deleted instance is named by ``handback verify`` and a
second hand-back sends only it; a hand-back killed halfway completes on the next run."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import time

from conftest import appliance_cmd
from forwarding_site import (
    FAR,
    forwarding_site,
    ingest,
    pacs_sop_uids,
    sign_report,
)

from appliance import cli
from appliance.core import audit, db
from appliance.forwarding import outbox, sending


def _cli(capsys, *argv: str) -> tuple[int, str]:
    if not cli._EXTENSIONS:
        cli._load_extensions()
    args = cli.build_parser().parse_args(list(argv))
    capsys.readouterr()
    try:
        code = args.func(args)
    except cli.CliError as e:
        return 1, str(e)
    return code, capsys.readouterr().out


def _sign_with_addendum(conn, cfg, study_uid: str) -> int:
    """A final report and a signed addendum on the study; returns the report's id."""
    from appliance.reports import delivery
    from appliance.reports import model as reports

    rid = sign_report(conn, cfg, study_uid)
    add = reports.add_addendum(conn, rid, actor="dr.ray", text="Compared with the prior: same.")
    delivery.sign(conn, cfg, add, actor="dr.ray", level="final",
                  templates=reports.load_templates())
    return rid


def test_handback_sends_what_is_missing_and_the_manifest_proves_it(tmp_path, pacs, capsys):
    site, cfg = forwarding_site(tmp_path, pacs)
    for f in (site.data_dir / "workflows").glob("*.yaml"):
        f.unlink()
    studies = [ingest(site, 2, accession=f"ACC{i}")[0] for i in range(20)]
    conn = db.connect(cfg.db_path)
    with db.transaction(conn):
        for uid in studies[:6]:  # forwarded already, before the PACS went down
            outbox.enqueue_study(conn, uid, ["SITEPACS"], "routine", FAR)
    assert sending.run_due(cfg, now=FAR)["stored"] == 12
    reports = [_sign_with_addendum(conn, cfg, uid) for uid in (studies[0], studies[10])]
    d = ["--data-dir", str(site.data_dir)]

    code, out = _cli(capsys, "handback", "--to", "SITEPACS", "--dry-run", "--json", *d)
    plan = json.loads(out)
    assert (plan["instances"], plan["already_held"], plan["to_send"]) == (40, 12, 28)
    assert len(pacs.instances()) == 12  # a dry run sends nothing

    code, out = _cli(capsys, "handback", "--to", "SITEPACS", "--json", *d)
    assert code == 0, out
    result = json.loads(out)
    assert code == 0 and result["sent"] == 28 and result["not_delivered"] == 0
    held = pacs_sop_uids(pacs)
    assert len(held) == len(set(held)) == 44  # 40 images, 2 reports and their 2 addenda
    body = json.loads(open(result["manifest"]).read())["body"]
    listed = [i for st in body["studies"] for se in st["series"] for i in se["instances"]]
    proofs = collections.Counter(i["proof"] for i in listed)
    assert proofs == {"c-find": 28 + 4, "c-find (already held)": 12}
    docs = [i for i in listed if "document" in i]
    assert sorted(i["document"] for i in docs) == ["addendum", "addendum", "report", "report"]
    assert {i["report_id"] for i in docs} >= set(reports)
    assert {i["sop_instance_uid"] for i in docs} <= set(held)
    assert body["report_documents"] == result["report_documents"] == 4
    assert os.stat(result["manifest"]).st_mode & 0o777 == 0o600

    code, out = _cli(capsys, "handback", "verify", result["manifest"], "--to", "SITEPACS", *d)
    assert code == 0 and \
        "signature ok; 40 instance(s) and 4 report document(s) listed; 0 missing" in out, out

    sr = next(i for i in docs if i["document"] == "addendum")["sop_instance_uid"]
    doc_uids = {i["sop_instance_uid"] for i in docs}
    by_uid = {pacs.get(f"/instances/{o}")["MainDicomTags"]["SOPInstanceUID"]: o
              for o in pacs.instances()}
    gone_uids = [sr, next(u for u in sorted(by_uid) if u not in doc_uids)]  # an SR, an image
    gone = [by_uid[u] for u in gone_uids]
    for g in gone:
        pacs.request("DELETE", f"/instances/{g}")
    code, out = _cli(capsys, "handback", "verify", result["manifest"], "--to", "SITEPACS",
                     "--host", "127.0.0.1", "--port", str(pacs.dicom_port), "--public-key",
                     str(site.data_dir / "keys" / "identity.pub"))
    assert code == 1 and all(f"missing {u}" in out for u in gone_uids) and "2 missing" in out, \
        (gone_uids, out)

    code, out = _cli(capsys, "handback", "--to", "SITEPACS", "--json", *d)
    again = json.loads(out)
    assert code == 0 and again["not_delivered"] == 0, again
    assert len(pacs.instances()) == 44  # the image and the addendum SR, once each
    assert sorted(pacs_sop_uids(pacs)) == sorted(held)

    tampered = json.loads(open(result["manifest"]).read())
    tampered["body"]["instances"] = 39
    bad = tmp_path / "tampered.json"
    bad.write_text(json.dumps(tampered))
    code, out = _cli(capsys, "handback", "verify", str(bad), "--to", "SITEPACS", *d)
    assert code == 1 and "signature does not verify" in out
    actions = [r["action"] for r in audit.rows(conn) if r["action"].startswith("handback.")]
    assert actions == ["handback.start", "handback.done"] * 2


def test_a_handback_killed_halfway_completes_on_the_next_run_without_duplicates(tmp_path,
                                                                                pacs):
    site, cfg = forwarding_site(tmp_path, pacs, batch=10)
    for f in (site.data_dir / "workflows").glob("*.yaml"):
        f.unlink()
    for i in range(4):
        ingest(site, 40, rows=128, cols=128, accession=f"ACC{i}")
    conn = db.connect(cfg.db_path)
    cmd = appliance_cmd("handback", "--to", "SITEPACS", "--json", "--data-dir", str(site.data_dir))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        done = conn.execute("SELECT COUNT(*) FROM forward_outbox WHERE state IN ('stored',"
                            " 'delivered')").fetchone()[0]
        if done >= 40:
            break
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < done < 160, "the kill did not land halfway"
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    assert result["not_delivered"] == 0 and result["instances"] == 160
    held = collections.Counter(pacs_sop_uids(pacs))
    assert len(held) == 160 and set(held.values()) == {1}
