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

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config, evt
from pynetdicom.presentation import AllStoragePresentationContexts, PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import store_association as fast
from dicom_node.admission import PeerSlots
from dicom_node.store_association import (  # noqa: F401  (statuses named here since before)
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    OUT_OF_RESOURCES,
    SUCCESS,
    part10,
    store_status,
)
from dicom_node.study_store import StudyStore

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

REFUSED_NOT_AUTHORIZED = 0x0124  # PS3.7 "Refused: Not Authorized"


@dataclass(frozen=True)
class Peer:
    """A remote AE this node knows (from the site configuration)."""

    name: str
    host: str = ""
    port: int = 104
    query: bool = False
    move_destination: bool = False
    worklist: bool = False  # may read the Modality Worklist and report MPPS


@dataclass
class NodeSettings:
    ae_title: str
    port: int
    bind: str = "0.0.0.0"
    store_from: str = "any"  # "any" or "known"
    max_associations: int = 16
    # Called on every association so edits to the site's known AEs apply at once.
    peers: Callable[[], list[Peer]] = field(default=lambda: [])
    # Storage-only associations served by dicom_node.store_association instead of
    # pynetdicom's reactor (same negotiation, responses and durability; see there).
    fast_store: bool = True
    network_timeout_s: float = 60  # idle association → A-ABORT
    acse_timeout_s: float = 30  # A-ASSOCIATE-RQ must arrive within this
    # A dataset larger than this is refused; what is allocated follows the bytes that arrive.
    max_dataset_bytes: int = fast.DEFAULT_MAX_DATASET
    # Associations one address may hold at once (across processes with peer_slots_path).
    max_associations_per_peer: int = 4
    peer_slots_path: str | None = None
    # Seconds an association may live without transferring data (a C-ECHO is not data).
    max_idle_life_s: float = 600
    # Query/retrieve from a known AE without a host only from loopback: anyone else could
    # claim that AE title.
    require_host_for_query: bool = True


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
            (evt.EVT_DIMSE_RECV, _note_data),
            (evt.EVT_DIMSE_SENT, _note_data),
            *(extra_handlers or []),
        ]
        self.server = None
        self._own_listener: socket.socket | None = None
        self._stopped = threading.Event()

    def _build_ae(self) -> AE:
        # pynetdicom's "standard" handlers format a debug line for every PDU and DIMSE
        # message (~5% of the node's CPU per C-STORE, yappi); its logger is at WARNING
        # in our processes, so the lines were never written.  Affects AEs made after this.
        _config.LOG_HANDLER_LEVEL = "none"
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = self.settings.max_associations
        ae.network_timeout = self.settings.network_timeout_s
        ae.dimse_timeout = 60
        ae.acse_timeout = self.settings.acse_timeout_s
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
        asock.recv = _quickack_receiver(asock.socket, self.settings.max_dataset_bytes)
        event.assoc.dul._run_loop_delay = DUL_POLL_S
        event.assoc.data_at = time.monotonic()

    def refusal(self, calling: str, address: str) -> str | None:
        """Why an association from ``calling`` at ``address`` is refused, or None.

        Both paths ask this before accepting; a refusal is logged and handed
        to ``on_reject`` (the appliance audits it) here, once.
        """
        if self.settings.store_from != "known":
            return None
        if peer_allowed(peer_named(self.settings, calling), address):
            return None
        reason = f"calling AE {calling!r} from {address} is not a known AE"
        log.warning("association rejected: %s", reason)
        self.on_reject(calling, address, reason)
        return reason

    def _on_requested(self, event) -> None:
        assoc = event.assoc
        # requestor.ae_title is filled in only after this event; read the request itself.
        calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
        address = assoc.requestor.address
        log.info("association requested", extra={"calling_ae": calling, "address": address})
        if self.refusal(calling, address):
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
        request = event.request
        code, comment = store_status(
            self.store,
            lambda: part10(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                           str(event.context.transfer_syntax), calling,
                           [request.DataSet.getvalue()]),
            calling, event.assoc.requestor.address, str(request.AffectedSOPInstanceUID or ""),
        )
        return SUCCESS if code == SUCCESS else _status(code, comment)

    def fast_hooks(self, contexts: list[PresentationContext]) -> fast.Hooks:
        """What a storage association served by :mod:`store_association` needs of this node."""
        return fast.Hooks(
            store=self.store, refusal=self.refusal, supported_contexts=contexts,
            network_timeout=self.ae.network_timeout, acse_timeout=self.ae.acse_timeout,
            implementation_class_uid=self.ae.implementation_class_uid,
            implementation_version_name=self.ae.implementation_version_name or "",
            max_dataset_bytes=self.settings.max_dataset_bytes,
            max_idle_life_s=self.settings.max_idle_life_s,
        )

    # -- running -------------------------------------------------------------------
    def start(self, block: bool = False, listener: socket.socket | None = None):
        """Start serving; with ``block`` serve until :meth:`stop`.

        ``listener`` is a bound, listening socket made by :func:`listen` and
        shared by several node processes (each accepts from it); without it
        the node binds its own, as pynetdicom does.
        """
        if listener is None:
            listener = self._own_listener = listen(self.settings.bind, self.settings.port)
        self.server = self.ae.make_server(
            listener.getsockname()[:2], evt_handlers=self.handlers,
            server_class=SharedListenerServer, listener=listener, node=self,
        )
        threading.Thread(target=self.server.serve_forever, name="dicom-acceptor",
                         daemon=True).start()
        if self.settings.max_idle_life_s:
            threading.Thread(target=self._end_idle_lives, name="dicom-idle-life",
                             daemon=True).start()
        log.info("DICOM node listening", extra={"ae_title": self.settings.ae_title,
                                                "port": self.settings.port, "pid": os.getpid()})
        if block:
            self._stopped.wait()
        return self.server

    def _end_idle_lives(self) -> None:
        """Abort pynetdicom associations that carried no data for ``max_idle_life_s``.

        pynetdicom's network timeout restarts with every PDU, so a C-ECHO a
        minute would keep an association (and its slot) forever.  Our storage
        path applies the same cap itself (:class:`store_association.StoreAssociation`).
        """
        life = self.settings.max_idle_life_s
        while not self._stopped.wait(min(max(life / 4, 0.05), 5.0)):
            now = time.monotonic()
            for assoc in list(self.server.active_associations if self.server else []):
                if now - getattr(assoc, "data_at", now) < life:
                    continue
                assoc.data_at = now  # aborted once
                log.warning("association aborted: no data for %g s "
                            "(dicom.max_association_idle_life_s)", life,
                            extra={"calling_ae": assoc.requestor.ae_title.strip(),
                                   "address": assoc.requestor.address})
                try:
                    assoc.abort()
                except Exception:  # the association may be ending by itself
                    log.debug("abort of an idle association failed", exc_info=True)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        if self._own_listener is not None:
            self._own_listener.close()
            self._own_listener = None
        self._stopped.set()


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
    """pynetdicom's threaded association server on a listening socket it was handed.

    With ``node.settings.fast_store`` each new connection's A-ASSOCIATE-RQ is
    peeked at (not read) in the connection's own thread: a storage-only
    association is served there by :class:`store_association.StoreAssociation`,
    anything else is handed to pynetdicom exactly as before.  The association
    limit counts both kinds.
    """

    daemon_threads = True  # an idle association must not keep a stopping node alive

    def __init__(self, *args, listener: socket.socket, node: DicomNode | None = None, **kwargs):
        self._listener = listener
        self._node = node
        self._fast_active = 0
        self._admission = threading.Lock()
        self._slots = PeerSlots(node.settings.max_associations_per_peer,
                                node.settings.peer_slots_path) if node else None
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

    def process_request_thread(self, request, client_address) -> None:
        """Admit one new connection if its address has a slot free, then route it."""
        slot = self._slots.acquire(client_address[0]) if self._slots else None
        if self._slots is not None and slot is None:
            self._refuse_busy_peer(request, client_address)
            return
        try:
            assoc = self._route(request, client_address)
            if assoc is not None:
                assoc.join()  # the slot is held until pynetdicom's association ends
        finally:
            if slot is not None:
                slot.release()

    def _route(self, request, client_address):
        """Our storage path, pynetdicom (its Association is returned), or a rejection."""
        node = self._node
        if node is None or not node.settings.fast_store or self.ssl_context:
            return self._to_pynetdicom(request, client_address)
        try:
            first = fast.peek_pdu(request, self.ae.acse_timeout)
        except OSError:
            first = None
        if first is None:  # nothing (whole) arrived in time, or the peer left: ARTIM expiry
            fast.close_quietly(request)
            return None
        if fast.proposes_other_services(first):
            well_formed, storage = True, False  # pynetdicom's: not even decoded here
        else:
            rq = fast.decode_request(first)
            well_formed = rq is not None
            storage = rq is None or fast.is_storage_request(rq)  # garbage: aborted by our path
        with self._admission:
            full = self._fast_active + len(self.active_associations) \
                >= self.ae.maximum_associations
            if not full and not storage:
                # Under the lock until pynetdicom's Association thread exists (and counts).
                return self._to_pynetdicom(request, client_address)
            if not full:
                self._fast_active += 1
        if full:
            if well_formed:
                self._refuse_over_limit(request, client_address, len(first))
            else:
                fast.close_quietly(request)
            return None
        try:
            fast.StoreAssociation(request, client_address[0],
                                  node.fast_hooks(self.contexts)).run()
        finally:
            with self._admission:
                self._fast_active -= 1
        return None

    def _to_pynetdicom(self, request, client_address):
        """Hand the connection to pynetdicom; its Association thread, if it is running."""
        super().process_request_thread(request, client_address)
        for assoc in self.active_associations:
            asock = getattr(assoc.dul, "socket", None)
            if asock is not None and getattr(asock, "socket", None) is request:
                return assoc
        return None

    def _refuse_busy_peer(self, request: socket.socket, client_address) -> None:
        """A-ASSOCIATE-RJ (local limit exceeded) for an address already at its limit."""
        limit = self._slots.per_peer if self._slots else 0
        log.warning("association rejected: %s already has %d associations open "
                    "(dicom.max_associations_per_peer)", client_address[0], limit,
                    extra={"address": client_address[0]})
        if self.ssl_context:
            fast.close_quietly(request)
            return
        try:
            first = fast.peek_pdu(request, self.ae.acse_timeout)
        except OSError:
            first = None
        if first is None or fast.decode_request(first) is None:
            fast.close_quietly(request)
            return
        self._send_reject(request, len(first))

    def _refuse_over_limit(self, request: socket.socket, client_address, size: int) -> None:
        """A-ASSOCIATE-RJ: rejected-transient, presentation-related, local limit exceeded."""
        log.warning("association rejected: %d associations already open",
                    self.ae.maximum_associations, extra={"address": client_address[0]})
        self._send_reject(request, size)

    @staticmethod
    def _send_reject(request: socket.socket, size: int) -> None:
        """Read the buffered A-ASSOCIATE-RQ, answer rejected-transient/local limit, close."""
        try:
            request.recv(size, socket.MSG_WAITALL)  # the A-ASSOCIATE-RQ, known to be buffered
            request.sendall(fast.reject_pdu(0x02, 0x03, 0x02))
            request.shutdown(socket.SHUT_WR)
            request.settimeout(5)
            while request.recv(4096):
                pass
        except OSError:
            pass
        fast.close_quietly(request)

    def server_close(self) -> None:
        pass  # the listener belongs to the caller (and the other processes)

    def shutdown(self) -> None:
        # Not registered with AE._servers (made by make_server, not start_server).
        socketserver.BaseServer.shutdown(self)


def _note_data(event) -> None:
    """Mark an association as carrying data: any DIMSE message but a C-ECHO, either way."""
    if "ECHO" not in type(event.message).__name__:
        event.assoc.data_at = time.monotonic()


class _DatasetMeter:
    """What pynetdicom is about to read, checked against the caps before it is read.

    pynetdicom reads each PDU as ``recv(6)`` (the header) then ``recv(length)``;
    this follows that rhythm to refuse a PDU that could not be acceptable and
    to count a message's dataset bytes across P-DATA-TF PDUs, since
    pynetdicom joins every fragment of a dataset in memory.
    """

    def __init__(self, max_dataset_bytes: int):
        self.max_dataset = max_dataset_bytes
        self.pdu_type: int | None = None  # set between a header and its body
        self.pending = 0  # dataset bytes of the message under way

    def before(self, nr_bytes: int) -> None:
        if self.pdu_type is None:
            return
        limit = self.max_dataset + fast.PDU_OVERHEAD if self.pdu_type == fast.P_DATA_TF \
            else fast.MAX_REQUEST_PDU
        if nr_bytes > limit:
            raise OSError(f"PDU of {nr_bytes} bytes over the limit ({limit}): dropped")

    def after(self, data: bytearray, nr_bytes: int) -> None:
        if self.pdu_type is None:
            if nr_bytes == 6 and len(data) == 6:
                length = struct.unpack_from(">I", data, 2)[0]
                self.pdu_type = data[0] if length else None
            return
        if self.pdu_type == fast.P_DATA_TF:
            self._count(data)
        self.pdu_type = None

    def _count(self, body: bytearray) -> None:
        offset, end = 0, len(body)
        while offset + 6 <= end:
            length, control = struct.unpack_from(">I", body, offset)[0], body[offset + 5]
            if not control & 0x01:
                self.pending += max(length - 2, 0)
                if self.pending > self.max_dataset:
                    raise OSError(f"dataset over {self.max_dataset} bytes: association dropped")
            if control & 0x02:
                self.pending = 0
            offset += 4 + length


def _quickack_receiver(sock: socket.socket,
                       max_dataset_bytes: int = fast.DEFAULT_MAX_DATASET) -> Callable[[int], bytearray]:
    """A replacement for pynetdicom's ``AssociationSocket.recv`` on one connection.

    pynetdicom reads 4 KiB per ``recv`` call and grows a bytearray, about 130
    calls per 0.5 MB slice (measured with storescu, benchmarks/ingest.py); here
    a PDU is read as the storage path reads it (:func:`store_association.recv_growing`):
    a slice in one buffer filled at once, acknowledging at once.
    Memory follows the bytes that arrive, never the length a peer announces
    (a P-DATA header saying 4 GiB once made this zero-fill 4 GiB), and a PDU or
    a dataset over the caps raises ``OSError`` before it is read: pynetdicom
    then ends the association as for a lost connection.  The contract is
    pynetdicom's: read ``nr_bytes`` or return what came before the peer closed;
    a timeout raises as before.
    """
    meter = _DatasetMeter(max_dataset_bytes)

    def recv(nr_bytes: int) -> bytearray:
        try:
            meter.before(nr_bytes)
        except OSError as e:
            log.warning("association dropped: %s", e)
            raise
        buf = fast.recv_growing(sock, nr_bytes)
        try:
            meter.after(buf, nr_bytes)
        except OSError as e:
            log.warning("association dropped: %s", e)
            raise
        return buf

    return recv


def _status(code: int, comment: str):
    """A status dataset carrying an Error Comment (max 64 chars, LO)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds
