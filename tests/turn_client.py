"""A small TURN client (RFC 5766/8656 over UDP) for the peer-address tests: Allocate with the
long-term credential coturn derives from the appliance's REST-style credentials, then
CreatePermission. It never sends data (no Send indication, no ChannelData): a permission is
all a test needs to see whether coturn would relay to an address.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
import struct
from collections.abc import Callable

MAGIC = 0x2112A442
ALLOCATE, CREATE_PERMISSION = 0x0003, 0x0008
USERNAME, MESSAGE_INTEGRITY, ERROR_CODE = 0x0006, 0x0008, 0x0009
XOR_PEER_ADDRESS, REALM, NONCE, REQUESTED_TRANSPORT = 0x0012, 0x0014, 0x0015, 0x0019
UDP, TCP = 17, 6


def _attr(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)


def _xor_address(ip: str, port: int, tid: bytes) -> bytes:
    addr = ipaddress.ip_address(ip)
    mask = struct.pack("!I", MAGIC) + (tid if addr.version == 6 else b"")
    raw = bytes(a ^ b for a, b in zip(addr.packed, mask, strict=True))
    return struct.pack("!BBH", 0, 1 if addr.version == 4 else 2, port ^ (MAGIC >> 16)) + raw


def _parse(data: bytes) -> tuple[int, dict[int, bytes]]:
    kind, length = struct.unpack("!HH", data[:4])
    attrs, pos = {}, 20
    while pos < 20 + length:
        a, n = struct.unpack("!HH", data[pos:pos + 4])
        attrs.setdefault(a, data[pos + 4:pos + 4 + n])
        pos += 4 + n + (-n % 4)
    return kind, attrs


class TurnError(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(f"{code} {reason}")
        self.code, self.reason = code, reason


class TurnClient:
    """One allocation on one coturn, from one UDP socket."""

    def __init__(self, server: tuple[str, int], username: str, password: str,
                 timeout: float = 3.0):
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.settimeout(timeout)
        self.server, self.username, self.password = server, username, password
        self.realm = self.nonce = b""

    def close(self) -> None:
        self.sock.close()

    def _key(self) -> bytes:
        return hashlib.md5(f"{self.username}:{self.realm.decode()}:{self.password}".encode())\
            .digest()

    def _request(self, method: int, attrs: Callable[[bytes], bytes]) -> dict[int, bytes]:
        """Send one request (signed once a realm and nonce are known); the answer's attributes,
        or TurnError with the error code. A 401 with a fresh nonce is retried once, signed."""
        for _ in range(2):
            tid = os.urandom(12)
            body = attrs(tid)
            if self.nonce:
                body += (_attr(USERNAME, self.username.encode()) + _attr(REALM, self.realm)
                         + _attr(NONCE, self.nonce))
                head = struct.pack("!HHI", method, len(body) + 24, MAGIC) + tid
                mac = hmac.new(self._key(), head + body, hashlib.sha1).digest()
                body += _attr(MESSAGE_INTEGRITY, mac)
            self.sock.sendto(struct.pack("!HHI", method, len(body), MAGIC) + tid + body,
                             self.server)
            kind, got = self._answer(tid)
            if kind == method | 0x0100:
                return got
            code_attr = got.get(ERROR_CODE, b"\0\0\0\0")
            code = (code_attr[2] & 7) * 100 + code_attr[3]
            if code in (401, 438) and NONCE in got:
                self.realm, self.nonce = got.get(REALM, self.realm), got[NONCE]
                continue
            raise TurnError(code, code_attr[4:].decode(errors="replace"))
        raise TurnError(401, "credentials refused")

    def _answer(self, tid: bytes) -> tuple[int, dict[int, bytes]]:
        while True:
            data, _ = self.sock.recvfrom(4096)
            if data[8:20] == tid:
                return _parse(data)

    def allocate(self, transport: int = UDP) -> None:
        self._request(ALLOCATE,
                      lambda _tid: _attr(REQUESTED_TRANSPORT, bytes([transport, 0, 0, 0])))

    def create_permission(self, peer_ip: str) -> None:
        """Ask coturn to accept traffic from/to ``peer_ip`` (nothing is sent to it)."""
        self._request(CREATE_PERMISSION,
                      lambda tid: _attr(XOR_PEER_ADDRESS, _xor_address(peer_ip, 9, tid)))
