"""The diagnostic viewer at ``/viewer``: the prebuilt OHIF v3 over our own ``/dicom-web``.

``provisioning/fetch-viewer.sh`` puts the pinned build in ``static/viewer/``
(git-ignored), re-based to ``/viewer/`` and with ``.br`` and ``.gz`` twins of
its large files (brotli is ~30 % smaller; browsers send it over HTTPS). This
blueprint serves it to signed-in readers with our own configuration
(``static/viewer-app-config.js``: same-origin DICOMweb, no study list, no
splash or tour, the CT head hanging protocol), inlined into the page. OHIF's
route for a study is ``/viewer?StudyInstanceUIDs=<uid>``, which is also what
the worklist links to; that page also fetches ahead what OHIF will ask first
(:mod:`appliance.viewer_preload`).

Caching: the build's files are immutable for a year (versioned prefix or
content-hashed names), so a reader on a thin link downloads the 4 MB app
once; the page itself is never stored.
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from flask import Blueprint, Response, abort, request, send_file

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.dicomweb import viewer_preload
from appliance.web import get_db

bp = Blueprint("viewer", __name__)

ROLES = permissions.IMAGE_VIEWERS
WEB_STATIC = Path(__file__).resolve().parent.parent / "web" / "static"
VIEWER_DIR = WEB_STATIC / "viewer"
HASHED = re.compile(r"\.[0-9a-f]{16,}\.|^[0-9a-f]{16,}\.")  # webpack content-hashed names
IMMUTABLE = "public, max-age=31536000, immutable"

# Our OHIF configuration, with the CT head (stroke) hanging protocol (see that file).
APP_CONFIG = (WEB_STATIC / "viewer-app-config.js").read_text()


def installed() -> bool:
    return (VIEWER_DIR / "index.html").is_file()


def _missing() -> Response:
    return Response("The viewer is not installed on this appliance: run "
                    "provisioning/fetch-viewer.sh (make viewer).\n", status=503,
                    mimetype="text/plain")


_page_cache: dict[str, tuple[float, str]] = {}


def _page_template() -> str:
    """OHIF's index.html with its two small start-up scripts inlined (made once per build).

    ``app-config.js`` and ``init-service-worker.js`` run before the app bundle,
    so each was a round trip on every open even with the build cached (the page
    is never cached: it is the one file that says which build to use).
    """
    path = VIEWER_DIR / "index.html"
    mtime = path.stat().st_mtime
    cached = _page_cache.get("page")
    if cached and cached[0] == mtime:
        return cached[1]
    page = path.read_text()
    prefix = f"/viewer/{version()}/" if version() else "/viewer/"
    config_tag = f'<script rel="preload" as="script" src="{prefix}app-config.js"></script>'
    if config_tag in page and "</script" not in APP_CONFIG:
        page = page.replace(config_tag, f"<script>{APP_CONFIG}</script>")
    sw_tag = (f'<script rel="preload" as="script" type="module" '
              f'src="{prefix}init-service-worker.js"></script>')
    sw = VIEWER_DIR / "init-service-worker.js"
    if sw_tag in page and sw.is_file() and "</script" not in sw.read_text():
        page = page.replace(sw_tag, f'<script type="module">{sw.read_text()}</script>')
    _page_cache["page"] = (mtime, page)
    return page


def preload_script(study_uid: str) -> str:
    """A script fetching the DICOMweb requests OHIF makes first for this study, right away.

    Their answers wait in the browser's HTTP cache for OHIF to ask (see
    :mod:`appliance.viewer_preload`); a failed fetch is only a missed head start.
    """
    if not study_uid or not viewer_preload.UID.match(study_uid) \
            or not permissions.may_see(study_uid):
        return ""
    urls = viewer_preload.first_requests(get_db(), study_uid)
    if not urls:
        return ""
    pairs = json.dumps([[u, viewer_preload.accept_for(u)] for u in urls]).replace("</", "<\\/")
    return ("<script>" + pairs + ".forEach(function (p) { fetch(p[0], { headers: { Accept: p[1] } })"
            ".then(function (r) { return r.arrayBuffer(); }).catch(function () {}); });</script>")


def _index() -> Response:
    """The viewer page: preloads for the study being opened first, then OHIF's own head."""
    if not installed():
        return _missing()
    study = (request.args.get("StudyInstanceUIDs") or request.args.get("studyInstanceUIDs")
             or "").split(",")[0].strip()
    page = _page_template().replace("<head>", "<head>" + preload_script(study), 1)
    # no-store: the page names the study's series and images; it is small and never reused.
    body, headers = page.encode("utf-8"), {"Cache-Control": "no-store", "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        body, headers["Content-Encoding"] = gzip.compress(body, 6), "gzip"
    return Response(body, mimetype="text/html", headers=headers)


@bp.get("/viewer")
@auth.require(*ROLES)
def viewer_index():
    return _index()


@bp.get("/viewer/app-config.js")
@auth.require(*ROLES)
def viewer_config():
    """Our OHIF configuration; never cached, so a change reaches readers at once."""
    return Response(APP_CONFIG, mimetype="application/javascript",
                    headers={"Cache-Control": "no-cache"})


def version() -> str:
    """The installed OHIF version: the build's files live under ``/viewer/<version>/``."""
    try:
        return (VIEWER_DIR / "OHIF_VERSION").read_text().strip()
    except OSError:
        return ""


@bp.get("/viewer/<path:name>")
@auth.require(*ROLES)
def viewer_file(name: str):
    """A file of the build (gzip twin when accepted), or the app itself for OHIF's routes.

    Under the versioned prefix every file is immutable (a new OHIF version has a
    new prefix), so a reader's browser fetches the build once and then never
    asks again, not even to revalidate: on a 300 ms link each revalidation of
    a lazily loaded chunk would cost a round trip.
    """
    if not installed():
        return _missing()
    prefix = version() + "/"
    versioned = bool(version()) and name.startswith(prefix)
    if versioned:
        name = name[len(prefix):]
    if name == "app-config.js":
        return viewer_config()
    path = (VIEWER_DIR / name).resolve()
    if not path.is_relative_to(VIEWER_DIR):
        abort(404)
    if not path.is_file():
        if "." in name.rsplit("/", 1)[-1]:
            abort(404)
        return _index()  # a client-side route such as /viewer/viewer/ohif
    twin, encoding = _twin(path, request.headers.get("Accept-Encoding", ""))
    resp = send_file(twin, conditional=True, mimetype=_mimetype(path.name))
    if encoding:
        resp.headers["Content-Encoding"] = encoding
    resp.headers["Vary"] = "Accept-Encoding"
    immutable = versioned or HASHED.search(path.name)
    resp.headers["Cache-Control"] = IMMUTABLE if immutable else "no-cache"
    return resp


def _accepts(accept_encoding: str, coding: str) -> bool:
    """Whether ``coding`` is in an Accept-Encoding header and not refused with q=0."""
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() == coding:
            key, _, value = params.replace(" ", "").partition("=")
            try:
                return key.lower() != "q" or float(value) > 0
            except ValueError:
                return False
    return False


def _twin(path: Path, accept_encoding: str) -> tuple[Path, str]:
    """The pre-compressed twin to send (brotli, else gzip, else the file) and its coding."""
    for suffix, coding in ((".br", "br"), (".gz", "gzip")):
        twin = path.with_name(path.name + suffix)
        if _accepts(accept_encoding, coding) and twin.is_file():
            return twin, coding
    return path, ""


def _mimetype(name: str) -> str | None:
    import mimetypes

    if name.endswith(".wasm"):
        return "application/wasm"
    if name.endswith(".js") or name.endswith(".mjs"):
        return "application/javascript"
    return mimetypes.guess_type(name)[0]
