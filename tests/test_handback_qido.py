"""Hand-back to a PACS with a DICOMweb URL: what it holds is asked by QIDO-RS (Orthanc's
DICOMweb plugin), never by C-FIND.  Orthanc here refuses our C-FINDs (``AllowFind: false``)
and logs each refusal, so a C-FIND would show in its log and would find nothing; proof of
delivery is by storage commitment.  A QIDO failure is a clear error that changes nothing;
``appliance ae add --dicomweb-url`` refuses a bad URL and leaves appliance.yaml as it was."""

from __future__ import annotations

import collections
import dataclasses
import json

import pytest
from conftest import free_port, require_tool
from forwarding_site import forwarding_site, ingest, pacs_sop_uids, sign_report, site_pacs
from orthanc import Orthanc

from appliance import cli
from appliance.core import config, db
from appliance.forwarding import handback, qido

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
REFUSED_FIND = "Rejected Find request"  # Orthanc's log line for a C-FIND it refuses


def qido_pacs(workdir) -> Orthanc:
    """Orthanc with its DICOMweb plugin that knows our node (FIELDAPP, for commitment
    reports) but refuses it C-FIND."""
    node_port = free_port()
    pacs = Orthanc(workdir, aet="SITEPACS", binary=require_tool("Orthanc", "/usr/sbin/Orthanc"),
                   extra_config={
                       "Plugins": [require_tool("orthanc-dicomweb", DICOMWEB_PLUGIN)],
                       "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                       "DicomModalities": {"FIELDAPP": {
                           "AET": "FIELDAPP", "Host": "127.0.0.1", "Port": node_port,
                           "AllowFind": False}}})
    pacs.node_port = node_port
    return pacs


@pytest.fixture
def pacs(tmp_path):
    p = qido_pacs(tmp_path / "orthanc")
    p.start()
    yield p
    p.stop(kill=True)


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """A command in-process; its exit code and what it printed (stdout, or the error)."""
    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_handback_asks_by_qido_and_never_opens_a_c_find(tmp_path, pacs, capsys, monkeypatch):
    from appliance.runtime import dicom_service

    site, cfg = forwarding_site(tmp_path, pacs, commitment=True,
                                dicomweb_url=f"{pacs.url}/dicom-web")
    for f in (site.data_dir / "workflows").glob("*.yaml"):
        f.unlink()
    monkeypatch.setattr(qido, "PAGE", 2)  # several pages per study from the real Orthanc
    studies = [ingest(site, 5, accession=f"ACC{i}") for i in range(3)]
    for path in studies[0][1]:  # on the PACS already, put there by hand
        pacs.upload(path.read_bytes())
    conn = db.connect(cfg.db_path)
    sign_report(conn, cfg, studies[1][0])
    d = ["--data-dir", str(site.data_dir)]
    node = dicom_service.build_node(cfg)  # receives Orthanc's commitment reports
    node.start()
    try:
        code, out = _cli(capsys, "handback", "--to", "SITEPACS", "--dry-run", "--json", *d)
        plan = json.loads(out)
        assert (plan["already_held"], plan["to_send"]) == (5, 10)  # C-FIND could not know
        code, out = _cli(capsys, "handback", "--to", "SITEPACS", "--json", *d)
        assert code == 0, out
        result = json.loads(out)
    finally:
        node.stop()
    assert result["sent"] == 10 and result["not_delivered"] == 0 and result["report_documents"] == 1
    held = collections.Counter(pacs_sop_uids(pacs))
    assert len(held) == 16 and set(held.values()) == {1}
    body = json.loads(open(result["manifest"]).read())["body"]
    proofs = collections.Counter(i["proof"] for st in body["studies"] for se in st["series"]
                                 for i in se["instances"])
    assert proofs == {"commitment": 10 + 1, "qido (already held)": 5}
    code, out = _cli(capsys, "handback", "verify", result["manifest"], "--to", "SITEPACS", *d)
    assert code == 0 and "1 report document(s) listed; 0 missing" in out, out

    gone = pacs.instances()[0]
    gone_uid = pacs.get(f"/instances/{gone}")["MainDicomTags"]["SOPInstanceUID"]
    pacs.request("DELETE", f"/instances/{gone}")
    code, out = _cli(capsys, "handback", "verify", result["manifest"], "--to", "SITEPACS",
                     "--host", "127.0.0.1", "--port", str(pacs.dicom_port),
                     "--dicomweb-url", f"{pacs.url}/dicom-web/",
                     "--public-key", str(site.data_dir / "keys" / "identity.pub"))
    assert code == 1 and f"missing {gone_uid}" in out and "1 missing on SITEPACS" in out, out
    assert REFUSED_FIND not in pacs.log_path.read_text(errors="replace")

    # The control: the same question by C-FIND is refused, logged, and finds nothing.
    peer = dataclasses.replace(cfg.known_ae("SITEPACS"), dicomweb_url="")
    asked = handback.held_by(cfg, peer, {(studies[0][0], s): set() for s in _series(conn)})
    assert not set().union(*asked.values())
    assert REFUSED_FIND in pacs.log_path.read_text(errors="replace")


def _series(conn) -> set[str]:
    return {r[0] for r in conn.execute("SELECT series_uid FROM series")}


@pytest.fixture
def plain_pacs(tmp_path):
    """An Orthanc without the DICOMweb plugin: /dicom-web answers 404."""
    p = site_pacs(tmp_path / "plain")
    p.start()
    yield p
    p.stop(kill=True)


@pytest.mark.parametrize("where, said", [("plugin-missing", "answered HTTP 404"),
                                         ("unreachable", "cannot reach http://127.0.0.1:")])
def test_a_qido_failure_is_a_clear_error_and_changes_nothing(tmp_path, plain_pacs, capsys,
                                                              where, said):
    url = (f"{plain_pacs.url}/dicom-web" if where == "plugin-missing"
           else f"http://127.0.0.1:{free_port()}/dicom-web")
    site, cfg = forwarding_site(tmp_path, plain_pacs, dicomweb_url=url)
    ingest(site, 3)
    conn = db.connect(cfg.db_path)
    before = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
    d = ["--data-dir", str(site.data_dir)]
    for argv in (["handback", "--to", "SITEPACS", *d],
                 ["handback", "--to", "SITEPACS", "--dry-run", *d]):
        code, out = _cli(capsys, *argv)
        assert code == 1 and "cannot ask SITEPACS what it holds by QIDO-RS" in out, out
        assert said in out, out
    assert conn.execute("SELECT COUNT(*) FROM forward_outbox").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM handback_progress").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0] == before
    assert plain_pacs.instances() == []


def test_ae_add_dicomweb_url_is_checked_stored_and_listed(tmp_path, capsys):
    from reporting_site import local_site

    site = local_site(tmp_path)
    path = site.data_dir / "appliance.yaml"
    d = ["--data-dir", str(site.data_dir)]
    original = path.read_bytes()
    for bad, why in (("ftp://pacs/dicom-web", "must be an http:// or https:// address"),
                     ("pacs:8042/dicom-web", "must be an http:// or https:// address"),
                     ("http://user:secret@pacs/dicom-web", "must not carry a user name"),
                     ("http://pacs:port/dicom-web", "must be an http:// or https:// address"),
                     ("", "must not be empty")):
        code, out = _cli(capsys, "ae", "add", "PACS2", "--host", "127.0.0.1", "--port", "104",
                         "--dicomweb-url", bad, *d)
        assert code == 1 and why in out and "--dicomweb-url" in out, (bad, out)
        assert "secret" not in out  # a refused value is never repeated (it may be a password)
        assert path.read_bytes() == original  # nothing changed
    code, out = _cli(capsys, "ae", "add", "PACS2", "--host", "127.0.0.1", "--port", "104",
                     "--dicomweb-url", "https://pacs.example.org:8443/dicom-web/", *d)
    assert code == 0 and "DICOMweb https://pacs.example.org:8443/dicom-web" in out, out
    assert config.load(site.data_dir).known_ae("PACS2").dicomweb_url == \
        "https://pacs.example.org:8443/dicom-web"
    code, out = _cli(capsys, "ae", "list", *d)
    assert "https://pacs.example.org:8443/dicom-web" in out
    code, out = _cli(capsys, "ae", "list", "--json", *d)
    assert json.loads(out)[0]["dicomweb_url"] == "https://pacs.example.org:8443/dicom-web"
    path.write_text(path.read_text().replace("https://pacs.example.org:8443/dicom-web",
                                             "gopher://pacs"))
    with pytest.raises(config.ConfigError, match=r"appliance\.yaml:\d+.*dicomweb_url"):
        config.load(site.data_dir)


class _OddServer:
    """A real HTTP server on loopback answering every QIDO search the same odd way."""

    def __init__(self, status: int, body: bytes, ctype: str = "application/dicom+json"):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _item(sop: str, series: str = "") -> dict:
    item = {"00080018": {"vr": "UI", "Value": [sop]}}
    if series:
        item["0020000E"] = {"vr": "UI", "Value": [series]}
    return item


@pytest.mark.parametrize("status, body, ctype, said", [
    (500, b'{"error": "db down"}', "application/json", "answered HTTP 500"),
    (200, b"<html>sign in</html>", "text/html", "something other than DICOM JSON"),
    (200, b'{"00080018": {}}', "application/dicom+json", "not a list of datasets"),
    (200, json.dumps([_item("1.1"), _item("1.2")]).encode(), "application/dicom+json",
     "does not page with limit/offset"),
])
def test_odd_qido_answers_are_errors_never_an_empty_or_full_holding(status, body, ctype, said,
                                                                    monkeypatch):
    monkeypatch.setattr(qido, "PAGE", 2)  # a full page asks for the next one
    server = _OddServer(status, body, ctype)
    try:
        with pytest.raises(qido.QidoError, match=said):
            qido.held(server.url, {("1", "1.9"): {"1.1", "1.2", "1.3"}}, timeout=5)
    finally:
        server.close()


def test_a_204_is_nothing_held_and_answers_without_a_series_are_placed_by_sop_uid():
    server = _OddServer(204, b"")
    try:
        assert qido.held(server.url, {("1", "1.9"): {"1.1"}}, timeout=5) == {("1", "1.9"): set()}
    finally:
        server.close()
    server = _OddServer(200, json.dumps([_item("1.1"), _item("1.7", "1.8")]).encode())
    try:
        got = qido.held(server.url, {("1", "1.9"): {"1.1", "1.2"}, ("1", "1.8"): set()}, 5)
        assert got == {("1", "1.9"): {"1.1"}, ("1", "1.8"): {"1.7"}}
    finally:
        server.close()
