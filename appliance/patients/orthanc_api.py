"""The few calls of an Orthanc REST API that removing a superseded copy needs.

Orthanc names an instance by a hash of (PatientID, Study, Series, SOP Instance UID), so after
a reconciliation the corrected copy is a second Orthanc instance beside the old one, and only
its REST API can delete the old one (DICOM has no delete).  A destination declares its API
with ``appliance ae add NAME … --orthanc-url URL``; a user and password, when the API asks
for them, are read from ``patients.pacs_credentials_file`` (``AE = user:password`` lines,
mode 0600), never from appliance.yaml, a command line, a URL or a log line.

Every lookup is exact: ``/tools/find`` treats ``*`` and ``?`` as wildcards, so each instance
it returns is checked again (its own SOP Instance UID, its patient's ID) before anyone acts
on it.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from appliance.core import config


class ApiError(Exception):
    """The API did not answer, refused us, or answered something unexpected."""


class CredentialsError(ApiError):
    """The credentials file is unreadable, readable by others, or malformed."""


def read_credentials(path: Path) -> dict[str, tuple[str, str]]:
    """``AE = user:password`` lines → {AE: (user, password)}; refused unless only its owner
    may read it (the password may hold ``:``, the user may not, as in HTTP Basic)."""
    text = config.read_secret_file(path, CredentialsError)
    out: dict[str, tuple[str, str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        user, colon, password = value.strip().partition(":")
        if not sep or not name.strip() or not colon or not user:
            raise CredentialsError(f"{path}:{n}: expected AE_TITLE = user:password")
        out[name.strip()] = (user, password)
    return out


class OrthancApi:
    """One destination's Orthanc REST API (``base`` without a trailing slash)."""

    def __init__(self, base: str, auth: tuple[str, str] | None = None, timeout: float = 10.0):
        self.base = base.rstrip("/")
        self.timeout = timeout
        self._auth = None
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")
            self._auth = f"Basic {token}"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        """One request; the parsed JSON answer (None for 404). The Authorization header is
        unredirected, so a redirect never carries the password elsewhere."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self._auth:
            req.add_unredirected_header("Authorization", self._auth)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            if e.code in (401, 403):
                raise ApiError(f"{self.base} refused our credentials (HTTP {e.code}): check"
                               " patients.pacs_credentials_file") from None
            raise ApiError(f"{self.base}{path.split('?')[0]}: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ApiError(f"{self.base} did not answer: {reason}") from None
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ApiError(f"{self.base}{path}: not a JSON answer (is this an Orthanc?)") from None

    def copies(self, patient_id: str, study_uid: str, series_uid: str,
               sop_uid: str) -> list[str]:
        """Orthanc ids of the copies of one SOP Instance filed under exactly this Patient ID."""
        found = self._call("POST", "/tools/find", {
            "Level": "Instance", "Expand": True,
            "Query": {"PatientID": patient_id, "StudyInstanceUID": study_uid,
                      "SeriesInstanceUID": series_uid, "SOPInstanceUID": sop_uid}})
        if not isinstance(found, list):
            raise ApiError(f"{self.base}/tools/find: unexpected answer")
        out = []
        for inst in found:
            if inst.get("MainDicomTags", {}).get("SOPInstanceUID") != sop_uid:
                continue
            if self.patient_id(inst["ID"]) == patient_id:
                out.append(inst["ID"])
        return out

    def patient_id(self, instance_id: str) -> str | None:
        """The Patient ID Orthanc files this instance under (None: no such instance)."""
        patient = self._call("GET", f"/instances/{instance_id}/patient")
        return None if patient is None else patient.get("MainDicomTags", {}).get("PatientID", "")

    def delete(self, instance_id: str) -> bool:
        """Delete one instance; True when it is gone afterwards (already gone counts)."""
        self._call("DELETE", f"/instances/{instance_id}")
        return self._call("GET", f"/instances/{instance_id}") is None
