"""Crash test: ``kill -9`` the DICOM node in the middle of a push, start it again.

A pynetdicom SCU pushes a 300-instance series on one association and records
every C-STORE that got Success.  At a random point the whole ``appliance
dicom`` process group gets SIGKILL.  After a restart, every acknowledged
instance must be in the index, byte-identical (dataset after the File Meta
group, which the node writes itself), readable with its pixels, and found by
C-FIND with dcmtk's ``findscu``; no temp file is left.  Three trials at random
points; the seed is printed so a failure can be replayed (``CRASH_SEED``).
"""

from __future__ import annotations

import io
import os
import random
import re
import signal
import subprocess
import threading
import time

import pydicom
import pytest
from conftest import make_site
from dicom_data import write_series
from pydicom.uid import CTImageStorage
from pynetdicom import AE, _config
from test_dicom_store import dataset_bytes, indexed, stop_node

COUNT = 300
TRIALS = 3


@pytest.fixture(autouse=True)
def send_files_verbatim(monkeypatch):
    """pynetdicom's SCU sends each file's bytes as they are."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """300 small CT slices (128×128, 32 KiB): a push lasts a few seconds."""
    study, _, paths = write_series(tmp_path_factory.mktemp("crash-ct"), COUNT, rows=128, cols=128)
    sops = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    return study, list(zip(sops, paths, strict=True))


class Pusher(threading.Thread):
    """Sends the series on one association; ``acked`` holds SOP UIDs answered Success."""

    def __init__(self, port: int, items):
        super().__init__(daemon=True)
        self.port, self.items = port, items
        self.acked: list[str] = []
        self.progress = threading.Condition()

    def run(self) -> None:
        ae = AE(ae_title="CRASHSCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        ae.network_timeout = ae.dimse_timeout = 10
        assoc = ae.associate("127.0.0.1", self.port, ae_title="FIELDAPP")
        try:
            for sop, path in self.items:
                status = assoc.send_c_store(path)
                if getattr(status, "Status", None) != 0x0000:
                    return
                with self.progress:
                    self.acked.append(sop)
                    self.progress.notify_all()
        except Exception:
            return  # the node died under us: what was acknowledged is what counts
        finally:
            with self.progress:
                self.progress.notify_all()
            if assoc.is_established:
                assoc.abort()

    def wait_for(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.progress:
            while len(self.acked) < n and self.is_alive():
                self.progress.wait(max(0.0, deadline - time.monotonic()))
                assert time.monotonic() < deadline, "push too slow"


def found_by_findscu(dcmtk, site, study_uid: str) -> set[str]:
    """SOP Instance UIDs C-FIND returns at IMAGE level for the study."""
    result = subprocess.run(
        [dcmtk["findscu"], "-v", "-S", "-aet", "CRASHQ", "-aec", "FIELDAPP", "127.0.0.1",
         str(site.dicom_port), "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study_uid}",
         "-k", "SeriesInstanceUID", "-k", "SOPInstanceUID"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Odd-length UIDs are padded with a NUL, which findscu prints inside the brackets.
    return set(re.findall(r"\(0008,0018\) UI \[([0-9.]+)\x00?\]", result.stdout + result.stderr))


def check_acknowledged_survived(dcmtk, site, study_uid: str, acked: list[str], paths) -> None:
    rows = indexed(site)
    studies = site.data_dir / "studies"
    for sop in acked:
        assert sop in rows, f"acknowledged {sop} lost"
        stored = (studies / rows[sop]["path"]).read_bytes()
        assert dataset_bytes(stored) == dataset_bytes(paths[sop].read_bytes()), sop
        ds = pydicom.dcmread(io.BytesIO(stored))
        assert ds.pixel_array.shape == (128, 128)
    found = found_by_findscu(dcmtk, site, study_uid)
    assert set(acked) <= found, f"{len(set(acked) - found)} acknowledged not found by C-FIND"
    assert found == set(rows)  # the index and C-FIND agree, nothing half-indexed
    assert not list(studies.rglob("*.part")), "temp files left after restart"
    conn = site.db()
    total = conn.execute("SELECT COALESCE(SUM(num_instances), 0) FROM studies").fetchone()[0]
    conn.close()
    assert total == len(rows)  # counters consistent with the rows


def test_kill_9_mid_push_loses_nothing_acknowledged(tmp_path, dcmtk, series):
    study_uid, items = series
    paths = dict(items)
    seed = int(os.environ.get("CRASH_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    print(f"CRASH_SEED={seed}")
    for trial in range(TRIALS):
        site = make_site(tmp_path / f"trial{trial}")
        assert site.cli("ae", "add", "CRASHQ", "--query").returncode == 0
        try:
            t0 = time.monotonic()
            site.start_dicom()
            pusher = Pusher(site.dicom_port, items)
            pusher.start()
            kill_after = rng.randint(20, COUNT - 40)
            pusher.wait_for(kill_after)
            stop_node(site, signal.SIGKILL)
            t1 = time.monotonic()
            pusher.join(timeout=30)
            acked = list(pusher.acked)
            assert kill_after <= len(acked) < COUNT, "the kill did not land mid-push"
            t2 = time.monotonic()
            site.start_dicom()
            check_acknowledged_survived(dcmtk, site, study_uid, acked, paths)
            print(f"trial {trial}: killed after {len(acked)} acknowledged; "
                  f"push {t1 - t0:.1f}s, scu {t2 - t1:.1f}s, check {time.monotonic() - t2:.1f}s")
        finally:
            site.stop_all()


def node_children(pid: int, expected: int = 1) -> list[int]:
    """The node's other processes (forked just after the port opens: wait for them)."""
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            found = [int(p) for p in f.read().split()]
        if len(found) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_node_processes_share_the_port_and_a_dead_one_stops_the_node(site, dcmtk):
    """dicom.processes (2 by default): both accept; one killed takes the node down for a restart."""
    proc = site.start_dicom()
    children = node_children(proc.pid)
    assert len(children) == 1  # the parent serves too: 2 processes
    for _ in range(6):  # associations land on either process; every one is served
        echo = subprocess.run([dcmtk["echoscu"], "127.0.0.1", str(site.dicom_port)],
                              capture_output=True, timeout=30)
        assert echo.returncode == 0
    os.kill(children[0], signal.SIGKILL)
    assert proc.wait(timeout=30) == 1  # the supervisor restarts it with recovery
    site.procs.pop("dicom")
    site.start_dicom()  # the port is free again at once: no orphan holds it
    echo = subprocess.run([dcmtk["echoscu"], "127.0.0.1", str(site.dicom_port)],
                          capture_output=True, timeout=30)
    assert echo.returncode == 0


def gone(pid: int) -> bool:
    """The process has exited (a zombie not yet reaped by its new parent counts)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_parent_killed_alone_takes_its_children_with_it(site):
    proc = site.start_dicom()
    (child,) = node_children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)  # not the group: only the parent
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(child), "a node process outlived its parent"
    site.procs.pop("dicom")
    site.start_dicom()  # the port was released by the child too
