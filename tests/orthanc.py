"""A real Orthanc (Debian's package) for tests and benchmarks: the "site PACS".

Each :class:`Orthanc` has its own temporary storage and index directories and
free DICOM/HTTP ports on loopback, so tests never share state with each other
or with an Orthanc the machine may run.  It can be stopped and started again
on the same storage (the retry test needs a PACS that goes away and comes back).

Usage::

    with Orthanc(tmp_path / "pacs", aet="SITEPACS") as pacs:
        pacs.wait_ready()
        pacs.instances()            # ["<orthanc id>", ...]
        pacs.simplified_tags(id)    # {"PatientID": ..., ...}

or the ``orthanc`` pytest fixture below (import it into a test module with
``from orthanc import orthanc  # noqa: F401``).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, require_tool

ORTHANC_BIN = "/usr/sbin/Orthanc"
STARTED: list[Orthanc] = []  # every Orthanc a test started; conftest stops them at the end


class Orthanc:
    """One Orthanc process with its own configuration, storage and ports."""

    def __init__(self, workdir: Path, aet: str = "SITEPACS", binary: str = ORTHANC_BIN,
                 dicom_port: int | None = None, http_port: int | None = None,
                 extra_config: dict[str, Any] | None = None,
                 auth: tuple[str, str] | None = None):
        self.workdir = Path(workdir)
        self.auth = auth  # (user, password) when the REST API asks for them
        self.aet = aet
        self.binary = binary
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.proc: subprocess.Popen | None = None
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        config = {
            "Name": f"test-{aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": auth is not None,
            "RegisteredUsers": {auth[0]: auth[1]} if auth else {},
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "Plugins": [],
            "StableAge": 1,
        }
        config.update(extra_config or {})
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    # -- process --------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start Orthanc and return once its REST API answers."""
        if self.running:
            return self
        log = open(self.log_path, "ab")
        # DCMTK inside Orthanc leaves Nagle on unless told (FIELD-NOTES).
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([self.binary, str(self.config_path)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        STARTED.append(self)
        self.wait_ready(timeout)
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL; at once with ``kill``) and wait for its exit."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        if kill:  # its shutdown takes seconds; a throwaway test PACS need not wait for it
            proc.kill()
            proc.wait()
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; log:\n"
                                   + self.log_path.read_text(errors="replace")[-2000:])
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                last = e
                time.sleep(0.1)
        raise TimeoutError(f"Orthanc REST API did not answer in {timeout} s: {last}")

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST -------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        if self.auth:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def instances(self) -> list[str]:
        return self.get("/instances")

    def simplified_tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/simplified-tags")

    def tags(self, instance_id: str) -> dict[str, Any]:
        return self.get(f"/instances/{instance_id}/tags")

    def file(self, instance_id: str) -> bytes:
        return self.request("GET", f"/instances/{instance_id}/file")

    def pdf(self, instance_id: str) -> bytes:
        """The document of an Encapsulated PDF instance."""
        return self.request("GET", f"/instances/{instance_id}/pdf")

    def studies(self) -> list[str]:
        return self.get("/studies")

    def upload(self, part10: bytes) -> dict[str, Any]:
        return json.loads(self.request("POST", "/instances", part10, "application/dicom"))

    def find(self, query: dict[str, str], level: str = "Instance") -> list[str]:
        """Orthanc ids at ``level`` matching ``query`` (``/tools/find``), e.g. by PatientID."""
        return json.loads(self.request("POST", "/tools/find", json.dumps(
            {"Level": level, "Query": query}).encode()))

    def delete(self, instance_id: str) -> None:
        self.request("DELETE", f"/instances/{instance_id}")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A running Orthanc named SITEPACS with its own storage; stopped after the test."""
    binary = require_tool("Orthanc", ORTHANC_BIN)
    pacs = Orthanc(tmp_path / "orthanc", aet="SITEPACS", binary=binary)
    pacs.start()
    yield pacs
    pacs.stop(kill=True)
