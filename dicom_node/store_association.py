"""Storage associations served without pynetdicom's reactor: negotiation, C-ECHO, C-STORE.

Why: pynetdicom runs two threads per association that hand every PDU and
DIMSE message through event queues polled every fraction of a millisecond,
and decodes/encodes every command set through pydicom.  Profiled on a
300-slice CT push that was most of the node's CPU per instance (~4.3 ms vs
Orthanc's ~2.6 ms).  A modality's association only ever stores and echoes,
so here one thread per association does blocking reads into one buffer per
PDU, parses the few command elements it needs by hand, and answers.

What stays the same as the pynetdicom path (and is tested byte for byte
against it): the A-ASSOCIATE-AC/-RJ PDUs (built with pynetdicom's own PDU
classes and its own presentation-context negotiation), the C-STORE/C-ECHO
responses, the status decision (:func:`store_status`, shared by both paths)
and durability (:meth:`StudyStore.store` answers only once the file and its
index row are on disk).  Everything this path does not handle, such as
C-FIND/MOVE/GET contexts, role selection, user identity, TLS, goes to
pynetdicom untouched: the acceptor only *peeks* at the A-ASSOCIATE-RQ
(:func:`peek_pdu`, :func:`is_storage_request`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    negotiate_as_acceptor,
)

from dicom_node.study_store import INVALID, MOVED, NO_SPACE, StudyStore

log = logging.getLogger("dicom_node")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)

# DIMSE statuses (PS3.4 Annex B / C, PS3.7 Annex C).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNRECOGNIZED_OPERATION = 0x0211

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
RELEASE_RQ, RELEASE_RP, ABORT = 0x05, 0x06, 0x07
PDU_TYPES = frozenset(range(1, 8))

# A-ABORT reasons when the source is the service provider (PS3.8 9.3.8).
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x00, 0x01, 0x02, 0x06

# The first PDU is at most this big: 128 contexts × 16 transfer syntaxes of 64-byte UIDs
# is ~150 KB; anything larger is treated as garbage.
MAX_REQUEST_PDU = 1 << 20
# We announce "unlimited" (0) like the pynetdicom AE, and a pynetdicom sender then puts a
# whole dataset in one PDU, however big.  A PDU longer than this is read in pieces of this
# size, so what we allocate follows the bytes that arrive, not a (bogus) length field.
PDU_PIECE = 1 << 24
# What a P-DATA-TF may carry besides a dataset's bytes (a command set, item headers):
# a PDU longer than the dataset cap plus this cannot hold an acceptable dataset.
PDU_OVERHEAD = 1 << 16
DEFAULT_MAX_DATASET = 2 << 30  # dicom.max_dataset_bytes: 2 GiB

# Command Field values (PS3.7 E.1).
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATASET = 0x0101


def abort_pdu(source: int, reason: int) -> bytes:
    pdu = A_ABORT_RQ()
    pdu.source = source
    pdu.reason_diagnostic = reason
    return pdu.encode()


RELEASE_RP_PDU = A_RELEASE_RP().encode()


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    """An A-ASSOCIATE-RJ, encoded by pynetdicom's PDU class as its ACSE does."""
    primitive = A_ASSOCIATE()
    primitive.result = result
    primitive.result_source = source
    primitive.diagnostic = diagnostic
    return A_ASSOCIATE_RJ(primitive).encode()


# -- routing ---------------------------------------------------------------------------------
def peek_pdu(sock: socket.socket, timeout: float, limit: int = MAX_REQUEST_PDU) -> bytes | None:
    """The first PDU on ``sock`` without consuming it; None if it did not arrive in time.

    Waits with ``SO_RCVLOWAT`` + ``poll`` for the whole PDU to be buffered
    (``MSG_WAITALL`` is not honoured with ``MSG_PEEK`` on every kernel), so
    whoever reads the socket next, our fast path or pynetdicom, sees it
    untouched.  A header that is not a DICOM PDU, or a length over ``limit``,
    returns just the 6 header bytes: enough to say it is garbage.
    """
    deadline = time.monotonic() + timeout
    header = _peek_exactly(sock, 6, deadline)
    if header is None:
        return None
    pdu_type, length = header[0], struct.unpack(">I", header[2:6])[0]
    if pdu_type not in PDU_TYPES or length + 6 > limit:
        return header
    return _peek_exactly(sock, 6 + length, deadline)


def _peek_exactly(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                return None
            data = sock.recv(size, socket.MSG_PEEK)
            if len(data) >= size:
                return data
            if not data or _peer_closed(sock):
                return None
            time.sleep(0.001)  # woken below the low-water mark: not seen on Linux, but bounded
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


def _peer_closed(sock: socket.socket) -> bool:
    """True when the peer has shut its side (POLLRDHUP), so no more bytes will come."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    return bool(poller.poll(0))


def proposes_other_services(first_pdu: bytes) -> bool:
    """True when an A-ASSOCIATE-RQ proposes an abstract syntax that is not Storage or Verification.

    Read straight from the PDU's items (PS3.8 9.3.2), so a query or retrieve
    association goes to pynetdicom without our decoding it first (~0.25 ms of
    each findscu's set-up).  Malformed items answer False: the full decode decides.
    """
    if len(first_pdu) < 74 or first_pdu[0] != ASSOCIATE_RQ:
        return False
    offset, end = 74, len(first_pdu)
    while offset + 4 <= end:
        item_type, length = first_pdu[offset], struct.unpack_from(">H", first_pdu, offset + 2)[0]
        item_end = offset + 4 + length
        if item_type == 0x20:
            sub = offset + 8  # after context ID and 3 reserved bytes
            while sub + 4 <= min(item_end, end):
                sub_length = struct.unpack_from(">H", first_pdu, sub + 2)[0]
                if first_pdu[sub] == 0x30:
                    uid = first_pdu[sub + 4:sub + 4 + sub_length].decode("ascii", "replace")
                    uid = uid.rstrip("\0 ")
                    if uid not in STORAGE_CLASSES and uid != VERIFICATION:
                        return True
                sub += 4 + sub_length
        offset = item_end
    return False


def decode_request(first_pdu: bytes) -> A_ASSOCIATE_RQ | None:
    """The A-ASSOCIATE-RQ if ``first_pdu`` is a well-formed one, else None."""
    if len(first_pdu) < 74 or first_pdu[0] != ASSOCIATE_RQ:
        return None
    pdu = A_ASSOCIATE_RQ()
    try:
        pdu.decode(first_pdu)
        pdu.to_primitive()  # validates the items as the pynetdicom path would use them
    except Exception:  # pynetdicom raises several kinds on a malformed PDU
        return None
    return pdu


_PLAIN_USER_ITEMS = (MaximumLengthNotification, ImplementationClassUIDNotification,
                     ImplementationVersionNameNotification)


def is_storage_request(rq: A_ASSOCIATE_RQ) -> bool:
    """True when every proposed context is Storage or Verification and nothing else is asked.

    Anything out of the ordinary (role selection, user identity, extended or
    asynchronous-operations negotiation, another protocol version or
    application context) goes to pynetdicom, which handles it as before.
    """
    primitive = rq.to_primitive()
    contexts = primitive.presentation_context_definition_list
    if rq.protocol_version != 1 or str(rq.application_context_name) != APPLICATION_CONTEXT:
        return False
    if not contexts or any(str(cx.abstract_syntax) not in STORAGE_CLASSES
                           and str(cx.abstract_syntax) != VERIFICATION for cx in contexts):
        return False
    return all(isinstance(item, _PLAIN_USER_ITEMS) for item in primitive.user_information or [])


# -- what both paths share -----------------------------------------------------------------
def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (short or long length form)."""
    if vr in (b"OB", b"UN"):
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def part10(sop_class: str, sop_uid: str, syntax: str, calling_ae: str,
           dataset: Iterable[bytes | memoryview]) -> bytes:
    """A received C-STORE dataset as a Part 10 file: preamble, our File Meta, the bytes.

    The dataset bytes are exactly those received (given as the fragments
    they arrived in, joined once here).  Building the meta through a pydicom
    Dataset cost about a sixth of the node's CPU per instance when profiled;
    this writes the seven elements directly.  (0002,0016) names the sender.
    """
    body = b"".join((
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class, b"\0")),
        _meta_element(0x0003, b"UI", _padded(sop_uid, b"\0")),
        _meta_element(0x0010, b"UI", _padded(syntax, b"\0")),
        _meta_element(0x0012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\0")),
        _meta_element(0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _meta_element(0x0016, b"AE", _padded(calling_ae or "UNKNOWN", b" ")),
    ))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"".join((b"\0" * 128, b"DICM", group_length, body, *dataset))


def store_status(store: StudyStore, build: Callable[[], bytes], calling_ae: str,
                 address: str, expected_sop_uid: str) -> tuple[int, str]:
    """(DIMSE status, error comment) for one C-STORE: the one decision both paths make.

    Success only once :meth:`StudyStore.store` says the instance is durable.
    Never raises: an unexpected error is an Out of Resources failure with a
    comment, and the association goes on.
    """
    try:
        result = store.store(build(), calling_ae=calling_ae, remote_addr=address,
                             expected_sop_uid=expected_sop_uid)
    except Exception as e:  # never raise into the association
        log.exception("C-STORE handler error")
        return 0xA701, f"Out of resources: {e}"[:64]
    if result.success:
        return SUCCESS, ""
    log.warning("C-STORE failed: %s (%s)", result.outcome, result.comment,
                extra={"calling_ae": calling_ae, "address": address})
    if result.outcome == NO_SPACE:
        return OUT_OF_RESOURCES, result.comment[:64]
    if result.outcome == MOVED:
        return DATASET_MISMATCH, result.comment[:64]
    if result.outcome == INVALID:
        code = DATASET_MISMATCH if "missing" in result.comment or "differs" in result.comment \
            else CANNOT_UNDERSTAND
        return code, result.comment[:64]
    return 0xA701, result.comment[:64]


# -- DIMSE command sets (implicit VR little endian, group 0000) -------------------------------
_US_TAGS = {0x0100: "CommandField", 0x0110: "MessageID", 0x0800: "CommandDataSetType",
            0x0900: "Status"}
_UI_TAGS = {0x0002: "AffectedSOPClassUID", 0x0003: "RequestedSOPClassUID",
            0x1000: "AffectedSOPInstanceUID"}


class BadCommand(ValueError):
    """A command set that cannot be parsed."""


def parse_command(data: bytes | memoryview) -> dict[str, Any]:
    """The command elements this path needs, read from an encoded command set."""
    out: dict[str, Any] = {}
    view = memoryview(data)
    offset, end = 0, len(view)
    while offset < end:
        if offset + 8 > end:
            raise BadCommand("command set ends inside an element header")
        group, element, length = struct.unpack_from("<HHI", view, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise BadCommand(f"bad element ({group:04X},{element:04X}) in the command set")
        if element in _US_TAGS:
            if length != 2:
                raise BadCommand(f"(0000,{element:04X}) must be 2 bytes")
            out[_US_TAGS[element]] = struct.unpack_from("<H", view, offset)[0]
        elif element in _UI_TAGS:
            out[_UI_TAGS[element]] = bytes(view[offset:offset + length]).decode(
                "ascii", "replace").rstrip("\0 ")
        offset += length
    if "CommandField" not in out:
        raise BadCommand("no Command Field")
    return out


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def response_command(command_field: int, message_id: int, status: int, sop_class: str = "",
                     sop_uid: str | None = None, comment: str = "") -> bytes:
    """An encoded response command set, element for element as pynetdicom writes it."""
    parts = []
    if sop_class:
        parts.append(_element(0x0002, _padded(sop_class, b"\0")))
    parts += [_element(0x0100, struct.pack("<H", command_field)),
              _element(0x0120, struct.pack("<H", message_id)),
              _element(0x0800, struct.pack("<H", NO_DATASET)),
              _element(0x0900, struct.pack("<H", status))]
    if comment:
        parts.append(_element(0x0902, _padded(comment[:64], b" ")))
    if sop_uid:
        parts.append(_element(0x1000, _padded(sop_uid, b"\0")))
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def pdata_pdus(context_id: int, data: bytes, is_command: bool, peer_max: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying ``data`` in fragments the peer accepts (0 = no limit)."""
    room = len(data) if not peer_max else max(1, peer_max - 6)
    pdus = []
    for start in range(0, max(len(data), 1), room):
        fragment = data[start:start + room]
        last = start + room >= len(data)
        control = (0x01 if is_command else 0x00) | (0x02 if last else 0x00)
        item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
        pdus.append(struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item)
    return pdus


QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def recv_into_acking(sock: socket.socket, view: memoryview) -> int:
    """Fill ``view`` from ``sock``; the bytes read, fewer only when the peer closed.

    ``TCP_QUICKACK`` is re-armed before each read: Linux may delay our ACK by
    up to 40 ms, and a sender that leaves Nagle's algorithm on (DCMTK does
    unless ``TCP_NODELAY=1`` is set) holds the last partial segment of every
    dataset until it is acknowledged.  A timeout raises as the socket's does.
    """
    got, size = 0, len(view)
    while got < size:
        if QUICKACK is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            except OSError:
                pass
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            break
        got += n
    return got


FIRST_PIECE = 1 << 20


def recv_growing(sock: socket.socket, size: int) -> bytearray:
    """Up to ``size`` bytes from ``sock`` (fewer only when the peer closed), in growing pieces.

    Why: a PDU's length is the peer's word.  Allocating it up front let six
    bytes announcing 4 GiB make the node zero-fill 4 GiB per association.
    Here the buffer starts at ``FIRST_PIECE`` (one read for an ordinary
    slice) and at most doubles, by up to ``PDU_PIECE``, once the bytes
    before have arrived: memory follows what was received.
    """
    buf, got_total = bytearray(min(size, FIRST_PIECE)), 0
    while True:
        with memoryview(buf) as view:
            got_total += recv_into_acking(sock, view[got_total:])
        if got_total < len(buf):  # the peer closed
            del buf[got_total:]
            return buf
        if got_total >= size:
            return buf
        buf.extend(bytes(min(size - got_total, len(buf), PDU_PIECE)))


# -- the association -------------------------------------------------------------------------
@dataclass
class Hooks:
    """What the node hands each association: its policy, its store, its limits."""

    store: StudyStore
    refusal: Callable[[str, str], str | None]  # (calling AE, address) → reason, or None
    supported_contexts: list[PresentationContext]
    network_timeout: float
    acse_timeout: float
    implementation_class_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version_name: str = PYNETDICOM_IMPLEMENTATION_VERSION
    # A dataset over this many bytes is read and dropped, then refused (Out of Resources).
    max_dataset_bytes: int = DEFAULT_MAX_DATASET
    # Seconds an association may live without receiving dataset bytes (C-ECHO every
    # minute would otherwise hold a slot forever); 0: no cap beyond the network timeout.
    max_idle_life_s: float = 0


class Aborted(Exception):
    """The association ended: by an A-ABORT either way, a closed socket or a timeout."""


class StoreAssociation:
    """One storage association, served start to end on the calling thread."""

    def __init__(self, sock: socket.socket, address: str, hooks: Hooks):
        self.sock = sock
        self.address = address
        self.hooks = hooks
        self.calling = ""
        self.peer_max = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # id → (abstract, transfer syntax)
        self._header = bytearray(6)
        self.established = False
        self._context_id = 0
        self._data_at = time.monotonic()
        self._new_message()

    # -- socket ------------------------------------------------------------------------------
    def _recv_into(self, view: memoryview) -> None:
        if recv_into_acking(self.sock, view) < len(view):
            raise Aborted("peer closed the connection")

    def read_pdu(self, limit: int | None = None) -> tuple[int, memoryview]:
        """(type, body) of the next PDU; blocking, bounded by the network timeout."""
        pdu_type, length = self.read_header()
        if limit is not None and length > limit:
            self.abort(INVALID_PARAMETER, f"PDU length {length} over {limit}")
        return pdu_type, self.read_body(length)

    def read_header(self) -> tuple[int, int]:
        """(type, length) of the next PDU, its body not yet read."""
        self._recv_into(memoryview(self._header))
        pdu_type, length = self._header[0], struct.unpack_from(">I", self._header, 2)[0]
        if pdu_type not in PDU_TYPES:
            self.abort(UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{pdu_type:02X}")
        return pdu_type, length

    def read_body(self, length: int) -> memoryview:
        """A PDU body of ``length`` bytes, allocated as its bytes arrive (:func:`recv_growing`)."""
        body = recv_growing(self.sock, length)
        if len(body) < length:
            raise Aborted("peer closed the connection")
        return memoryview(body)

    def skip(self, length: int) -> None:
        """Read and drop ``length`` bytes, one piece of memory at a time."""
        piece = memoryview(bytearray(min(PDU_PIECE, length)))
        while length > 0:
            self._recv_into(piece[:min(length, len(piece))])
            length -= min(length, len(piece))

    def send(self, *pdus: bytes) -> None:
        self.sock.sendall(b"".join(pdus))

    def abort(self, reason: int, why: str) -> None:
        """Send an A-ABORT and end the association (raises :class:`Aborted`).

        PS3.8's state table: before the association is established a bad or
        unexpected PDU gets AA-1 (service-user source, no reason); once it is,
        AA-8 (service-provider source, with ``reason``).
        """
        source = 0x02 if self.established else 0x00
        reason = reason if self.established else REASON_NOT_SPECIFIED
        log.warning("association aborted: %s", why,
                    extra={"calling_ae": self.calling, "address": self.address})
        try:
            self.send(abort_pdu(source, reason))
        except OSError:
            pass
        raise Aborted(why)

    # -- the whole association ---------------------------------------------------------------
    def run(self) -> None:
        """Serve until release, abort, close or timeout; always closes the socket."""
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(self.hooks.acse_timeout)
            if self._negotiate():
                self.sock.settimeout(self.hooks.network_timeout)
                self._serve()
        except Aborted:
            pass
        except TimeoutError:
            life = self.hooks.max_idle_life_s
            why = f"no dataset for {life:g} s (dicom.max_association_idle_life_s)" \
                if life and time.monotonic() - self._data_at >= life \
                else "idle longer than the network timeout"
            log.warning("association aborted: %s", why,
                        extra={"calling_ae": self.calling, "address": self.address})
            try:
                self.send(abort_pdu(0x02, REASON_NOT_SPECIFIED))
            except OSError:
                pass
        except OSError as e:
            log.info("association connection lost: %s", e,
                     extra={"calling_ae": self.calling, "address": self.address})
        except Exception:
            log.exception("storage association failed")
            try:
                self.send(abort_pdu(0x02, REASON_NOT_SPECIFIED))
            except OSError:
                pass
        finally:
            close_quietly(self.sock)

    def _negotiate(self) -> bool:
        """Answer the A-ASSOCIATE-RQ; True when the association is established."""
        pdu_type, body = self.read_pdu(limit=MAX_REQUEST_PDU)
        if pdu_type != ASSOCIATE_RQ:
            self.abort(UNEXPECTED_PDU, f"expected A-ASSOCIATE-RQ, got PDU 0x{pdu_type:02X}")
        rq = decode_request(bytes(self._header) + body.tobytes())
        if rq is None:
            self.abort(INVALID_PARAMETER, "malformed A-ASSOCIATE-RQ")
        primitive = rq.to_primitive()
        self.calling = str(primitive.calling_ae_title or "").strip()
        log.info("association requested", extra={"calling_ae": self.calling,
                                                 "address": self.address, "pid": os.getpid()})
        reason = self.hooks.refusal(self.calling, self.address)
        if reason:
            # rejected-permanent, service-user, calling AE title not recognized
            self.send(reject_pdu(0x01, 0x01, 0x03))
            self._linger()
            return False
        self.peer_max = primitive.maximum_length_received or 0
        self.send(self._accept(primitive))
        self.established = True
        return True

    def _accept(self, rq: A_ASSOCIATE) -> bytes:
        """The A-ASSOCIATE-AC: pynetdicom's negotiation and PDU encoding, our AE's contexts."""
        results, _roles = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                                self.hooks.supported_contexts, None)
        accepted = sorted((cx for cx in results if cx.result == 0x00),
                          key=lambda cx: cx.context_id)
        rejected = [cx for cx in results if cx.result != 0x00]
        self.contexts = {cx.context_id: (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                         for cx in accepted}
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = rq.calling_ae_title
        ac.called_ae_title = rq.called_ae_title
        ac.result = 0x00
        ac.result_source = 0x01
        ac.presentation_context_definition_results_list = accepted + rejected
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = 0  # unlimited: fewer, larger PDUs from the sender
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = self.hooks.implementation_class_uid
        items = [max_length, class_uid]
        if self.hooks.implementation_version_name:
            version = ImplementationVersionNameNotification()
            version.implementation_version_name = self.hooks.implementation_version_name
            items.append(version)
        ac.user_information = items
        return A_ASSOCIATE_AC(ac).encode()

    def _serve(self) -> None:
        """P-DATA until A-RELEASE-RQ: reassemble each message and answer it."""
        self._new_message()
        self._data_at = time.monotonic()
        while True:
            self._arm_timeout()
            pdu_type, length = self.read_header()
            self.sock.settimeout(self.hooks.network_timeout)  # bytes are coming: no life cap
            if pdu_type == P_DATA_TF and length > self.hooks.max_dataset_bytes + PDU_OVERHEAD:
                self._skip_oversized_pdu(length)
                continue
            body = self.read_body(length)
            if pdu_type == RELEASE_RQ:
                self.send(RELEASE_RP_PDU)
                self._linger()
                return
            if pdu_type == ABORT:
                log.info("association aborted by the peer",
                         extra={"calling_ae": self.calling, "address": self.address})
                return
            if pdu_type != P_DATA_TF:
                self.abort(UNEXPECTED_PDU, f"unexpected PDU 0x{pdu_type:02X} in an association")
            for cx_id, control, fragment in self._pdvs(body):
                if self._command is None:
                    self._command_fragment(cx_id, control, fragment)
                else:
                    self._dataset_fragment(cx_id, control, fragment)

    def _new_message(self) -> None:
        self._command: dict[str, Any] | None = None
        self._command_parts: list[memoryview] = []
        self._dataset_parts: list[memoryview] = []
        self._dataset_size = 0
        self._oversized = False

    def _command_fragment(self, cx_id: int, control: int, fragment: memoryview) -> None:
        if not control & 0x01:
            self.abort(UNEXPECTED_PDU, "a dataset fragment before its command")
        if self._command_parts and cx_id != self._context_id:
            self.abort(INVALID_PARAMETER, "a command split over two contexts")
        self._context_id = cx_id
        self._command_parts.append(fragment)
        if control & 0x02:
            command = self._command = self._parse_command(self._command_parts)
            self._command_parts = []
            if command.get("CommandDataSetType", NO_DATASET) == NO_DATASET:
                self._new_message()
                self._dispatch(command, cx_id, [])

    def _dataset_fragment(self, cx_id: int, control: int, fragment: memoryview) -> None:
        """Keep a dataset's fragment, or drop it once the dataset is over the cap."""
        if control & 0x01 or cx_id != self._context_id:
            self.abort(UNEXPECTED_PDU, "a command fragment inside a dataset")
        self._data_at = time.monotonic()
        self._dataset_size += len(fragment)
        if self._dataset_size > self.hooks.max_dataset_bytes:
            self._oversized, self._dataset_parts = True, []
        if not self._oversized:
            self._dataset_parts.append(fragment)
        if control & 0x02:
            self._dataset_complete()

    def _dataset_complete(self) -> None:
        command, parts, oversized = self._command, self._dataset_parts, self._oversized
        self._new_message()
        if oversized:
            self._refuse_oversized(command)
        else:
            self._dispatch(command, self._context_id, parts)

    def _skip_oversized_pdu(self, length: int) -> None:
        """A P-DATA-TF too big to hold an acceptable dataset: read through it, keep nothing.

        Only a PDU that is one dataset fragment of the message under way is
        read through (the dataset is then refused once its last fragment is
        in); anything else that big is not DICOM we can answer, and aborts.
        """
        item = self.read_body(6)
        item_length, cx_id, control = struct.unpack(">IBB", item)
        if (item_length + 4 != length or self._command is None or control & 0x01
                or cx_id != self._context_id):
            self.abort(INVALID_PARAMETER, f"P-DATA-TF of {length} bytes over the dataset cap")
        self._data_at = time.monotonic()
        self._oversized, self._dataset_parts = True, []
        self.skip(item_length - 2)
        if control & 0x02:
            self._dataset_complete()

    def _refuse_oversized(self, command: dict[str, Any]) -> None:
        """Out of Resources for a dataset over ``max_dataset_bytes``; nothing was stored."""
        cap = self.hooks.max_dataset_bytes
        log.warning("dataset over %d bytes refused", cap,
                    extra={"calling_ae": self.calling, "address": self.address,
                           "sop_uid": command.get("AffectedSOPInstanceUID", "")})
        field_ = command["CommandField"]
        rsp = response_command(field_ | 0x8000, command.get("MessageID", 0), OUT_OF_RESOURCES,
                               command.get("AffectedSOPClassUID", ""),
                               command.get("AffectedSOPInstanceUID"),
                               f"dataset over the {cap}-byte limit: not stored")
        self.send(*pdata_pdus(self._context_id, rsp, True, self.peer_max))

    def _arm_timeout(self) -> None:
        """Wait for the next PDU at most the network timeout, nor past the life cap."""
        life = self.hooks.max_idle_life_s
        if not life:
            return
        left = self._data_at + life - time.monotonic()
        if left <= 0:
            self.abort(REASON_NOT_SPECIFIED,
                       f"no dataset received for {life:g} s (dicom.max_association_idle_life_s)")
        self.sock.settimeout(min(self.hooks.network_timeout, left))

    def _pdvs(self, body: memoryview):
        """(context id, message control header, fragment) of each PDV item in a P-DATA-TF."""
        offset, end = 0, len(body)
        if end == 0:
            self.abort(INVALID_PARAMETER, "empty P-DATA-TF")
        while offset < end:
            if offset + 6 > end:
                self.abort(INVALID_PARAMETER, "PDV item header cut short")
            length = struct.unpack_from(">I", body, offset)[0]
            if length < 2 or offset + 4 + length > end:
                self.abort(INVALID_PARAMETER, f"PDV item length {length} does not fit the PDU")
            cx_id, control = body[offset + 4], body[offset + 5]
            if cx_id not in self.contexts:
                self.abort(INVALID_PARAMETER, f"PDV on presentation context {cx_id}, not accepted")
            yield cx_id, control, body[offset + 6:offset + 4 + length]
            offset += 4 + length

    def _parse_command(self, parts: list[memoryview]) -> dict[str, Any]:
        try:
            return parse_command(parts[0] if len(parts) == 1 else b"".join(parts))
        except BadCommand as e:
            self.abort(INVALID_PARAMETER, f"unreadable command set: {e}")
            raise  # not reached: abort raises

    def _dispatch(self, command: dict[str, Any], context_id: int,
                  dataset: list[memoryview]) -> None:
        field_ = command["CommandField"]
        message_id = command.get("MessageID", 0)
        sop_class = command.get("AffectedSOPClassUID", "")
        if field_ == C_STORE_RQ:
            status, comment = self._store(command, context_id, dataset)
            rsp = response_command(0x8001, message_id, status, sop_class,
                                   command.get("AffectedSOPInstanceUID"), comment)
        elif field_ == C_ECHO_RQ:
            log.info("C-ECHO", extra={"calling_ae": self.calling, "address": self.address})
            rsp = response_command(0x8030, message_id, SUCCESS, sop_class)
        elif field_ == C_CANCEL_RQ or field_ & 0x8000:
            return  # nothing to cancel here; a response is not ours to answer
        else:
            # A query, retrieve or N- request on a storage association: answered, not
            # aborted, so the sender learns why and may go on storing.
            log.warning("DIMSE command 0x%04X on a storage association: refused", field_,
                        extra={"calling_ae": self.calling, "address": self.address})
            rsp = response_command(field_ | 0x8000, message_id, UNRECOGNIZED_OPERATION,
                                   sop_class or command.get("RequestedSOPClassUID", ""))
        self.send(*pdata_pdus(context_id, rsp, True, self.peer_max))

    def _store(self, command: dict[str, Any], context_id: int,
               dataset: list[memoryview]) -> tuple[int, str]:
        syntax = self.contexts[context_id][1]
        sop_class = command.get("AffectedSOPClassUID", "")
        sop_uid = command.get("AffectedSOPInstanceUID", "")
        return store_status(
            self.hooks.store,
            lambda: part10(sop_class, sop_uid, syntax, self.calling, dataset),
            self.calling, self.address, sop_uid,
        )

    def _linger(self) -> None:
        """After our last PDU: let the peer close first (PS3.8 Sta13), briefly."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(min(self.hooks.acse_timeout, 5.0))
            while self.sock.recv(4096):
                pass
        except OSError:
            pass


def close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
