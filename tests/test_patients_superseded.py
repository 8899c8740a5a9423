"""Old copies under a replaced identity are removed at the PACS, and only after the corrected
copy is proved delivered there (appliance/patients/superseded.py), against a real Orthanc.

- With its REST API (``ae add --orthanc-url``, a password in a 0600 file): nothing is deleted
  while the corrected copies are only queued; a credentials file others can read stops it
  with the ``chmod`` to run; a corrected copy missing at the PACS keeps its old copy until it
  is sent again; then every old image and the report's SR are deleted, each deletion audited,
  the password in no log or audit row; a second pass changes nothing; an unlink moves the
  copies back the same way.
- A worker killed with SIGKILL between DELETEs: the next pass finishes, every deletion
  audited as ``removed`` (the copies were named before the first DELETE went).
- Without a REST API: the copies are listed for the PACS administrator (CLI, JSON API, the
  desk page), and leave the list by themselves once a C-FIND no longer finds them.
- Bad input: a password in ``--orthanc-url`` or in ``appliance.yaml`` is refused without being
  repeated, nothing changed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_tool
from dicom_data import write_series
from forwarding_site import store_files
from orthanc import ORTHANC_BIN, Orthanc
from test_auth import HTML, login, make_auth_app
from test_patients import _cli
from test_patients_reconciliation import _sign

from appliance.core import config, db
from appliance.forwarding import outbox as forward_outbox
from appliance.forwarding import sending
from appliance.patients import reconciliation, registry, superseded
from appliance.reports import delivery

USER, SECRET = "recon", "s3cret:Zq9-colon"


def start_pacs(workdir: Path, ae_title: str, port: int = 104,
               auth: tuple[str, str] | None = None) -> Orthanc:
    """Orthanc as the site PACS: replaces a same-patient copy, answers our C-FIND."""
    return Orthanc(workdir, binary=require_tool("Orthanc", ORTHANC_BIN), auth=auth,
                   extra_config={"OverwriteInstances": True, "DicomModalities": {
                       ae_title: [ae_title, "127.0.0.1", port]}}).start()


def add_pacs(monkeypatch, capsys, data_dir: Path, pacs: Orthanc, api: bool) -> None:
    """``appliance ae add SITEPACS … [--orthanc-url]``, and reports delivered to it as SRs."""
    extra = ["--orthanc-url", pacs.url] if api else []
    code, out, err = _cli(monkeypatch, capsys, data_dir, "ae", "add", pacs.aet, "--host",
                          "127.0.0.1", "--port", str(pacs.dicom_port), *extra)
    assert code == 0, err
    path = data_dir / "appliance.yaml"
    path.write_text(path.read_text().replace('deliver_to: ""', f"deliver_to: {pacs.aet}"))


def trauma_studies(conn, cfg, data_dir: Path, tmp: Path, patients: int, studies: int,
                   instances: int) -> tuple[list[dict], list[dict]]:
    """Temporary identities, each with its real record and studies stored under the former."""
    desk = registry.Site.from_config(cfg)
    temps, reals, paths = [], [], []
    for i in range(patients):
        t = registry.register_trauma(conn, desk, actor="desk", sex_code="M", age_band="adult")
        temps.append(t)
        reals.append(registry.register(conn, desk, actor="desk", name=f"Real^Person{i}",
                                       patient_id=f"MRN-{i}", birth="1970-01-01", sex_code="F"))
        for j in range(studies):
            paths += write_series(tmp / f"p{i}s{j}", instances, patient_id=t["patient_id"],
                                  patient_name=t["name"])[2]
    store_files(_Dir(data_dir), paths)
    return temps, reals


class _Dir:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir


def forwarded_trauma(data_dir: Path, tmp_path: Path, monkeypatch, capsys, ae_title: str,
                     api: bool, studies: int, instances: int):
    """Orthanc as the site PACS, one trauma patient's studies forwarded to it, and the real
    record they belong to: (pacs, cfg, conn, temporary registration, real registration)."""
    pacs = start_pacs(tmp_path / "orthanc", ae_title)
    add_pacs(monkeypatch, capsys, data_dir, pacs, api=api)
    cfg = config.load(data_dir)
    conn = db.open_db(cfg.db_path)
    (temp,), (real,) = trauma_studies(conn, cfg, data_dir, tmp_path, 1, studies, instances)
    forward_all(conn, cfg, pacs.aet)
    return pacs, cfg, conn, temp, real


def forward_all(conn, cfg, destination: str) -> None:
    for (uid,) in conn.execute("SELECT study_uid FROM studies").fetchall():
        forward_outbox.enqueue_study(conn, uid, [destination], "routine")
    sending.run_due(cfg)


def study_uids(conn, patient_id: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT study_uid FROM studies WHERE patient_id = ?",
                                       (patient_id,))]


def audits(conn, action: str) -> list:
    return conn.execute("SELECT object, detail FROM audit WHERE action = ? ORDER BY id",
                        (action,)).fetchall()


def rows(conn, state: str | None = None) -> list:
    sql = "SELECT * FROM superseded_copies" + (" WHERE state = ?" if state else "")
    return conn.execute(sql + " ORDER BY id", (state,) if state else ()).fetchall()


def test_old_copies_deleted_through_the_orthanc_api_only_after_the_corrected_ones_arrive(
        site, tmp_path: Path, monkeypatch, capsys):
    pacs = start_pacs(tmp_path / "orthanc", site.ae_title, auth=(USER, SECRET))
    add_pacs(monkeypatch, capsys, site.data_dir, pacs, api=True)
    creds = site.data_dir / "pacs.credentials"
    creds.write_text(f"# Orthanc REST users\n{pacs.aet} = {USER}:{SECRET}\n")
    creds.chmod(0o644)  # others may read it: refused until chmod 600
    with open(site.data_dir / "appliance.yaml", "a") as f:
        f.write("patients:\n  pacs_credentials_file: pacs.credentials\n")
    cfg = config.load(site.data_dir)
    conn = db.open_db(cfg.db_path)
    temps, reals = trauma_studies(conn, cfg, site.data_dir, tmp_path, 2, 1, 3)
    forward_all(conn, cfg, pacs.aet)
    _sign(conn, cfg, study_uids(conn, temps[0]["patient_id"])[0])
    assert delivery.run_due(cfg)["delivered"] == 1  # the SR, under the trauma identity
    t0 = temps[0]["patient_id"]
    assert len(pacs.find({"PatientID": t0})) == 4  # 3 images and the report

    for t, real in zip(temps, reals, strict=True):
        reconciliation.link(cfg, conn, t["patient_id"], real["patient_id"], actor="desk",
                            reason="identified by family")
    assert len(rows(conn, "waiting")) == 7
    clock = time.time()
    # Queued only: nothing is deleted, whatever the sweep is asked.
    assert superseded.run_due(cfg, now=clock) == 0
    assert len(pacs.find({"PatientID": t0})) == 4 and len(rows(conn, "waiting")) == 7

    assert sending.run_due(cfg)["stored"] == 6
    assert delivery.run_due(cfg)["delivered"] == 2  # the SR again (corrected), the addendum
    assert len(pacs.find({"PatientID": "MRN-0"})) == 5
    # A corrected copy that is not at the PACS after all: its old copy must stay.
    lost = pacs.find({"PatientID": "MRN-1"})[0]
    lost_sop = pacs.simplified_tags(lost)["SOPInstanceUID"]
    pacs.delete(lost)

    assert superseded.run_due(cfg, now=clock + 60) == 0  # the credentials file is refused
    assert all(f"chmod 600 {creds}" in r["last_error"] for r in rows(conn, "waiting"))
    creds.chmod(0o600)
    assert superseded.run_due(cfg, now=clock + 3600) == 6
    (kept,) = rows(conn, "waiting")
    assert kept["sop_uid"] == lost_sop and "does not show the corrected copy" in \
        kept["last_error"]
    assert pacs.find({"PatientID": temps[1]["patient_id"], "SOPInstanceUID": lost_sop})
    assert pacs.find({"PatientID": t0}) == []

    forward_outbox.resend_instances(conn, [lost_sop])  # sent again (as a hand-back would)
    assert sending.run_due(cfg)["stored"] == 1
    assert superseded.run_due(cfg, now=clock + 7200) == 1
    assert pacs.find({"PatientID": temps[1]["patient_id"]}, "Patient") == []
    assert pacs.find({"PatientID": t0}, "Patient") == []
    assert len(pacs.instances()) == 3 + 3 + 2  # corrected images, the SR, the addendum
    removed = audits(conn, "patient.superseded.removed")
    assert len(removed) == 7 and {r[0] for r in removed} == {r["sop_uid"] for r in rows(conn)}
    assert all('"link":' in r[1] and '"old_patient_id":"' in r[1] for r in removed)
    text = "\n".join(str(tuple(r)) for r in conn.execute("SELECT * FROM audit"))
    logs = "".join(p.read_text(errors="replace") for p in (site.data_dir / "logs").glob("*"))
    assert SECRET not in text and SECRET not in logs

    # Again: nothing to do, nothing audited twice.
    audit_rows = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
    assert superseded.run_due(cfg, now=clock + 9000) == 0
    assert conn.execute("SELECT count(*) FROM audit").fetchone()[0] == audit_rows

    # Unlink: the copies under MRN-0 are the superseded ones now; they go the same way.
    reconciliation.unlink(cfg, conn, t0, actor="desk", reason="wrong family")
    assert sending.run_due(cfg)["stored"] == 3
    assert delivery.run_due(cfg)["delivered"] == 3  # report, link addendum again; unlink's
    assert superseded.run_due(cfg, now=clock + 10_000) == 5
    assert pacs.find({"PatientID": "MRN-0"}) == []
    at_pacs = {pacs.simplified_tags(i)["SOPInstanceUID"] for i in pacs.find({"PatientID": t0})}
    sent = {r[0] for r in conn.execute("SELECT sop_uid FROM instances WHERE study_uid = ?",
                                       (study_uids(conn, t0)[0],))}
    sent |= {r[0] for r in conn.execute("SELECT sop_uid FROM deliveries WHERE format = 'sr'")}
    assert at_pacs == sent  # images, report, link addendum, unlink addendum: all under T
    conn.close()
    pacs.stop(kill=True)


KILLER = """
import os, signal, sys
from appliance.core import config
from appliance.patients import orthanc_api, superseded
real, done = orthanc_api.OrthancApi.delete, []
def delete(self, oid):
    gone = real(self, oid)
    done.append(oid)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return gone
orthanc_api.OrthancApi.delete = delete
superseded.run_due(config.load(sys.argv[1]), now=float(sys.argv[2]))
"""


def test_a_worker_killed_between_deletes_leaves_each_deletion_audited(site, tmp_path: Path,
                                                                      monkeypatch, capsys):
    pacs, cfg, conn, temp, real = forwarded_trauma(
        site.data_dir, tmp_path, monkeypatch, capsys, site.ae_title, api=True, studies=1,
        instances=4)
    reconciliation.link(cfg, conn, temp["patient_id"], real["patient_id"], actor="desk",
                        reason="fingerprints")
    assert sending.run_due(cfg)["stored"] == 4
    now = time.time()
    r = subprocess.run([sys.executable, "-c", KILLER, str(site.data_dir), str(now)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == -9, r.stderr
    assert len(pacs.find({"PatientID": temp["patient_id"]})) == 2  # two deleted, then killed
    assert rows(conn, "removed") == [] and all(x["pacs_ref"] for x in rows(conn, "waiting"))
    assert superseded.run_due(cfg, now=now) == 4  # the dead holder's lease is taken at once
    assert pacs.find({"PatientID": temp["patient_id"]}) == []
    assert len(audits(conn, "patient.superseded.removed")) == 4
    assert audits(conn, "patient.superseded.absent") == []
    conn.close()
    pacs.stop(kill=True)


def test_without_a_rest_api_the_copies_are_listed_for_the_pacs_administrator(
        tmp_path: Path, monkeypatch, capsys):
    a = make_auth_app(tmp_path)
    a.add_user("desk", "site_staff")
    pacs, cfg, conn, temp, real = forwarded_trauma(
        a.data_dir, tmp_path, monkeypatch, capsys, "FIELDAPP", api=False, studies=1,
        instances=2)
    reconciliation.link(cfg, conn, temp["patient_id"], real["patient_id"], actor="desk",
                        reason="identified by her son")
    assert sending.run_due(cfg)["stored"] == 2
    now = time.time()
    assert superseded.run_due(cfg, now=now) == 2
    listed = rows(conn, "manual")
    assert len(listed) == 2 and len(pacs.find({"PatientID": temp["patient_id"]})) == 2

    def cli(*args: str):
        return _cli(monkeypatch, capsys, a.data_dir, "patient", "superseded", *args)

    code, out, _ = cli("--json")
    got = json.loads(out)
    assert code == 0 and got["destinations"][pacs.aet]["manual"] == 2
    assert {(c["old_patient_id"], c["patient_id"], c["sop_uid"]) for c in got["copies"]} == \
        {(temp["patient_id"], "MRN-0", x["sop_uid"]) for x in listed}
    code, out, _ = cli("--to", pacs.aet)
    assert "2 for the PACS administrator" in out and all(x["sop_uid"] in out for x in listed)
    code, _, err = cli("--to", "NOSUCHAE")
    assert code == 1 and err.startswith("error: no known AE")
    assert len(audits(conn, "patient.superseded.list")) == 2

    browser = a.client()
    login(a, browser, "desk")
    page = browser.get("/patients", headers=HTML).get_data(as_text=True)
    assert page.count('data-testid="superseded-row"') == 2 and temp["patient_id"] in page
    api = browser.get("/api/v1/patients/superseded").get_json()
    assert {c["sop_uid"] for c in api} == {x["sop_uid"] for x in listed}
    status = browser.get("/status", headers=HTML).get_data(as_text=True)
    panel = status[status.index('id="superseded"'):]
    panel = panel[:panel.index("</section>")]
    assert f'data-destination="{pacs.aet}"' in panel
    assert '<td data-figure="manual">2</td>' in panel
    assert temp["patient_id"] not in panel  # counts only on the status page

    # Hospital IT deletes them; the next C-FIND after the re-check interval sees it.
    for oid in pacs.find({"PatientID": temp["patient_id"]}):
        pacs.delete(oid)
    assert superseded.run_due(cfg, now=now + 60) == 0  # not asked again yet
    assert superseded.run_due(cfg, now=now + superseded.MANUAL_RECHECK_S + 1) == 2
    assert {x["proof"] for x in rows(conn, "removed")} == {"c-find (removed at the PACS)"}
    assert len(audits(conn, "patient.superseded.removed")) == 2
    code, out, _ = cli()
    assert "0 for the PACS administrator" in out and "2 removed" in out
    assert 'id="superseded"' not in browser.get("/status", headers=HTML).get_data(as_text=True)
    conn.close()
    pacs.stop(kill=True)


@pytest.mark.parametrize("url", ["http://recon:pw-in-url@127.0.0.1:8042", "ftp://pacs:21",
                                 "http://127.0.0.1:8042/?token=pw-in-url"])
def test_a_password_in_the_api_address_is_refused_and_not_repeated(site, monkeypatch, capsys,
                                                                   url):
    before = (site.data_dir / "appliance.yaml").read_text()
    code, out, err = _cli(monkeypatch, capsys, site.data_dir, "ae", "add", "SITEPACS",
                          "--host", "127.0.0.1", "--orthanc-url", url)
    assert code == 1 and err.startswith("error: --orthanc-url") and "pw-in-url" not in err
    assert (site.data_dir / "appliance.yaml").read_text() == before
    edited = re.sub(r"known_aes: \[\]", f"known_aes: [{{name: SITEPACS, orthanc_url: '{url}'}}]",
                    before)
    (site.data_dir / "appliance.yaml").write_text(edited)
    with pytest.raises(config.ConfigError) as e:
        config.load(site.data_dir)
    assert "orthanc_url" in str(e.value) and "pw-in-url" not in str(e.value)


def test_a_link_killed_while_it_corrects_the_files_is_finished_by_running_it_again(
        tmp_path: Path, monkeypatch, capsys):
    """The files are corrected before the link's transaction (a study cannot be rewritten in
    one): killed in between, the same command finishes the same correction, where it used
    to find no study left under the temporary ID and record an empty link."""
    a = make_auth_app(tmp_path)
    pacs, cfg, conn, temp, real = forwarded_trauma(
        a.data_dir, tmp_path, monkeypatch, capsys, "FIELDAPP", api=False, studies=3,
        instances=60)
    assert conn.execute("SELECT count(*) FROM forward_outbox WHERE state = 'delivered'"
                        ).fetchone()[0] == 180
    link = [sys.executable, "-m", "appliance", "patient", "link", temp["patient_id"],
            real["patient_id"], "--reason", "identified by her son", "--data-dir",
            str(a.data_dir)]
    proc = subprocess.Popen(link, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and conn.execute(
            "SELECT count(*) FROM instance_versions").fetchone()[0] < 20:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert conn.execute("SELECT count(*) FROM patient_links").fetchone()[0] == 0, \
        "the link finished before the kill"
    assert conn.execute("SELECT count(*) FROM instance_versions").fetchone()[0] >= 20

    other = registry.register(conn, registry.Site.from_config(cfg), actor="desk",
                              name="Other^Person", patient_id="MRN-9", birth="1980-02-02",
                              sex_code="M")
    with pytest.raises(reconciliation.ReconciliationError, match="interrupted"):
        reconciliation.link(cfg, conn, temp["patient_id"], other["patient_id"], actor="desk",
                            reason="a different guess")
    assert conn.execute("SELECT count(*) FROM patient_links").fetchone()[0] == 0

    done = subprocess.run(link, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (detail,) = [json.loads(r[0]) for r in conn.execute("SELECT detail FROM patient_links")]
    assert detail["instances"] == 180 and len(detail["studies"]) == 3
    assert study_uids(conn, temp["patient_id"]) == []
    assert len(study_uids(conn, real["patient_id"])) == 3
    # Every instance goes again to the PACS, and every old copy is recorded under the
    # temporary ID (the interrupted run's plan kept the IDs the studies had before it).
    assert conn.execute("SELECT count(*) FROM forward_outbox WHERE state = 'waiting'"
                        ).fetchone()[0] == 180
    assert {r["old_patient_id"] for r in rows(conn)} == {temp["patient_id"]}
    assert len(rows(conn)) == 180
    assert len(audits(conn, "patient.link")) == 1
    assert conn.execute("SELECT count(*) FROM settings WHERE key LIKE ?",
                        (reconciliation.PENDING + "%",)).fetchone()[0] == 0
    conn.close()
    pacs.stop(kill=True)
