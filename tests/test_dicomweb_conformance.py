"""DICOMweb conformance: the independent ``dicomweb-client`` against a running ``appliance web``.

Studies are pushed with dcmtk ``storescu`` into the running DICOM node, then
searched, retrieved and stored over HTTPS with the site's CA; every answer is
compared with the files that were pushed.
"""

from __future__ import annotations

import gzip
import io
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import urljoin

import pydicom
import pytest
import requests
from conftest import make_site, require_tool
from dicom_data import make_instance, write_series
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.uid import generate_uid

from appliance.accounts import tokens
from appliance.accounts import users as accounts


class Deployment:
    """One site with DICOM and web running, two pushed studies, and readers with tokens."""

    def __init__(self, base: Path):
        storescu = require_tool("storescu")
        self.site = make_site(base)
        self.site.start_dicom()
        self.site.start("web", wait_port=self.site.web_port)
        self.url = f"https://localhost:{self.site.web_port}/dicom-web"
        self.ca = str(self.site.data_dir / "tls" / "ca.crt")
        self.ours = write_series(base / "ours", 4, rows=64, cols=48, patient_id="PID-OURS",
                                 institution="Field Hospital")
        self.theirs = write_series(base / "theirs", 2, patient_id="PID-THEIRS",
                                   institution="Other Hospital", study_date="20200101")
        for _, _, paths in (self.ours, self.theirs):
            subprocess.run([storescu, "-aec", self.site.ae_title, "localhost",
                            str(self.site.dicom_port), *map(str, paths)], check=True,
                           capture_output=True, timeout=60)
        conn = self.site.db()
        accounts.add_user(conn, "reader", "radiologist", "reader-password-1")
        accounts.add_user(conn, "scoped", "radiologist", "scoped-password-1",
                          tags="pool:neuro,site:Field Hospital")
        accounts.add_user(conn, "staff", "site_staff", "staff-password-1")
        self.tokens = {u: tokens.create_token(conn, u) for u in ("reader", "scoped", "staff")}
        conn.close()

    def session(self, user: str | None = "reader") -> requests.Session:
        s = requests.Session()
        s.trust_env = False  # REQUESTS_CA_BUNDLE would override the site CA
        s.verify = self.ca
        if user:
            s.headers["Authorization"] = f"Bearer {self.tokens[user]}"
        return s

    def client(self, user: str = "reader") -> DICOMwebClient:
        return DICOMwebClient(self.url, session=self.session(user))


@pytest.fixture(scope="module")
def dw(tmp_path_factory: pytest.TempPathFactory):
    d = Deployment(tmp_path_factory.mktemp("dicomweb"))
    yield d
    d.site.stop_all()


def _uids(results: list[dict], tag: str) -> set[str]:
    return {r[tag]["Value"][0] for r in results}


def test_search_three_levels_matches_pushed_files(dw: Deployment) -> None:
    client = dw.client()
    study, series, paths = dw.ours
    found = client.search_for_studies(search_filters={"PatientID": "PID-OURS"})
    assert _uids(found, "0020000D") == {study}
    assert found[0]["00201208"]["Value"] == [len(paths)]
    by_tag = client.search_for_studies(search_filters={"00100020": "PID-OURS"})  # OHIF's priors
    assert _uids(by_tag, "0020000D") == {study}
    assert _uids(client.search_for_series(study), "0020000E") == {series}
    pushed = {pydicom.dcmread(p).SOPInstanceUID for p in paths}
    assert _uids(client.search_for_instances(study, series), "00080018") == pushed
    assert _uids(client.search_for_instances(search_filters={"PatientID": "PID-OURS"}),
                 "00080018") == pushed
    dated = client.search_for_studies(search_filters={"StudyDate": "20191201-20200201"})
    assert _uids(dated, "0020000D") == {dw.theirs[0]}
    page = client.search_for_studies(limit=1, offset=0)
    assert len(page) == 1


def test_retrieve_metadata_frames_rendered_bulkdata(dw: Deployment) -> None:
    client = dw.client()
    study, series, paths = dw.ours
    files = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, paths)}
    got = client.retrieve_study(study)
    assert {ds.SOPInstanceUID: ds.PixelData for ds in got} == {
        k: v.PixelData for k, v in files.items()}
    assert len(client.retrieve_series(study, series)) == len(paths)
    sop = next(iter(files))
    inst = client.retrieve_instance(study, series, sop)
    assert inst.PatientID == "PID-OURS" and inst.PixelData == files[sop].PixelData

    meta = client.retrieve_series_metadata(study, series)
    assert len(meta) == len(paths)
    one = next(m for m in meta if m["00080018"]["Value"] == [sop])
    assert one["00100010"]["Value"][0]["Alphabetic"] == str(files[sop].PatientName)
    bulk_uri = one["7FE00010"]["BulkDataURI"]
    # No web.public_url configured: a path-absolute reference, resolved against our address.
    assert bulk_uri.startswith(f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/")
    assert client.retrieve_bulkdata(urljoin(dw.url, bulk_uri))[0] == files[sop].PixelData
    assert len(client.retrieve_study_metadata(study)) == len(paths)
    assert client.retrieve_instance_metadata(study, series, sop)["00080018"]["Value"] == [sop]

    frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
    assert frames == [files[sop].PixelData]
    png = client.retrieve_instance_rendered(study, series, sop, media_types=("image/png",))
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (48, 64)


def test_urls_never_come_from_the_host_header(dw: Deployment) -> None:
    """A forged Host header must not steer the links we hand out; web.public_url does."""
    from appliance.app import create_app
    from appliance.core import config

    study, series, paths = dw.ours
    s = dw.session()
    evil = {"Host": "evil.example"}
    found = s.get(f"{dw.url}/studies", params={"StudyInstanceUID": study}, headers=evil)
    meta = s.get(f"{dw.url}/studies/{study}/series/{series}/metadata", headers=evil)
    stow = s.post(f"{dw.url}/studies", headers={**evil, "Content-Type":
                  'multipart/related; type="application/dicom"; boundary=XX'},
                  data=b"--XX\r\nContent-Type: application/dicom\r\n\r\nbad\r\n--XX--\r\n")
    assert found.status_code == 200 and meta.status_code == 200 and stow.status_code == 409
    for r in (found, meta, stow):
        assert "evil.example" not in r.text
    assert found.json()[0]["00081190"]["Value"] == [f"/dicom-web/studies/{study}"]
    uris = {m["7FE00010"]["BulkDataURI"] for m in meta.json()}
    assert len(uris) == len(paths) and all(u.startswith("/dicom-web/studies/") for u in uris)

    cfg = config.load(dw.site.data_dir)
    cfg["web"]["public_url"] = "https://pacs.example.org:8443/"
    client = create_app(cfg).test_client()
    auth = {"Authorization": s.headers["Authorization"], "Host": "evil.example"}
    meta = client.get(f"/dicom-web/studies/{study}/series/{series}/metadata", headers=auth,
                      base_url="https://evil.example")
    assert meta.status_code == 200 and "evil.example" not in meta.get_data(as_text=True)
    assert all(m["7FE00010"]["BulkDataURI"].startswith(
        f"https://pacs.example.org:8443/dicom-web/studies/{study}/") for m in meta.json)


def test_public_url_must_be_an_address(dw: Deployment) -> None:
    from appliance.core import config

    path = dw.site.data_dir / "appliance.yaml"
    text = path.read_text()
    assert 'public_url: ""' in text
    bad = dw.site.data_dir.parent / "bad-public-url"
    bad.mkdir()
    (bad / "appliance.yaml").write_text(text.replace('public_url: ""',
                                                     'public_url: "pacs.example.org"'))
    with pytest.raises(config.ConfigError, match="public_url"):
        config.load(bad)


def test_frames_stored_syntax_gzip_and_etag(dw: Deployment) -> None:
    s = dw.session()
    study, series, paths = dw.ours
    ds = pydicom.dcmread(paths[0])
    url = f"{dw.url}/studies/{study}/series/{series}/instances/{ds.SOPInstanceUID}/frames/1"
    ohif = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
    r = s.get(url, headers={"Accept": ohif, "Accept-Encoding": "gzip"}, stream=True)
    assert r.status_code == 200
    assert r.headers["Content-Encoding"] == "gzip" and "immutable" in r.headers["Cache-Control"]
    raw = gzip.decompress(r.raw.read())
    assert ds.PixelData in raw and b"transfer-syntax=1.2.840.10008.1.2.1" in raw
    again = s.get(url, headers={"Accept": ohif, "If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304
    thumb = s.get(f"{dw.url}/studies/{study}/series/{series}/thumbnail",
                  params={"accept": "image/png"}, headers={"Accept": "image/jpeg"})
    assert thumb.headers["Content-Type"] == "image/png"  # the accept parameter wins
    jls = s.get(url, headers={"Accept": 'multipart/related; type="image/jls"'})
    assert jls.status_code == 406 and "cannot transcode" in jls.json()["error"]
    assert "image/dicom-rle; transfer-syntax=1.2.840.10008.1.2.5" in jls.json()["error"]


@pytest.mark.parametrize(("media", "ts"), [("image/dicom-rle", "1.2.840.10008.1.2.5"),
                                            ("image/jp2", "1.2.840.10008.1.2.4.90")])
def test_frames_transcoded_losslessly_for_dicomweb_client(dw: Deployment, media: str,
                                                          ts: str) -> None:
    from pydicom.encaps import encapsulate

    study, series, paths = dw.ours
    ds = pydicom.dcmread(paths[2])
    frames = dw.client().retrieve_instance_frames(study, series, ds.SOPInstanceUID,
                                                  frame_numbers=[1], media_types=((media, ts),))
    assert len(frames) == 1 and frames[0] != ds.PixelData
    ds.file_meta.TransferSyntaxUID = ts
    original = pydicom.dcmread(paths[2]).pixel_array
    ds.PixelData = encapsulate(frames)
    assert (ds.pixel_array == original).all()  # lossless: every pixel back
    r = dw.session().get(f"{dw.url}/studies/{study}/series/{series}/instances/"
                         f"{ds.SOPInstanceUID}/frames/1", headers={
                             "Accept": f'multipart/related; type="{media}"; transfer-syntax={ts}'})
    assert r.headers["Content-Type"].startswith(f'multipart/related; type="{media}"')
    assert "Content-Encoding" not in r.headers  # compressed already: no gzip on top


def test_store_goes_through_the_durable_path_and_failures_stand_alone(dw: Deployment) -> None:
    client = dw.client()
    study = generate_uid()
    good = make_instance(study, generate_uid(), 0, patient_id="PID-STOW")
    client.store_instances([good])
    conn = dw.site.db()
    row = conn.execute("SELECT calling_ae, path FROM instances WHERE sop_uid = ?",
                       (good.SOPInstanceUID,)).fetchone()
    assert row["calling_ae"] == "STOW"
    assert (dw.site.data_dir / "studies" / row["path"]).is_file()

    # One good part and one malformed part: the good one is stored, the bad one reported.
    second = make_instance(study, generate_uid(), 1, patient_id="PID-STOW")
    buf = io.BytesIO()
    second.save_as(buf, enforce_file_format=True)
    body = (b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + buf.getvalue() +
            b"\r\n--XX\r\nContent-Type: application/dicom\r\n\r\nnot dicom at all\r\n--XX--\r\n")
    r = dw.session().post(f"{dw.url}/studies", data=body, headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'})
    assert r.status_code == 202, r.text
    answer = r.json()
    assert len(answer["00081199"]["Value"]) == 1 and len(answer["00081198"]["Value"]) == 1
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert conn.execute("SELECT 1 FROM instances WHERE sop_uid = ?",
                        (second.SOPInstanceUID,)).fetchone()
    # Storing into /studies/{uid} a dataset of another study fails that part.
    r = dw.session().post(f"{dw.url}/studies/{generate_uid()}", data=body.replace(
        b"not dicom at all", b""), headers={
        "Content-Type": 'multipart/related; type="application/dicom"; boundary=XX'})
    assert r.status_code == 409
    actions = {a for (a,) in conn.execute("SELECT action FROM audit WHERE actor = 'reader'")}
    assert {"dicomweb.store", "dicomweb.search"} <= actions
    conn.close()


def test_bad_input_and_access(dw: Deployment) -> None:
    study, series, paths = dw.ours
    s = dw.session()
    assert s.get(f"{dw.url}/studies/{generate_uid()}/metadata").status_code == 404
    assert s.get(f"{dw.url}/studies/{study}/series/{generate_uid()}").status_code == 404
    bad = s.get(f"{dw.url}/studies", params={"limit": "lots"})
    assert bad.status_code == 400 and "limit" in bad.json()["error"]
    bad = s.get(f"{dw.url}/studies", params={"NotAnAttribute": "x"})
    assert bad.status_code == 400 and "unknown query parameter" in bad.json()["error"]
    r = s.post(f"{dw.url}/studies", data=b"--XX\r\nContent-Type: application/dicom\r\n\r\nabc",
               headers={"Content-Type": 'multipart/related; type="application/dicom"; '
                                        "boundary=XX"})
    assert r.status_code in (400, 409) and r.text
    assert dw.session(None).get(f"{dw.url}/studies").status_code == 401
    assert dw.session("staff").get(f"{dw.url}/studies").status_code == 403  # not a reader
    scoped = dw.session("scoped")
    seen = _uids(scoped.get(f"{dw.url}/studies").json(), "0020000D")
    assert study in seen and dw.theirs[0] not in seen
    denied = scoped.get(f"{dw.url}/studies/{dw.theirs[0]}/metadata")
    assert denied.status_code == 403
    assert scoped.get(f"{dw.url}/studies/{study}/metadata").status_code == 200
    conn = dw.site.db()
    assert conn.execute("SELECT 1 FROM audit WHERE actor = 'scoped' AND action = 'dicomweb.denied'"
                        " AND object = ?", (dw.theirs[0],)).fetchone()
    # A break-glass grant (typed reason, made at /break-glass) opens that one study.
    conn.execute("INSERT INTO break_glass (ts, user_id, study_uid, reason, address, expires_at)"
                 " SELECT ?, id, ?, 'stroke alert, covering', '127.0.0.1', ? FROM users"
                 " WHERE username = 'scoped'", (time.time(), dw.theirs[0], time.time() + 3600))
    conn.close()
    assert scoped.get(f"{dw.url}/studies/{dw.theirs[0]}/metadata").status_code == 200


def test_retrievals_are_audited(dw: Deployment) -> None:
    study, series, paths = dw.ours
    sop = pydicom.dcmread(paths[1]).SOPInstanceUID
    s = dw.session()
    base = f"{dw.url}/studies/{study}/series/{series}/instances/{sop}"
    assert s.get(f"{base}/frames/1").status_code == 200
    assert s.get(f"{base}/rendered").status_code == 200
    conn = dw.site.db()
    actions = {r["action"] for r in conn.execute(
        "SELECT action FROM audit WHERE actor = 'reader' AND object = ?", (study,))}
    conn.close()
    assert {"dicomweb.frames", "dicomweb.rendered"} <= actions


def test_viewer_is_served_with_our_config(dw: Deployment) -> None:
    from appliance.dicomweb import viewer

    s = dw.session()
    base = f"https://localhost:{dw.site.web_port}"
    assert dw.session(None).get(f"{base}/viewer", headers={"Accept": "application/json"}
                                ).status_code == 401
    cfg = s.get(f"{base}/viewer/app-config.js")
    assert cfg.status_code == 200 and "/dicom-web" in cfg.text
    assert "investigationalUseDialog: { option: 'never' }" in cfg.text
    if not viewer.installed():
        require_tool("OHIF (provisioning/fetch-viewer.sh, make viewer)",
                     str(viewer.VIEWER_DIR / "index.html"))
    page = s.get(f"{base}/viewer", params={"StudyInstanceUIDs": dw.ours[0]})
    assert page.status_code == 200 and f"/viewer/{viewer.version()}/app.bundle." in page.text
    # Our config is inlined (no round trip before OHIF starts), and the page fetches
    # ahead what OHIF asks first for this study (appliance/viewer_preload.py).
    assert "investigationalUseDialog" in page.text and 'app-config.js"' not in page.text
    assert '[["/dicom-web/studies?limit=101' in page.text
    assert f"/dicom-web/studies/{dw.ours[0]}/series/{dw.ours[1]}/metadata" in page.text
    assert page.headers["Cache-Control"] == "no-store"
    # Nothing about a study of another site for a site-scoped reader, nor an unknown one.
    third = make_instance(generate_uid(), generate_uid(), 0, institution="Third Hospital")
    dw.client().store_instances([third])
    for uid in (third.StudyInstanceUID, generate_uid()):
        other = dw.session("scoped").get(f"{base}/viewer", params={"StudyInstanceUIDs": uid})
        assert other.status_code == 200 and "/dicom-web/studies" not in other.text
        assert third.SeriesInstanceUID not in other.text
    bundle = re.search(r'src="(/viewer/[0-9.]+/app\.bundle\.[0-9a-f]+\.js)"', page.text).group(1)
    js = s.get(base + bundle, headers={"Accept-Encoding": "gzip"}, stream=True)
    assert js.status_code == 200 and "immutable" in js.headers["Cache-Control"]
    assert js.headers["Content-Encoding"] == "gzip"  # the pre-compressed twin
    gz_size = int(js.headers["Content-Length"])
    if (viewer.VIEWER_DIR / (bundle.rsplit("/", 1)[1] + ".br")).is_file():
        br = s.get(base + bundle, headers={"Accept-Encoding": "gzip, deflate, br"}, stream=True)
        assert br.headers["Content-Encoding"] == "br" and "Accept-Encoding" in br.headers["Vary"]
        assert int(br.headers["Content-Length"]) < gz_size * 0.85
        refused = s.get(base + bundle, headers={"Accept-Encoding": "br;q=0, gzip"}, stream=True)
        assert refused.headers["Content-Encoding"] == "gzip"
    css = s.get(f"{base}/viewer/{viewer.version()}/app.bundle.css")  # unhashed, but versioned
    assert css.status_code == 200 and "immutable" in css.headers["Cache-Control"]
    cfg = s.get(f"{base}/viewer/{viewer.version()}/app-config.js")
    assert "no-cache" in cfg.headers["Cache-Control"] and "/dicom-web" in cfg.text
