"""The DICOM application entity: who may associate, and one thin handler per service.

Handlers follow pynetdicom's style: they read the event, call the study store
or the query engine, and return a status.  They never raise into the
association; an unexpected error becomes a failure status with a comment.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    _config,
    evt,
)
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.study_store import INVALID, NO_SPACE, StudyStore

log = logging.getLogger("dicom_node")

# Every transfer syntax we accept on storage contexts: stored as received, never transcoded.
STORAGE_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Process 14
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14 SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
]

# pynetdicom's DUL thread sleeps this long between polls of an idle socket (its default
# is 1 ms, and its code says: higher uses less CPU when idle, lower answers sooner).
# Measured here with storescu (300 × 0.5 MB, TCP_NODELAY=1, one association):
# 1 ms → 145-150 inst/s, 0.2 ms → 171-185 inst/s; echoscu 27-28 ms → 22-24 ms
# (Orthanc ~20 ms).  The cost: an idle association uses ~11% of a core instead of
# ~6%, for at most the network timeout (60 s), after which pynetdicom drops it.
DUL_POLL_S = 0.0002

# DIMSE statuses (PS3.4 Annex B / C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
REFUSED_NOT_AUTHORIZED = 0x0124  # PS3.7 "Refused: Not Authorized"


@dataclass(frozen=True)
class Peer:
    """A remote AE this node knows (from the site configuration)."""

    name: str
    host: str = ""
    port: int = 104
    query: bool = False
    move_destination: bool = False


@dataclass
class NodeSettings:
    ae_title: str
    port: int
    bind: str = "0.0.0.0"
    store_from: str = "any"  # "any" or "known"
    max_associations: int = 16
    # Called on every association so edits to the site's known AEs apply at once.
    peers: Callable[[], list[Peer]] = field(default=lambda: [])


def peer_named(settings: NodeSettings, ae_title: str) -> Peer | None:
    name = ae_title.strip()
    for peer in settings.peers():
        if peer.name == name:
            return peer
    return None


def peer_allowed(peer: Peer | None, address: str) -> bool:
    """A known peer matches when it has no host or its host is the caller's address."""
    if peer is None:
        return False
    if not peer.host:
        return True
    try:
        return address in {peer.host, socket.gethostbyname(peer.host)}
    except OSError:
        return address == peer.host


class DicomNode:
    """Builds the AE, binds handlers, runs the server."""

    def __init__(self, settings: NodeSettings, store: StudyStore,
                 extra_handlers: list[tuple] | None = None,
                 on_reject: Callable[[str, str, str], None] | None = None):
        self.settings = settings
        self.store = store
        self.on_reject = on_reject or (lambda ae, addr, reason: None)
        self.ae = self._build_ae()
        self.handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_C_STORE, self.handle_store),
            *(extra_handlers or []),
        ]
        self.server = None
        self._stopped = threading.Event()

    def _build_ae(self) -> AE:
        # pynetdicom's "standard" handlers format a debug line for every PDU and DIMSE
        # message (~5% of the node's CPU per C-STORE, yappi); its logger is at WARNING
        # in our processes, so the lines were never written.  Affects AEs made after this.
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        ae.acse_timeout = 30
        ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs from the sender
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts:
            # scu_role/scp_role so a C-GET requestor may propose SCP role selection.
            ae.add_supported_context(cx.abstract_syntax, STORAGE_TRANSFER_SYNTAXES,
                                     scu_role=True, scp_role=True)
        return ae

    # -- association-level events ----------------------------------------------
    def _on_conn_open(self, event) -> None:
        # Nagle's algorithm costs 40 ms per small PDU exchange; DIMSE is request/response.
        try:
            asock = event.assoc.dul.socket
            asock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            return
        asock.recv = _quickack_receiver(asock.socket)
        event.assoc.dul._run_loop_delay = DUL_POLL_S

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        # requestor.ae_title is filled in only after this event; read the request itself.
        calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
        address = assoc.requestor.address
        log.info("association requested", extra={"calling_ae": calling, "address": address})
        if self.settings.store_from == "known":
            peer = peer_named(self.settings, calling)
            if not peer_allowed(peer, address):
                reason = f"calling AE {calling!r} from {address} is not a known AE"
                log.warning("association rejected: %s", reason)
                self.on_reject(calling, address, reason)
                # 0x01 rejected-permanent, source 0x01 service-user, reason 0x03 calling AE not recognized
                assoc.acse.send_reject(0x01, 0x01, 0x03)
                # As pynetdicom does after its own rejections: wait until the RJ PDU has
                # left, or the socket closes first and the caller sees an abort instead.
                assoc.kill()

    # -- services ----------------------------------------------------------------
    def handle_echo(self, event) -> int:
        log.info("C-ECHO", extra={"calling_ae": event.assoc.requestor.ae_title.strip(),
                                  "address": event.assoc.requestor.address})
        return SUCCESS

    def handle_store(self, event):
        """C-STORE: store the bytes exactly as received; Success only once durable."""
        calling = event.assoc.requestor.ae_title.strip()
        address = event.assoc.requestor.address
        try:
            if not self.store.has_space():
                log.error("C-STORE refused: disk below low-water mark")
                return _status(OUT_OF_RESOURCES, "Out of resources: free disk below low-water mark")
            data = part10_file(event, calling)
            result = self.store.store(
                data, calling_ae=calling, remote_addr=address,
                expected_sop_uid=str(event.request.AffectedSOPInstanceUID or ""),
            )
        except Exception as e:  # never raise into the association
            log.exception("C-STORE handler error")
            return _status(0xA701, f"Out of resources: {e}"[:64])
        if result.success:
            return SUCCESS
        log.warning("C-STORE failed: %s (%s)", result.outcome, result.comment,
                    extra={"calling_ae": calling, "address": address})
        if result.outcome == NO_SPACE:
            return _status(OUT_OF_RESOURCES, result.comment)
        if result.outcome == INVALID:
            code = DATASET_MISMATCH if "missing" in result.comment or "differs" in result.comment \
                else CANNOT_UNDERSTAND
            return _status(code, result.comment)
        return _status(0xA701, result.comment)

    # -- running -------------------------------------------------------------------
    def start(self, block: bool = False, listener: socket.socket | None = None):
        """Start serving; with ``block`` serve until :meth:`stop`.

        ``listener`` is a bound, listening socket made by :func:`listen` and
        shared by several node processes (each accepts from it); without it
        the node binds its own, as pynetdicom does.
        """
        if listener is None:
            self.server = self.ae.start_server(
                (self.settings.bind, self.settings.port), block=False, evt_handlers=self.handlers,
            )
        else:
            self.server = self.ae.make_server(
                listener.getsockname()[:2], evt_handlers=self.handlers,
                server_class=SharedListenerServer, listener=listener,
            )
            threading.Thread(target=self.server.serve_forever, name="dicom-acceptor",
                             daemon=True).start()
        log.info("DICOM node listening", extra={"ae_title": self.settings.ae_title,
                                                "port": self.settings.port, "pid": os.getpid()})
        if block:
            self._stopped.wait()
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        self._stopped.set()


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (short or long length form)."""
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def part10_file(event, calling_ae: str) -> bytes:
    """The received C-STORE dataset as a Part 10 file: preamble, our File Meta, the bytes.

    The dataset bytes are exactly those received.  pynetdicom's
    ``event.encoded_dataset()`` builds the same meta through a pydicom
    Dataset, about a sixth of the node's CPU per instance when profiled; this
    writes the seven elements directly.  (0002,0016) Source AE names the sender.
    """
    request = event.request
    syntax = str(event.context.transfer_syntax)
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(str(request.AffectedSOPClassUID), b"\0")),
        _meta_element(0x0003, b"UI", _padded(str(request.AffectedSOPInstanceUID), b"\0")),
        _meta_element(0x0010, b"UI", _padded(syntax, b"\0")),
        _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _meta_element(0x0016, b"AE", _padded(calling_ae or "UNKNOWN", b" ")),
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"".join((b"\0" * 128, b"DICM", group_length, body,
                     request.DataSet.getvalue()))


def listen(bind: str, port: int, backlog: int = 128, wait_s: float = 10.0) -> socket.socket:
    """A listening TCP socket that several node processes can accept from.

    One process accepts at a time per connection; the kernel wakes whichever
    is waiting, so a busy process (its acceptor thread slow to get the GIL)
    leaves new associations to an idle one.  Non-blocking, so a process that
    loses the race to ``accept`` just goes back to waiting.  A port still
    held for a moment by the processes of a node that just died (restart by
    the supervisor) is retried for ``wait_s`` seconds before giving up.
    """
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind, port))
            break
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class _CheaplyCopiedContexts(list):
    """The server's supported contexts, copied per association without ``deepcopy``.

    pynetdicom deep-copies every supported context for each new association
    (transport.RequestHandler._create_association); with every storage class
    times 16 transfer syntaxes that re-validates ~3,000 UIDs and took about
    100 ms of each association's set-up here (echoscu: 129 ms vs Orthanc's
    18 ms).  A context holds immutable UIDs, flags and one list: copying its
    attribute dict and that list gives the same independent copy.
    """

    def __deepcopy__(self, memo) -> list[PresentationContext]:
        out = []
        for cx in self:
            copy = PresentationContext.__new__(PresentationContext)
            copy.__dict__ = {k: list(v) if isinstance(v, list) else v
                             for k, v in cx.__dict__.items()}
            out.append(copy)
        return out


class SharedListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server on a listening socket it was handed."""

    def __init__(self, *args, listener: socket.socket, **kwargs):
        self._listener = listener
        super().__init__(*args, **kwargs)
        self.contexts = _CheaplyCopiedContexts(self.contexts)

    def server_bind(self) -> None:
        self.socket.close()
        self.socket = self._listener
        self.server_address = self._listener.getsockname()

    def server_activate(self) -> None:
        pass  # already listening

    def get_request(self):
        client, address = self._listener.accept()  # BlockingIOError if another process won
        client.setblocking(True)
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        return client, address

    def server_close(self) -> None:
        pass  # the listener belongs to the caller (and the other processes)

    def shutdown(self) -> None:
        # Not registered with AE._servers (made by make_server, not start_server).
        socketserver.BaseServer.shutdown(self)


def _quickack_receiver(sock: socket.socket) -> Callable[[int], bytearray]:
    """A replacement for pynetdicom's ``AssociationSocket.recv`` on one connection.

    Two costs on the receive path, both measured with storescu (benchmarks/ingest.py):
    pynetdicom reads 4 KiB per ``recv`` call and grows a bytearray, about 130
    calls per 0.5 MB slice; here one buffer of the PDU's size is filled with
    ``recv_into``.  And a sender that leaves Nagle's algorithm on (DCMTK does
    unless ``TCP_NODELAY=1`` is set) holds the last partial segment of every
    dataset until it is acknowledged, while Linux delays that ACK up to 40 ms:
    re-arming ``TCP_QUICKACK`` before each read makes us acknowledge at once.
    The contract is pynetdicom's: read ``nr_bytes`` or return what came
    before the peer closed; a timeout raises as before.
    """
    quickack = getattr(socket, "TCP_QUICKACK", None)

    def recv(nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            if quickack is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                except OSError:
                    pass
            n = sock.recv_into(view[got:], nr_bytes - got)
            if n == 0:
                del view
                del buf[got:]
                return buf
            got += n
        return buf

    return recv


def _status(code: int, comment: str):
    """A status dataset carrying an Error Comment (max 64 chars, LO)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
