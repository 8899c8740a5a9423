"""Per-peer association slots, counted across every node process sharing the port.

Why: ``dicom.max_associations`` bounds a process, so one address on the
hospital network could hold them all (16 idle associations, or 16 slow
uploads) and lock every scanner out.  Each address gets at most
``per_peer`` associations at once, whichever node process accepted them.

How: one lock file, one byte per slot.  An association holds an open file
description with an OFD write lock on one of its address's bytes
(``F_OFD_SETLK``: per description, so threads of one process exclude each
other too); closing it, or the process dying, frees the slot.  No shared
memory, nothing to clean up, and a killed process never leaks a slot.

Loopback is not counted: a connection from 127.0.0.1 or ::1 comes from the
appliance itself (its own tools, a local workstation program), not from the
network this limit protects against.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import logging
import os
import struct
import threading
from collections import Counter

log = logging.getLogger("dicom_node")

MAX_PER_PEER = 1024  # slots reserved per address in the lock file's offset space
_F_WRLCK, _SEEK_SET = 1, 0


class Slot:
    """One admitted association; :meth:`release` when it ends (idempotent)."""

    def __init__(self, release) -> None:
        self._release = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class PeerSlots:
    """At most ``per_peer`` associations per address: across processes with a lock file.

    Without ``lock_path`` (a node run alone, as in tests) the count is this
    process's only.
    """

    def __init__(self, per_peer: int, lock_path: str | os.PathLike | None = None):
        if not 1 <= per_peer <= MAX_PER_PEER:
            raise ValueError(f"per_peer must be between 1 and {MAX_PER_PEER}")
        self.per_peer = per_peer
        self.lock_path = os.fspath(lock_path) if lock_path else None
        self._local: Counter[str] = Counter()
        self._guard = threading.Lock()

    def acquire(self, address: str) -> Slot | None:
        """A slot for ``address``, or None when it already holds ``per_peer``."""
        if is_loopback(address):
            return Slot(lambda: None)
        if self.lock_path is None:
            return self._acquire_local(address)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        base = _base_offset(address)
        for n in range(self.per_peer):
            if _try_lock(fd, base + n):
                return Slot(lambda: os.close(fd))
        os.close(fd)
        return None

    def _acquire_local(self, address: str) -> Slot | None:
        with self._guard:
            if self._local[address] >= self.per_peer:
                return None
            self._local[address] += 1

        def release() -> None:
            with self._guard:
                self._local[address] -= 1
                if self._local[address] <= 0:
                    del self._local[address]

        return Slot(release)


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped forms: the appliance itself."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    return ip.is_loopback or bool(getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback)


def _base_offset(address: str) -> int:
    """Where an address's slots start: 48 bits of its hash, times the slots per address."""
    digest = hashlib.sha256(address.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:6], "big") * MAX_PER_PEER


def _try_lock(fd: int, offset: int) -> bool:
    # struct flock on Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (0 for OFD)
    request = struct.pack("hhqqi", _F_WRLCK, _SEEK_SET, offset, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
        return True
    except OSError:
        return False
