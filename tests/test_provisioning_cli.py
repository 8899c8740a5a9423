"""``appliance provision``, ``appliance logs`` and ``appliance migrate``: the responder's front."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest
from conftest import appliance_cmd, make_site, run_cli

AGE_KEY = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"

ANSWERS = f"""\
site_name: Camp Hospital North
ae_title: CAMPNORTH
dicom_port: 11113
web_port: 8444
allowed_modalities: [CT, mr, CR]
cloud:
  target: s3
  url: https://s3.example.org
  bucket: camp-north
  recipient_key: {AGE_KEY}
site_pacs: SITEPACS@10.0.0.5:104
readers:
  - {{username: drsmith, role: radiologist, name: Dr Smith}}
  - neuro1:neurologist
"""


def _provision(tmp_path, text: str, *extra: str) -> tuple[subprocess.CompletedProcess, object]:
    answers = tmp_path / "answers.yaml"
    answers.write_text(text)
    data_dir = tmp_path / "site"
    return run_cli("provision", "--answers", str(answers), "--data-dir", str(data_dir),
                   *extra), data_dir


def test_provision_from_answers_builds_a_working_site(tmp_path):
    from appliance.core import config, db

    result, data_dir = _provision(tmp_path, ANSWERS)
    assert result.returncode == 0, result.stderr
    cfg = config.load(data_dir)
    assert cfg["site"]["name"] == "Camp Hospital North"
    assert cfg["dicom"]["ae_title"] == "CAMPNORTH" and cfg["dicom"]["port"] == 11113
    assert cfg["web"]["port"] == 8444
    assert cfg["dicom"]["allowed_modalities"] == ["CT", "MR", "CR"]
    pacs = cfg.known_ae("SITEPACS")
    assert pacs and pacs.host == "10.0.0.5" and pacs.port == 104 and pacs.move_destination
    if "reports" in config.SCHEMA:
        assert cfg["reports"]["deliver_to"] == "SITEPACS"
    if "sync" in config.SCHEMA:
        assert cfg["sync"]["target"] == "s3" and cfg["sync"]["bucket"] == "camp-north"
        assert cfg["sync"]["recipients"] == [AGE_KEY]
    # Comments of the template survive the edits.
    assert "# Who may C-ECHO / C-STORE" in (data_dir / "appliance.yaml").read_text()
    conn = db.connect(data_dir / "appliance.db")
    users = {r["username"]: dict(r) for r in conn.execute("SELECT * FROM users")}
    assert users["drsmith"]["role"] == "radiologist" and users["drsmith"]["must_change_password"]
    assert users["neuro1"]["role"] == "neurologist"
    actions = [r["action"] for r in conn.execute("SELECT action FROM audit")]
    conn.close()
    assert "site.provision" in actions
    # Passwords are printed once, the admin's on the last line (install.sh reads it there).
    lines = result.stdout.strip().splitlines()
    assert "drsmith" in result.stdout and "one-time password" in result.stdout
    assert len(lines[-1].strip()) >= 20


@pytest.mark.parametrize("edit, expected", [
    (("ae_title: CAMPNORTH", "ae_title: THIS-AE-TITLE-IS-TOO-LONG"), "ae_title: at most 16"),
    (("dicom_port: 11113", "dicom_port: 70000"), "dicom_port: must be a port number"),
    (("web_port: 8444", "web_port: 11113"), "web_port: must differ from dicom_port"),
    (("[CT, mr, CR]", "[CT, XRAY]"), "allowed_modalities: 'XRAY' is not a DICOM modality"),
    (("target: s3", "target: dropbox"), "cloud.target: must be one of none, s3, folder"),
    ((AGE_KEY, "age1short"), "cloud.recipient_key: the cloud's age public key"),
    (("bucket: camp-north", "bucket: Camp_North"), "cloud.bucket: not a valid bucket name"),
    (("SITEPACS@10.0.0.5:104", "SITEPACS@10.0.0.5"), "site_pacs: expected AE@host:port"),
    (("role: radiologist", "role: janitor"), "readers[0].role: must be one of"),
    (("neuro1:neurologist", "drsmith:neurologist"), "readers[1].username: 'drsmith' is listed"),
    (("site_name: Camp Hospital North", "site_nme: Camp"), "site_nme: unknown answer"),
    (("allowed_modalities: [CT", "allowed_modalities: [CT\n  ["), "not valid YAML"),
])
def test_every_bad_answer_is_refused_and_nothing_is_created(tmp_path, edit, expected):
    old, new = edit
    assert old in ANSWERS
    result, data_dir = _provision(tmp_path, ANSWERS.replace(old, new, 1))
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and expected in line, line
    assert "answers.yaml" in line
    assert not data_dir.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["answers.yaml"]


def test_guided_questions_ask_again_after_a_wrong_answer(tmp_path):
    data_dir = tmp_path / "site"
    replies = "\n".join([
        "Mobile Unit 3",  # site name
        "MU3",  # AE title
        "99999", "11114",  # DICOM port: wrong, then right
        "",  # web port: default
        "CT MR",  # modalities
        "folder", "/media/usb", AGE_KEY,  # cloud: folder target and key
        "",  # no site PACS
        "drjones:radiologist:Dr Jones",  # readers
    ]) + "\n"
    result = run_cli("provision", "--guided", "--data-dir", str(data_dir), input=replies)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dicom_port: must be a port number" in result.stdout
    from appliance.core import config

    cfg = config.load(data_dir)
    assert cfg["dicom"]["port"] == 11114 and cfg["web"]["port"] == 8443
    assert cfg["dicom"]["allowed_modalities"] == ["CT", "MR"]
    if "sync" in config.SCHEMA:
        assert cfg["sync"]["target"] == "folder" and cfg["sync"]["folder"] == "/media/usb"


def test_provision_flags_without_answers_file(tmp_path):
    data_dir = tmp_path / "site"
    result = run_cli("provision", "--data-dir", str(data_dir), "--site-name", "Flag site",
                     "--ae-title", "FLAGS", "--modalities", "CT,US", "--reader", "r1:radiologist")
    assert result.returncode == 0, result.stderr
    assert "modalities CT US" in result.stdout and "reader r1" in result.stdout


def test_provision_refuses_an_existing_site(tmp_path):
    result, data_dir = _provision(tmp_path, ANSWERS)
    assert result.returncode == 0
    again, _ = _provision(tmp_path, ANSWERS)
    assert again.returncode == 1 and "--force" in again.stderr


def _log(path, **rec):
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")


def test_logs_merges_components_in_time_order_and_filters(tmp_path):
    site = make_site(tmp_path)
    logs = site.data_dir / "logs"
    _log(logs / "dicom.log", ts="2026-01-01T10:00:02.000Z", level="info", component="dicom",
         msg="stored", study_uid="1.2.3", calling_ae="CT1")
    _log(logs / "worker.log", ts="2026-01-01T10:00:01.000Z", level="warning",
         component="worker", msg="study complete", study_uid="1.2.3")
    _log(logs / "web.log", ts="2026-01-01T10:00:03.000Z", level="info", component="web",
         msg="GET /worklist", request_id="r-9")
    (logs / "web.log").open("a").write("not json\n")
    out = site.cli("logs").stdout.splitlines()
    assert [line.split()[2] for line in out] == ["worker", "dicom", "web"]
    assert "study_uid=1.2.3" in out[1] and "calling_ae=CT1" in out[1]
    study = site.cli("logs", "--study", "1.2.3").stdout
    assert "stored" in study and "study complete" in study and "/worklist" not in study
    only = site.cli("logs", "--component", "web").stdout
    assert "/worklist" in only and "stored" not in only
    warn = site.cli("logs", "--level", "warning").stdout
    assert warn.count("\n") == 1 and "study complete" in warn
    bad = site.cli("logs", "--component", "nosuch")
    assert bad.returncode == 1 and bad.stderr.startswith("error: no logs for nosuch")


def test_logs_follow_prints_new_lines(tmp_path):
    site = make_site(tmp_path)
    logs = site.data_dir / "logs"
    _log(logs / "web.log", ts="2026-01-01T10:59:00.000Z", level="info", component="web",
         msg="already there")
    proc = subprocess.Popen(appliance_cmd("logs", "--follow", "--data-dir", str(site.data_dir)),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert "already there" in proc.stdout.readline()  # the backlog is read and printed
        _log(logs / "dicom.log", ts="2026-01-01T11:00:00.000Z", level="error", component="dicom",
             msg="disk full", study_uid="9.9")
        line = proc.stdout.readline()
        assert "disk full" in line and "dicom" in line
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_migrate_reports_the_schema_version(tmp_path):
    from appliance.core import db

    site = make_site(tmp_path)
    result = site.cli("migrate")
    assert result.returncode == 0, result.stderr
    latest = max(n for n, _, _ in db.MIGRATIONS)
    assert f"database schema version {latest} (up to date)" in result.stdout
