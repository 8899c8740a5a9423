"""Series /metadata is written at ingest: a real node and a real gunicorn that never open a file.

The web process runs with an audit hook (a ``sitecustomize`` on its
PYTHONPATH) that logs every ``open`` under the study store; the series is
pushed with dcmtk ``storescu`` into the running node and asked for over
HTTPS, half-arrived and then complete.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import requests
from conftest import make_site, require_tool
from dicom_data import write_series

from appliance.accounts import tokens
from appliance.accounts import users as accounts
from appliance.core import config, db
from appliance.dicomweb import metadata as md
from dicom_node.study_store import StudyStore

HOOK = '''
import os, sys
_watch = os.environ.get("OPEN_AUDIT_DIR")
if _watch:
    _fd = os.open(os.environ["OPEN_AUDIT_LOG"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def _hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if path.startswith(_watch):
                os.write(_fd, (path + "\\n").encode())

    sys.addaudithook(_hook)
'''


def _push(storescu: str, site, paths: list[Path]) -> None:
    subprocess.run([storescu, "-aec", site.ae_title, "localhost", str(site.dicom_port),
                    *map(str, paths)], check=True, capture_output=True, timeout=60)


def _expected(paths: list[Path], study: str, series: str) -> dict[str, dict]:
    """What reading each file would give (the old request path), keyed by SOP Instance UID."""
    out = {}
    for p in paths:
        sop = pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
        text, _ = md.compute(p, study, series, sop)
        out[sop] = json.loads(text.replace(md.BASE_MARKER, "/dicom-web"))
    return out


def test_first_metadata_of_an_arriving_series_opens_no_file(tmp_path: Path) -> None:
    storescu = require_tool("storescu")
    site = make_site(tmp_path)
    hook_dir, opens = tmp_path / "hook", tmp_path / "opens.log"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(HOOK)
    studies = str(site.data_dir / "studies")
    site.start_dicom()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook_dir),
                                                        os.environ.get("PYTHONPATH")])),
           "OPEN_AUDIT_DIR": studies, "OPEN_AUDIT_LOG": str(opens)}
    site.start("web", wait_port=site.web_port, env=env)
    conn = site.db()
    accounts.add_user(conn, "reader", "radiologist", "reader-password-1")
    token = tokens.create_token(conn, "reader")
    conn.close()
    s = requests.Session()
    s.trust_env = False
    s.verify = str(site.data_dir / "tls" / "ca.crt")
    s.headers["Authorization"] = f"Bearer {token}"

    study, series, paths = write_series(tmp_path / "ct", 6, rows=64, cols=64)
    url = (f"https://localhost:{site.web_port}/dicom-web/studies/{study}/series/{series}"
           "/metadata")
    _push(storescu, site, paths[:3])  # still arriving
    first = s.get(url)
    assert first.status_code == 200
    expected = _expected(paths, study, series)
    got = {m["00080018"]["Value"][0]: m for m in first.json()}
    assert got == {k: v for k, v in expected.items() if k in got} and len(got) == 3

    _push(storescu, site, paths[3:])
    full = s.get(url, headers={"If-None-Match": first.headers["ETag"]})
    assert full.status_code == 200  # more arrived: not 304
    assert {m["00080018"]["Value"][0]: m for m in full.json()} == expected
    assert opens.read_text() == ""  # neither answer opened a file of the study store

    # Corrected copies stored without the ingest hook (as identity reconciliation stores
    # them: same SOP Instance UIDs, other bytes) get their rows from the worker's sweep.
    plain = StudyStore(site.data_dir / "studies", site.data_dir / "appliance.db",
                       connect=db.connect)
    for p in paths[:2]:
        ds = pydicom.dcmread(p)
        ds.SeriesDescription = "CORRECTED"
        ds.save_as(p, enforce_file_format=True)
        assert plain.store(p.read_bytes(), calling_ae="TEST").outcome == "replaced"
    plain.close()
    while md.sweep(config.load(site.data_dir)):  # what the worker runs every sweep interval
        pass
    corrected = s.get(url)
    assert corrected.status_code == 200
    assert {m["00080018"]["Value"][0]: m for m in corrected.json()} == \
        _expected(paths, study, series)
    assert sum(m["0008103E"]["Value"] == ["CORRECTED"] for m in corrected.json()) == 2
    assert opens.read_text() == ""  # the corrected series answered from rows too
    # The hook is live in gunicorn's worker: a frame is read from its file, and shows here.
    sop = next(iter(expected))
    frame = s.get(url.replace("/metadata", f"/instances/{sop}/frames/1"), headers={
        "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"})
    assert frame.status_code == 200
    assert f"/{series}/" in opens.read_text()
    site.stop_all()
