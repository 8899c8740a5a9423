"""Shared pieces of the bundle, sync and restore tests (no tests here).

A real S3 API (``moto_server`` from moto[server]) on loopback, age identities
generated per test, sites configured to sync to them, and studies stored
through the real study store.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyrage
import pytest
from conftest import Site, free_port, require_tool, wait_for_port
from dicom_data import write_series

BUCKET = "field-bundles"


@dataclass
class S3:
    url: str
    port: int
    log: Path
    proc: subprocess.Popen

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def part_puts(self) -> dict[int, int]:
        """Completed (HTTP 200) UploadPart requests per part number, from the server's log."""
        counts: dict[int, int] = {}
        for line in self.log.read_text(errors="replace").splitlines():
            m = re.search(r'"PUT [^"]*[?&]partNumber=(\d+)[^"]*" 200', line)
            if m:
                counts[int(m[1])] = counts.get(int(m[1]), 0) + 1
        return counts


def start_moto(tmp: Path) -> S3:
    exe = require_tool("moto_server", str(Path(sys.executable).parent / "moto_server"))
    port = free_port()
    log = tmp / "moto.log"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "ab"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"})
    wait_for_port(port, proc=proc)
    s3 = S3(f"http://127.0.0.1:{port}", port, log, proc)
    s3.client().create_bucket(Bucket=BUCKET)
    return s3


@pytest.fixture
def moto(tmp_path: Path) -> Iterator[S3]:
    s3 = start_moto(tmp_path)
    yield s3
    os.killpg(s3.proc.pid, signal.SIGTERM)
    s3.proc.wait(timeout=10)


def age_identity(path: Path) -> str:
    """Write an age identity (0600) and return its public key."""
    ident = pyrage.x25519.Identity.generate()
    path.write_text(f"# test identity\n{ident}\n")
    path.chmod(0o600)
    return str(ident.to_public())


def configure_sync(site: Site, url: str, recipients: list[str], **extra) -> None:
    """Point a site at an S3 endpoint (credentials by file reference) with test timings."""
    creds = site.data_dir / "keys" / "s3.credentials"
    creds.write_text("[default]\naccess_key_id = testing\nsecret_access_key = testing\n")
    creds.chmod(0o600)
    values = {"target": "s3", "url": f'"{url}"', "bucket": BUCKET,
              "credentials_file": "keys/s3.credentials",
              "recipients": "[" + ", ".join(recipients) + "]", "lease_s": 5, "timeout_s": 3,
              **extra}
    path = site.data_dir / "appliance.yaml"
    text = path.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^(  {key}:).*$", rf"\g<1> {value}", text, count=1)
        assert n == 1, key
    text = re.sub(r"(?m)^(  quiet_period_s:).*$", r"\g<1> 1", text, count=1)
    path.write_text(text)


def set_sweep_interval(site: Site, seconds: float) -> None:
    path = site.data_dir / "appliance.yaml"
    text, n = re.subn(r"(?m)^(  sweep_interval_s:).*$", rf"\g<1> {seconds}", path.read_text(),
                      count=1)
    assert n == 1
    path.write_text(text)


def store_study(site: Site, tmp: Path, count: int, rows: int = 64, cols: int = 64,
                **kw) -> tuple[str, list[Path]]:
    """Generate a series and store it through the real study store (durable, indexed)."""
    from appliance.core import config, db
    from dicom_node.study_store import StudyStore

    study_uid, _series, paths = write_series(tmp / f"gen-{os.urandom(3).hex()}", count,
                                             rows=rows, cols=cols, **kw)
    cfg = config.load(site.data_dir)
    store = StudyStore(cfg.studies_dir, cfg.db_path, connect=db.connect)
    for p in paths:
        assert store.store(p.read_bytes(), "TESTSCU", "127.0.0.1").success
    return study_uid, paths


def age_study(site: Site, study_uid: str, seconds: float = 3600) -> None:
    """Make a study look quiet for ``seconds`` (instead of waiting the quiet period)."""
    conn = site.db()
    conn.execute("UPDATE studies SET last_received = last_received - ? WHERE study_uid = ?",
                 (seconds, study_uid))
    conn.close()
