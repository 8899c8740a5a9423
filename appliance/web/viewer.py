"""The diagnostic viewer at ``/viewer``: the prebuilt OHIF v3 over our own ``/dicom-web``.

``provisioning/fetch-viewer.sh`` puts the pinned build in ``static/viewer/``
(git-ignored), re-based to ``/viewer/`` and with ``.gz`` twins of its large
files. This blueprint serves it to signed-in readers with our own
``app-config.js`` (same-origin DICOMweb, no study list, no splash or tour).
OHIF's route for a study is ``/viewer?StudyInstanceUIDs=<uid>``, which is
also what the worklist links to.

Caching: files whose names carry a content hash are immutable for a year, so
a reader on a thin link downloads the 5 MB app once; ``index.html`` and the
config are revalidated every time.
"""

from __future__ import annotations

import re
from pathlib import Path

from flask import Blueprint, Response, abort, request, send_file

from appliance.web import auth

bp = Blueprint("viewer", __name__)

ROLES = ("admin", "radiologist", "neurologist")
VIEWER_DIR = Path(__file__).resolve().parent / "static" / "viewer"
HASHED = re.compile(r"\.[0-9a-f]{16,}\.|^[0-9a-f]{16,}\.")  # webpack content-hashed names
IMMUTABLE = "public, max-age=31536000, immutable"

# Our OHIF configuration, with the CT head (stroke) hanging protocol (see that file).
APP_CONFIG = (Path(__file__).resolve().parent / "static" / "viewer-app-config.js").read_text()


def installed() -> bool:
    return (VIEWER_DIR / "index.html").is_file()


def _missing() -> Response:
    return Response("The viewer is not installed on this appliance: run "
                    "provisioning/fetch-viewer.sh (make viewer).\n", status=503,
                    mimetype="text/plain")


def _index() -> Response:
    if not installed():
        return _missing()
    resp = send_file(VIEWER_DIR / "index.html", mimetype="text/html", conditional=True)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


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
    gz = path.with_name(path.name + ".gz")
    use_gz = gz.is_file() and "gzip" in request.headers.get("Accept-Encoding", "")
    resp = send_file(gz if use_gz else path, conditional=True,
                     mimetype=_mimetype(path.name))
    if use_gz:
        resp.headers["Content-Encoding"] = "gzip"
    resp.headers["Vary"] = "Accept-Encoding"
    immutable = versioned or HASHED.search(path.name)
    resp.headers["Cache-Control"] = IMMUTABLE if immutable else "no-cache"
    return resp


def _mimetype(name: str) -> str | None:
    import mimetypes

    if name.endswith(".wasm"):
        return "application/wasm"
    if name.endswith(".js") or name.endswith(".mjs"):
        return "application/javascript"
    return mimetypes.guess_type(name)[0]
