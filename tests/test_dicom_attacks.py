"""An outsider on the hospital network against the running ``appliance dicom``.

Each test performs the attack with real clients (raw sockets speaking PDUs
built with pynetdicom's classes, dcmtk, pynetdicom's SCU) against the real
node process of a site, and checks that the node stays small, answers
everyone else, stores nothing it refused, and says why in its log.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, Site, missing
from dicom_data import write_series
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

MiB = 1 << 20
FIND_CX = [(StudyRootQueryRetrieveInformationModelFind, [ExplicitVRLittleEndian])]
STORE_CX = [(CTImageStorage, [ExplicitVRLittleEndian])]


@pytest.fixture(autouse=True)
def send_files_verbatim(monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


# -- helpers ------------------------------------------------------------------------------------
def set_dicom(site: Site, **values) -> None:
    """Set keys of the ``dicom:`` section in the site's appliance.yaml (before the node starts)."""
    cfg = site.data_dir / "appliance.yaml"
    lines = cfg.read_text().splitlines()
    for key, value in values.items():
        for i, line in enumerate(lines):
            if line.startswith(f"  {key}:"):
                lines[i] = f"  {key}: {value}"
                break
        else:
            raise AssertionError(f"dicom.{key} is not in appliance.yaml")
    cfg.write_text("\n".join(lines) + "\n")


def request_pdu(contexts, calling: str = "OUTSIDER") -> bytes:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = "FIELDAPP"
    for i, (abstract, syntaxes) in enumerate(contexts):
        cx = PresentationContext()
        cx.context_id = 2 * i + 1
        cx.abstract_syntax = abstract
        cx.transfer_syntax = syntaxes
        primitive.presentation_context_definition_list.append(cx)
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    class_uid = ImplementationClassUIDNotification()
    class_uid.implementation_class_uid = "1.2.826.0.1.3680043.9.7433.1"
    primitive.user_information = [max_length, class_uid]
    return A_ASSOCIATE_RQ(primitive).encode()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def raw_associate(port: int, contexts) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(request_pdu(contexts))
    header = recv_exactly(sock, 6)
    recv_exactly(sock, struct.unpack(">I", header[2:])[0])
    assert header[0] == 0x02, f"not accepted: PDU type 0x{header[0]:02X}"
    return sock


def closed_by_node(sock: socket.socket) -> bool:
    """True once the node closes the connection (whatever it sent before: an A-ABORT)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def pdata_header(length: int) -> bytes:
    """A P-DATA-TF header announcing ``length`` bytes (none of which will follow)."""
    return struct.pack(">BBI", 0x04, 0, length)


def node_pids(proc: subprocess.Popen, expected: int = 2) -> list[int]:
    deadline = time.monotonic() + 10
    while True:
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            pids = [proc.pid, *map(int, f.read().split())]
        if len(pids) >= expected or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def rss_mib(pids: list[int]) -> float:
    """The node's resident memory: VmRSS of every one of its processes, summed."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total / 1024


def peak_rss_mib(pids: list[int], seconds: float) -> float:
    """The highest RSS seen while watching for ``seconds`` (memory that is *not* taken)."""
    peak, end = 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        peak = max(peak, rss_mib(pids))
        time.sleep(0.02)
    return peak


def echo(dcmtk: dict, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([dcmtk["echoscu"], "-aec", "FIELDAPP", "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=30)


def node_log(site: Site) -> str:
    return (site.data_dir / "logs" / "test-dicom.out").read_text(errors="replace")


def stored(site: Site) -> tuple[int, list[str]]:
    conn = site.db()
    try:
        count = conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
    finally:
        conn.close()
    incoming = site.data_dir / "studies" / ".incoming"
    return count, sorted(p.name for p in incoming.iterdir() if p.name != ".write.lock")


# -- 1. memory exhaustion by six bytes ----------------------------------------------------------
def test_pdata_headers_announcing_4_gib_on_16_query_associations_leave_the_node_small(
        site, dcmtk):
    """The attack from the issue: A-ASSOCIATE-RQ with a C-FIND context, then 6 bytes."""
    proc = site.start_dicom()
    pids = node_pids(proc)
    assert echo(dcmtk, site.dicom_port).returncode == 0
    before = rss_mib(pids)
    socks = [raw_associate(site.dicom_port, FIND_CX) for _ in range(16)]
    try:
        for sock in socks:
            sock.sendall(pdata_header(0xFFFFFFFF))
        for sock in socks:  # refused at once: the node drops each association
            assert closed_by_node(sock)
        assert peak_rss_mib(pids, 1.0) < before + 64
        answer = echo(dcmtk, site.dicom_port)
        assert answer.returncode == 0, answer.stderr
    finally:
        for sock in socks:
            sock.close()
    assert "over the limit" in node_log(site)


@pytest.mark.parametrize("contexts", [FIND_CX, STORE_CX], ids=["pynetdicom-path", "storage-path"])
def test_pdata_header_under_the_cap_allocates_only_what_arrives(site, dcmtk, contexts):
    """1 GiB announced (under the 2 GiB dataset cap) and 4 KiB sent: the node holds ~1 MiB each.

    15 associations, one fewer than dicom.max_associations: each node process counts its own,
    and all 15 may land in the process that then takes the echo.
    """
    proc = site.start_dicom()
    pids = node_pids(proc)
    assert echo(dcmtk, site.dicom_port).returncode == 0
    before = rss_mib(pids)
    socks = [raw_associate(site.dicom_port, contexts) for _ in range(15)]
    try:
        for sock in socks:
            sock.sendall(pdata_header(1 << 30) + b"\0" * 4096)
        answer = echo(dcmtk, site.dicom_port)
        assert answer.returncode == 0, answer.stderr
        assert peak_rss_mib(pids, 1.0) < before + 64
    finally:
        for sock in socks:
            sock.close()


def test_dataset_over_the_cap_is_refused_and_nothing_is_stored(site, dcmtk, tmp_path):
    """dicom.max_dataset_bytes: storescu's many small PDUs, and pynetdicom's one big PDU."""
    set_dicom(site, max_dataset_bytes=200_000)
    site.start_dicom()
    _, _, (big,) = write_series(tmp_path / "big", 1, rows=512, cols=512)  # 0.5 MB
    _, _, (small,) = write_series(tmp_path / "small", 1, rows=64, cols=64)
    sent = subprocess.run([dcmtk["storescu"], "-v", "--no-halt", "-aet", "MODALITY", "-aec", "FIELDAPP",
                           "127.0.0.1", str(site.dicom_port), str(big), str(small)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "TCP_NODELAY": "1"})
    said = sent.stdout + sent.stderr
    assert "Refused: OutOfResources" in said and said.count("Store Response") == 2, said
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", site.dicom_port, ae_title="FIELDAPP")
    try:
        status = assoc.send_c_store(big)  # one PDU over the cap: read through, not kept
        assert status.Status == 0xA700 and "limit" in status.ErrorComment
        assert assoc.send_c_store(small).Status == 0  # the association goes on
    finally:
        assoc.release()
    assert stored(site) == (1, [])  # the small one only; no temp file left
    assert "dataset over 200000 bytes refused" in node_log(site)


def test_dataset_over_the_cap_on_a_query_association_is_dropped_unstored(site, tmp_path):
    """The pynetdicom path (storage and query contexts together) drops such an association."""
    set_dicom(site, max_dataset_bytes=200_000)
    site.start_dicom()
    _, _, (big,) = write_series(tmp_path, 1, rows=512, cols=512)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", site.dicom_port, ae_title="FIELDAPP")
    assert assoc.is_established
    status = assoc.send_c_store(big)
    assert "Status" not in status  # no response: the association ended
    assoc.abort()
    assert stored(site) == (0, [])
    assert "association dropped: PDU of" in node_log(site)


def test_every_unit_caps_its_memory():
    """A node (or any service) that does grow is stopped by the kernel, not the whole box."""
    units = sorted((ROOT / "provisioning" / "systemd").glob("*.service"))
    assert units
    for unit in units:
        text = unit.read_text()
        assert re.search(r"^MemoryHigh=\d+[MG]$", text, re.M), unit.name
        assert re.search(r"^MemoryMax=\d+[MG]$", text, re.M), unit.name


# -- per-peer association limit -----------------------------------------------------------------
NEIGHBOUR = """
import json, sys
from pynetdicom import AE
from pynetdicom.sop_class import Verification
host, port, *sources = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
ae = AE(ae_title="NEIGHBOUR")
ae.add_requested_context(Verification)
def associate(src):
    a = ae.associate(host, port, ae_title="FIELDAPP", bind_address=(src, 0))
    return a, "accepted" if a.is_established else "rejected" if a.is_rejected else "failed"
held = [associate(src) for src in sources]
print(json.dumps([why for _, why in held]), flush=True)
sys.stdin.readline()
held[0][0].release()
again, why = associate(sources[0])
print(json.dumps(why), flush=True)
again.release()
for a, _ in held[1:]:
    if a.is_established:
        a.release()
"""


class PeerNetns:
    """A network namespace behind a veth: two addresses on the hospital side, one for the node."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.name, self.host_if, self.ns_if = f"dcmn{os.getpid()}", f"dcmh{n}", f"dcmp{n}"
        self.host_ip, self.peer_ips = f"10.241.{n}.1", [f"10.241.{n}.2", f"10.241.{n}.3"]

    def up(self) -> None:
        self.down()
        sh("ip", "netns", "add", self.name)
        sh("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        sh("ip", "link", "set", self.ns_if, "netns", self.name)
        sh("ip", "addr", "add", f"{self.host_ip}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        for ip in self.peer_ips:
            sh("ip", "netns", "exec", self.name, "ip", "addr", "add", f"{ip}/24", "dev", self.ns_if)
        sh("ip", "netns", "exec", self.name, "ip", "link", "set", self.ns_if, "up")
        sh("ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def down(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture
def netns():
    if os.geteuid() != 0 or not shutil.which("ip"):
        missing("network namespaces need root and iproute2")
    ns = PeerNetns()
    try:
        ns.up()
    except subprocess.CalledProcessError as e:
        missing(f"cannot make a network namespace: {e.stderr!r}")
    yield ns
    ns.down()


def test_fifth_association_from_one_address_is_rejected_and_others_are_served(site, dcmtk,
                                                                              netns):
    """One machine opens 5 associations (spread over both node processes); the 5th is refused."""
    site.start_dicom()
    first, second = netns.peer_ips
    neighbour = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", NEIGHBOUR, netns.host_ip,
         str(site.dicom_port), first, first, first, first, first, second],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        held = json.loads(neighbour.stdout.readline())
        assert held == ["accepted"] * 4 + ["rejected", "accepted"], held
        assert echo(dcmtk, site.dicom_port).returncode == 0  # everyone else is still served
        neighbour.stdin.write("\n")
        neighbour.stdin.flush()
        assert json.loads(neighbour.stdout.readline()) == "accepted"  # a slot freed is reusable
    finally:
        neighbour.kill()
        neighbour.wait()
    assert f"{first} already has 4 associations open" in node_log(site)


# -- an association kept alive by C-ECHO --------------------------------------------------------
@pytest.mark.parametrize("contexts", [[Verification], [Verification, FIND_CX[0][0]]],
                         ids=["storage-path", "pynetdicom-path"])
def test_echo_every_quarter_second_does_not_keep_an_association_forever(site, contexts):
    set_dicom(site, max_association_idle_life_s=1.5)
    site.start_dicom()
    ae = AE(ae_title="LINGERER")
    for abstract in contexts:
        ae.add_requested_context(abstract)
    assoc = ae.associate("127.0.0.1", site.dicom_port, ae_title="FIELDAPP")
    assert assoc.is_established
    started, tick = time.monotonic(), threading.Event()
    while assoc.is_established and time.monotonic() - started < 20:
        assoc.send_c_echo()
        tick.wait(0.25)  # the attacker's pace: far inside the 60 s network timeout
    lived = time.monotonic() - started
    assert assoc.is_aborted and 1.4 <= lived < 6, lived
    assert "no data for 1.5 s" in node_log(site) or "no dataset for 1.5 s" in node_log(site)


# -- a query AE without a host, claimed from the network ----------------------------------------
def test_spoofed_query_ae_without_host_is_refused_from_the_network(site, dcmtk, netns):
    added = site.cli("ae", "add", "WS", "--query")
    assert added.returncode == 0 and "without --host" in added.stderr
    site.cli("ae", "add", "NEARWS", "--query", "--host", netns.peer_ips[0], check=True)
    site.start_dicom()

    def findscu(aet: str) -> str:  # from the namespace's first address
        found = subprocess.run(
            ["ip", "netns", "exec", netns.name, dcmtk["findscu"], "-v", "-S", "-aet", aet,
             "-aec", "FIELDAPP", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
             netns.host_ip, str(site.dicom_port)],
            capture_output=True, text=True, timeout=30)
        return found.stdout + found.stderr

    assert "Status: 0x124" in findscu("WS")  # Refused: Not Authorized, to anyone claiming WS
    assert "Final Find Response (Success)" in findscu("NEARWS")  # an AE from its own host
    assert "has no --host, so anyone could claim it" in node_log(site)


# -- /metrics label explosion -------------------------------------------------------------------
def test_200_random_calling_ae_titles_leave_a_bounded_metrics_label_set(site, tmp_path):
    import secrets

    from prometheus_client import CollectorRegistry, multiprocess

    from appliance.core import metrics

    site.cli("ae", "add", "CTSCANNER", check=True)
    site.start_dicom()
    _, _, (path,) = write_series(tmp_path, 1, rows=16, cols=16)
    for _ in range(200):
        ae = AE(ae_title=f"R{secrets.token_hex(6)}")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", site.dicom_port, ae_title="FIELDAPP")
        assoc.send_c_store(path)
        assoc.release()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(metrics.multiproc_dir(site.data_dir)))
    labels = {s.labels["calling_ae"] for family in registry.collect()
              if family.name == "appliance_cstore" for s in family.samples}
    assert "other" in labels and len(labels) <= metrics.AE_LABELS + 1, len(labels)
