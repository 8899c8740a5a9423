"""Encrypted, signed bundles: the unit of cloud sync, hand carriage and disaster recovery.

Layout of a bundle file (docs/bundle-format.md is the reference)::

    b"FIELDBUNDLE/2\\n"                 magic (b"FIELDBUNDLE/1\\n": format 1, still read)
    age v1 ciphertext                   X25519 recipients (cloud + escrow)
    trailer                             compact JSON, see TRAILER_KEYS
    8-byte big-endian trailer length
    b"\\nFBEND/1"                        end magic

Inside the ciphertext is a plain tar: ``manifest.json``, ``manifest.sig``
(Ed25519 by the appliance identity key), then every file the manifest lists,
in its order.  The trailer carries a detached Ed25519 signature over
``SHA-256(magic || ciphertext) || bundle_id`` (format 1: ``SHA-256(ciphertext)``)
so that anyone holding only the public key (the cloud, a courier's laptop)
rejects junk before decrypting, and the bundle id names the site and the
sequence number, so both are signed too.

Why a trailer and not a header: the ciphertext hash is known only once the
stream has been written, and a build must stay streaming (bounded memory
whatever the study size).  No new cryptography here: the ciphertext is age v1 as
specified (age-encryption.org/v1), written with ``cryptography``'s X25519, HKDF,
HMAC and ChaCha20-Poly1305 so that it runs at disk speed (pyrage and ``age -d``
decrypt it, and restore decrypts with pyrage); ``cryptography`` does Ed25519 too.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import queue
import re
import shutil
import sqlite3
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import pyrage
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.core import durable
from appliance.core.identity import key_id as _key_id

FORMAT = 2  # what is written; 1 is still read (docs/bundle-format.md, "Versioning")
MAGIC = b"FIELDBUNDLE/2\n"
MAGIC_V1 = b"FIELDBUNDLE/1\n"
FORMAT_OF_MAGIC = {MAGIC_V1: 1, MAGIC: 2}  # the same length: offsets do not depend on it
END_MAGIC = b"\nFBEND/1"
TRAILER_KEYS = frozenset({"format", "bundle_id", "key_id", "public_key", "ciphertext_sha256",
                          "ciphertext_size", "signature"})
MANIFEST_KEYS = frozenset({"format", "bundle_id", "site_id", "key_id", "seq", "priority", "kind",
                           "subject", "created_at", "files"})
MAX_TRAILER = 64 * 1024
MAX_MANIFEST = 64 * 1024 * 1024
CHUNK = 1024 * 1024
BUNDLE_ID_RE = re.compile(r"^(?P<site>[a-z0-9][a-z0-9-]{0,39})\.(?P<seq>[0-9]{10})\.[0-9a-f]{12}$")
MEMBER_RE = re.compile(r"^(dicom|records|recordings)/[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,3}$")

PRIORITY_STAT, PRIORITY_RECORDS, PRIORITY_ROUTINE = 0, 1, 2


class BundleError(Exception):
    """A bundle is malformed, tampered with, replayed or not for us; the message says which."""


@dataclass
class Entry:
    """One file to put in a bundle: its name inside, where it is, what it must hash to."""

    name: str
    sha256: str
    size: int
    source: Path | None = None  # a file on disk …
    data: bytes | None = None  # … or bytes (records)
    meta: dict[str, Any] = field(default_factory=dict)  # study/series/sop uids, report id …

    @classmethod
    def record(cls, name: str, obj: Any, **meta: Any) -> Entry:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        return cls(name, hashlib.sha256(data).hexdigest(), len(data), data=data, meta=meta)


@dataclass
class BundleInfo:
    """What the outside of a bundle says, after its signature checked out."""

    bundle_id: str
    site_id: str
    seq: int
    key_id: str
    public_key: ed25519.Ed25519PublicKey
    sha256: str  # what the outer signature covers: SHA-256 of the ciphertext (format 1), of magic and ciphertext (2)
    size: int  # of the whole file
    ciphertext_size: int = 0
    file_sha256: str = ""  # of the whole file: what the cloud object must hash to
    format: int = FORMAT


def new_bundle_id(site_id: str, seq: int) -> str:
    """``site.sequence.random``: the site and sequence number ride under the outer signature."""
    bid = f"{site_id}.{seq:010d}.{uuid.uuid4().hex[:12]}"
    if not BUNDLE_ID_RE.match(bid):
        raise BundleError(f"site id {site_id!r} is not usable in a bundle id "
                          "(lowercase letters, digits and dashes, at most 40)")
    return bid


def parse_bundle_id(bundle_id: str) -> tuple[str, int]:
    m = BUNDLE_ID_RE.match(bundle_id)
    if not m:
        raise BundleError(f"malformed bundle id {bundle_id!r}")
    return m["site"], int(m["seq"])


def parse_recipients(keys: Iterable[str]) -> list[pyrage.x25519.Recipient]:
    out = []
    for k in keys:
        try:
            out.append(pyrage.x25519.Recipient.from_str(k.strip()))
        except Exception:
            raise BundleError(f"not an age X25519 public key: {k[:16]}…") from None
    if not out:
        raise BundleError("no recipients: set sync.recipients in appliance.yaml or pass "
                          "--recipient AGE_PUBKEY")
    return out


def load_identity(path: Path) -> list[pyrage.x25519.Identity]:
    """age identities (``AGE-SECRET-KEY-1…`` lines, as written by age-keygen)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BundleError(f"cannot read identity file {path}: {e.strerror}") from None
    ids = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-"):
            try:
                ids.append(pyrage.x25519.Identity.from_str(line))
            except Exception:
                raise BundleError(f"{path}: malformed age secret key") from None
    if not ids:
        raise BundleError(f"{path}: no age secret key (AGE-SECRET-KEY-1…) in it")
    return ids


# -- building -----------------------------------------------------------------------------
def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, 0o600, 0, tarfile.REGTYPE
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")


def _pad(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _tar_stream(entries: list[Entry]) -> Iterator[bytes]:
    """The tar as a stream of chunks; each file is hashed as read and must match the index.

    (The reference for what ``build`` writes; ``build`` itself reads files straight into
    the encryption buffer, see ``_AgeStream.write_file``.)"""
    for e in entries:
        yield _tar_header(e.name, e.size)
        if e.data is not None:
            yield e.data
        else:
            h, n = hashlib.sha256(), 0
            with open(e.source, "rb") as f:
                while chunk := f.read(CHUNK):
                    n += len(chunk)
                    if n > e.size:
                        break
                    h.update(chunk)
                    yield chunk
            if n != e.size or h.hexdigest() != e.sha256:
                raise BundleError(_changed(e))
        yield _pad(e.size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _changed(e: Entry) -> str:
    return (f"{e.source}: on disk it no longer matches the index (size or SHA-256 changed); "
            "not bundled")


def _writeback_starter() -> Callable[[int, int, int], Any] | None:
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing a range to
    disk without waiting for it (None where libc lacks it)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True) \
            .sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, off, n: fn(fd, off, n, 2)  # 2: SYNC_FILE_RANGE_WRITE


_start_writeback = _writeback_starter()
WRITEBACK_EVERY = 8 << 20

# age v1 (age-encryption.org/v1), X25519 recipients, written with ``cryptography``'s
# X25519, HKDF-SHA-256, HMAC-SHA-256 and ChaCha20-Poly1305: byte for byte the format
# pyrage and age read (restore and the tests decrypt with pyrage).  pyrage's encrypt_io
# ran at a sixth of ChaCha20-Poly1305's speed here and pulled its input through Python.
AGE_CHUNK = 64 * 1024  # age's STREAM chunk (plaintext)
AGE_TAG = 16
BLOCK_CHUNKS = 16  # chunks encrypted per block: 1 MiB of plaintext
BLOCK = AGE_CHUNK * BLOCK_CHUNKS
DEPTH = 6  # blocks in flight in the pipeline (memory: a few MiB, whatever the study)
_BECH32 = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _bech32_polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1ffffff) << 5 ^ v
        for i, g in enumerate((0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3)):
            chk ^= g if (top >> i) & 1 else 0
    return chk


def age_recipient_bytes(key: str) -> bytes:
    """The 32-byte X25519 public key of an ``age1…`` recipient (bech32, checksum checked)."""
    s = key.strip().lower()
    hrp, _, data = s.rpartition("1")
    try:
        vals = [_BECH32.index(c) for c in data]
    except ValueError:
        vals = []
    if hrp != "age" or len(vals) < 7 or \
            _bech32_polymod([ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]
                            + vals) != 1:
        raise BundleError(f"not an age X25519 public key: {key[:16]}…")
    acc, bits, out = 0, 0, bytearray()
    for v in vals[:-6]:
        acc, bits = (acc << 5 | v) & 0xfff, bits + 5
        if bits >= 8:
            bits -= 8
            out.append(acc >> bits & 0xff)
    if len(out) != 32 or acc & ((1 << bits) - 1):
        raise BundleError(f"not an age X25519 public key: {key[:16]}…")
    return bytes(out)


def _b64(b: bytes) -> bytes:
    return base64.b64encode(b).rstrip(b"=")


def _hkdf(ikm: bytes, salt: bytes | None, info: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=salt, info=info).derive(ikm)


def _age_header(recipients: list[bytes]) -> tuple[bytes, bytes]:
    """The age v1 header and payload nonce for a fresh file key; and the payload key."""
    file_key = os.urandom(16)
    out = [b"age-encryption.org/v1\n"]
    for pk in recipients:
        eph = x25519.X25519PrivateKey.generate()
        share = eph.public_key().public_bytes_raw()
        try:
            shared = eph.exchange(x25519.X25519PublicKey.from_public_bytes(pk))
        except ValueError:
            shared = bytes(32)
        if shared == bytes(32):
            raise BundleError("an age recipient key is a low-order point; refusing it")
        wrap = _hkdf(shared, share + pk, b"age-encryption.org/v1/X25519")
        body = _b64(ChaCha20Poly1305(wrap).encrypt(bytes(12), file_key, None))
        lines = [body[i:i + 64] for i in range(0, len(body), 64)]
        if not lines or len(lines[-1]) == 64:
            lines.append(b"")
        out.append(b"-> X25519 " + _b64(share) + b"\n" + b"\n".join(lines) + b"\n")
    head = b"".join(out) + b"---"
    mac = hmac.HMAC(_hkdf(file_key, None, b"header"), hashes.SHA256())
    mac.update(head)
    nonce = os.urandom(16)
    return (head + b" " + _b64(mac.finalize()) + b"\n" + nonce,
            _hkdf(file_key, nonce, b"payload"))


class _Stage(threading.Thread):
    """One step of the build pipeline: runs ``work`` on each item in order, then ``then``.

    hashlib and os.write let go of the GIL, so the plaintext hashes, the ciphertext hashes
    and the write run beside the encryption.  After an error the stage keeps passing
    items on (so no buffer is lost and nothing blocks) and the error is raised at close.
    """

    def __init__(self, work: Callable[[Any], None], then: Callable[[Any], None], name: str):
        super().__init__(name=name, daemon=True)
        self.q: queue.Queue = queue.Queue()
        self.work, self.then, self.error = work, then, None

    def run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    self.work(item)
                except BaseException as e:
                    self.error = e
            self.then(item)

    def stop(self) -> BaseException | None:
        self.q.put(None)
        self.join()
        return self.error


class _FileCheck:
    """A file's running SHA-256 and what the index says it must be."""

    def __init__(self, e: Entry):
        self.entry, self.h = e, hashlib.sha256()


class _AgeStream:
    """The plaintext tar, encrypted to age v1 a block at a time and written to ``fd``.

    Files are read straight into the block buffer (readinto: no Python-level copy); stage
    threads encrypt the block into a ciphertext buffer (encrypt_into), hash each file
    against the index, hash the ciphertext (for the signature) and the whole file (for the
    outbox), and write it, starting writeback every 8 MiB.
    """

    def __init__(self, fd: int, recipients: list[bytes], h: Any, whole: Any = None):
        self.fd, self.h, self.whole = fd, h, whole  # whole: a second hash (format 1 only)
        self.n = self.written = self._synced = 0
        self.counter = 0
        self._plain_free: queue.Queue = queue.Queue()
        self._ct_free: queue.Queue = queue.Queue()
        for _ in range(DEPTH):
            self._plain_free.put(bytearray(BLOCK))
            self._ct_free.put(bytearray(BLOCK + BLOCK_CHUNKS * AGE_TAG))
        self.writer = _Stage(self._write, self._release_ct, "bundle-write")
        self.ct_hasher = _Stage(lambda it: self.h.update(memoryview(it[0])[:it[1]]),
                                self.writer.q.put, "bundle-hash-ct")
        self.checker = _Stage(self._check_plain, lambda it: self._plain_free.put(it[0]),
                              "bundle-hash-files")
        self.encrypter = _Stage(self._encrypt, lambda it: self.checker.q.put((it[0], it[2])),
                                "bundle-encrypt")
        self.stages = [self.encrypter, self.checker, self.ct_hasher, self.writer]  # stop order
        header, key = _age_header(recipients)
        self.aead = ChaCha20Poly1305(key)
        self._emit(header, len(header), pooled=False)
        for s in self.stages:
            s.start()
        self.buf = self._plain_free.get()
        self.mv, self.pos, self.segs = memoryview(self.buf), 0, []

    # stages (threads)
    def _check_plain(self, item: tuple[bytearray, list]) -> None:
        mv = memoryview(item[0])
        for chk, start, end in item[1]:
            if start is not None:
                chk.h.update(mv[start:end])
            elif chk.h.hexdigest() != chk.entry.sha256:
                raise BundleError(_changed(chk.entry))

    def _write(self, item: tuple[bytearray, int, bool]) -> None:
        mv = memoryview(item[0])[:item[1]]
        if self.whole is not None:
            self.whole.update(mv)
        while mv:
            mv = mv[os.write(self.fd, mv):]
        self.written += item[1]
        if _start_writeback and self.written - self._synced >= WRITEBACK_EVERY:
            _start_writeback(self.fd, len(MAGIC) + self._synced, self.written - self._synced)
            self._synced = self.written

    def _release_ct(self, item: tuple[bytearray, int, bool]) -> None:
        if item[2]:
            self._ct_free.put(item[0])

    def _emit(self, buf: Any, n: int, pooled: bool = True) -> None:
        self.n += n
        self.ct_hasher.q.put((buf, n, pooled))

    def _raise_early(self) -> None:
        for s in self.stages:
            if s.error is not None:
                raise s.error

    def _encrypt(self, item: tuple[bytearray, int, list, bool]) -> None:
        """Encrypt a block into a ciphertext buffer (a stage: the STREAM counter is in order)."""
        pmv, n, last = memoryview(item[0]), item[1], item[3]
        ct = self._ct_free.get()
        cmv, off, o = memoryview(ct), 0, 0
        while True:
            k = min(AGE_CHUNK, n - off)
            final = last and off + k == n
            nonce = self.counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")
            self.aead.encrypt_into(nonce, pmv[off:off + k], None, cmv[o:o + k + AGE_TAG])
            self.counter += 1
            off, o = off + k, o + k + AGE_TAG
            if off == n:
                break
        self._emit(ct, o)

    # the plaintext, fed in order
    def _encrypt_block(self, last: bool) -> None:
        self._raise_early()
        self.encrypter.q.put((self.buf, self.pos, self.segs, last))
        self.buf = self._plain_free.get() if not last else bytearray()
        self.mv, self.pos, self.segs = memoryview(self.buf), 0, []

    def write(self, data: bytes) -> None:
        mv = memoryview(data)
        while mv:
            if self.pos == BLOCK:  # full, and more to come: not the last chunk
                self._encrypt_block(last=False)
            k = min(len(mv), BLOCK - self.pos)
            self.mv[self.pos:self.pos + k] = mv[:k]
            self.pos += k
            mv = mv[k:]

    def write_file(self, e: Entry) -> None:
        """The file's bytes, read into the block buffer; its hash is checked by a stage."""
        chk = _FileCheck(e)
        with open(e.source, "rb", buffering=0) as f:
            left = e.size
            while left:
                if self.pos == BLOCK:
                    self._encrypt_block(last=False)
                k = f.readinto(self.mv[self.pos:self.pos + min(left, BLOCK - self.pos)])
                if not k:
                    raise BundleError(_changed(e))
                self.segs.append((chk, self.pos, self.pos + k))
                self.pos += k
                left -= k
            if f.read(1):
                raise BundleError(_changed(e))
        self.segs.append((chk, None, None))

    def close(self) -> None:
        """Encrypt the rest (its last chunk flagged last), wait for the stages, raise errors."""
        try:
            self._encrypt_block(last=True)
        finally:
            errors = [s.stop() for s in self.stages]
        for err in errors:
            if err is not None:
                raise err

    def abort(self) -> None:
        for s in self.stages:
            s.stop()


def manifest_for(bundle_id: str, key_id: str, priority: int, kind: str, subject: str,
                 entries: list[Entry]) -> dict[str, Any]:
    site_id, seq = parse_bundle_id(bundle_id)
    return {
        "format": FORMAT, "bundle_id": bundle_id, "site_id": site_id, "key_id": key_id,
        "seq": seq, "priority": priority, "kind": kind, "subject": subject,
        "created_at": round(time.time(), 3),
        "files": [{"name": e.name, "sha256": e.sha256, "size": e.size, **e.meta} for e in entries],
    }


def build(out: Path, bundle_id: str, signing_key: ed25519.Ed25519PrivateKey,
          recipients: list[str], entries: list[Entry], priority: int = PRIORITY_ROUTINE,
          kind: str = "study", subject: str = "", fmt: int = FORMAT) -> BundleInfo:
    """Write a bundle to ``out`` durably (temp + fsync + rename), streaming every file.

    ``fmt=1`` writes the old format (for tests of reading it; nothing else needs it)."""
    for e in entries:
        if not MEMBER_RE.match(e.name) or ".." in e.name:
            raise BundleError(f"unsafe member name {e.name!r}")
    kid = _key_id(signing_key.public_key())
    manifest = json.dumps({**manifest_for(bundle_id, kid, priority, kind, subject, entries),
                           "format": fmt}, sort_keys=True, separators=(",", ":")).encode()
    sig = signing_key.sign(manifest)
    inner = [Entry("manifest.json", "", len(manifest), data=manifest),
             Entry("manifest.sig", "", len(sig), data=sig), *entries]

    def feed(s: _AgeStream) -> None:
        for e in inner:
            s.write(_tar_header(e.name, e.size))
            if e.data is not None:
                s.write(e.data)
            else:
                s.write_file(e)
            s.write(_pad(e.size))
        s.write(b"\0" * (2 * tarfile.BLOCKSIZE))

    return _seal(out, bundle_id, signing_key, recipients, feed, fmt)


def seal(out: Path, bundle_id: str, signing_key: ed25519.Ed25519PrivateKey,
         recipients: list[str], plaintext: Iterator[bytes], fmt: int = FORMAT) -> BundleInfo:
    """Encrypt a plaintext stream to the recipients and sign the outside."""
    def feed(s: _AgeStream) -> None:
        for chunk in plaintext:
            s.write(chunk)

    return _seal(out, bundle_id, signing_key, recipients, feed, fmt)


def _seal(out: Path, bundle_id: str, signing_key: ed25519.Ed25519PrivateKey,
          recipients: list[str], feed: Callable[[_AgeStream], None],
          fmt: int = FORMAT) -> BundleInfo:
    magic = {v: k for k, v in FORMAT_OF_MAGIC.items()}[fmt]
    parse_bundle_id(bundle_id)
    parse_recipients(recipients)  # the same checks and messages as ever
    rcpts = [age_recipient_bytes(r) for r in recipients]
    out = Path(out)
    durable.ensure_dir(out.parent)
    tmp = out.with_name(f".{out.name}.{os.getpid()}{durable.TMP_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0),
                     0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, magic)
            # Format 2 signs SHA-256(magic || ciphertext): the whole file's hash is that
            # state, copied, plus the trailer (format 1 hashed the ciphertext twice).
            if fmt == 1:
                h, whole = hashlib.sha256(), hashlib.sha256(magic)
            else:
                h, whole = hashlib.sha256(magic), None
            stream = _AgeStream(fd, rcpts, h, whole)
            try:
                feed(stream)
            except BaseException:
                stream.abort()
                raise
            stream.close()
            digest = h.digest()
            if whole is None:
                whole = h.copy()
            pub = signing_key.public_key()
            trailer = json.dumps({
                "format": fmt, "bundle_id": bundle_id, "key_id": _key_id(pub),
                "public_key": base64.b64encode(_raw(pub)).decode(),
                "ciphertext_sha256": digest.hex(), "ciphertext_size": stream.n,
                "signature": base64.b64encode(signing_key.sign(digest + bundle_id.encode()))
                .decode(),
            }, sort_keys=True, separators=(",", ":")).encode()
            tail = memoryview(trailer + len(trailer).to_bytes(8, "big") + END_MAGIC)
            whole.update(tail)
            while tail:
                tail = tail[os.write(fd, tail):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
        durable.fsync_dir(out.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return BundleInfo(bundle_id, *parse_bundle_id(bundle_id), _key_id(pub), pub, digest.hex(),
                      out.stat().st_size, stream.n, whole.hexdigest(), fmt)


def _raw(pub: ed25519.Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- verifying (no decryption key needed) ---------------------------------------------------
def read_trailer(f: BinaryIO, size: int) -> dict[str, Any]:
    tail = len(END_MAGIC) + 8
    if size < len(MAGIC) + tail + 2:
        raise BundleError("not a bundle: too short (truncated?)")
    f.seek(0)
    fmt = FORMAT_OF_MAGIC.get(f.read(len(MAGIC)))
    if fmt is None:
        raise BundleError("not a bundle: bad magic at the start")
    f.seek(size - tail)
    end = f.read(tail)
    if end[8:] != END_MAGIC:
        raise BundleError("bundle is truncated or damaged: end marker missing")
    n = int.from_bytes(end[:8], "big")
    if not 0 < n <= min(MAX_TRAILER, size - len(MAGIC) - tail):
        raise BundleError("bundle is damaged: trailer length out of range")
    f.seek(size - tail - n)
    try:
        trailer = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise BundleError("bundle is damaged: trailer is not valid JSON") from None
    if not isinstance(trailer, dict) or set(trailer) != TRAILER_KEYS:
        raise BundleError("bundle is damaged: trailer fields are wrong")
    if trailer["format"] != fmt:
        raise BundleError(f"unsupported bundle format {trailer['format']!r} (the magic says "
                          f"{fmt}; this reads 1 and 2)")
    if trailer["ciphertext_size"] != size - len(MAGIC) - tail - n:
        raise BundleError("bundle is truncated or padded: ciphertext size does not match")
    return trailer


def verify(path: Path, trusted_key_ids: Iterable[str] | None = None) -> BundleInfo:
    """Check structure and the outer signature; with ``trusted_key_ids``, the signer too."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        t = read_trailer(f, size)
        try:
            raw = base64.b64decode(t["public_key"], validate=True)
            pub = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            sig = base64.b64decode(t["signature"], validate=True)
        except Exception:
            raise BundleError("bundle is damaged: public key or signature unreadable") from None
        if _key_id(pub) != t["key_id"]:
            raise BundleError("bundle is damaged: key id does not match its public key")
        trusted = set(trusted_key_ids or ())
        if trusted and t["key_id"] not in trusted:
            raise BundleError(f"bundle signed by key {t['key_id']}, which is not trusted here")
        site_id, seq = parse_bundle_id(str(t["bundle_id"]))
        f.seek(0)
        magic = f.read(len(MAGIC))
        # format 1: the hash of the ciphertext; 2: of magic and ciphertext (one pass for both)
        h, left = hashlib.sha256(magic if t["format"] == 2 else b""), t["ciphertext_size"]
        whole = hashlib.sha256(magic) if t["format"] == 1 else None
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise BundleError("bundle is truncated")
            h.update(chunk)
            if whole is not None:
                whole.update(chunk)
            left -= len(chunk)
        if whole is None:
            whole = h.copy()
        whole.update(f.read())
        digest = h.digest()
        if digest.hex() != t["ciphertext_sha256"]:
            raise BundleError("bundle is damaged or tampered with: ciphertext hash differs")
        try:
            pub.verify(sig, digest + t["bundle_id"].encode())
        except InvalidSignature:
            raise BundleError("bundle signature is invalid (tampered with, or a signature "
                              "from another bundle)") from None
    return BundleInfo(t["bundle_id"], site_id, seq, t["key_id"], pub, digest.hex(), size,
                      t["ciphertext_size"], whole.hexdigest(), t["format"])


# -- opening --------------------------------------------------------------------------------
class Ledger:
    """Which (site, sequence number) pairs were accepted: a replayed bundle is refused."""

    def seen(self, site_id: str, seq: int) -> str | None:
        raise NotImplementedError

    def record(self, info: BundleInfo) -> None:
        raise NotImplementedError


class DbLedger(Ledger):
    """The ``received_bundles`` table of an appliance database (restore)."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def seen(self, site_id: str, seq: int) -> str | None:
        r = self.conn.execute("SELECT bundle_id FROM received_bundles WHERE site_id=? AND seq=?",
                              (site_id, seq)).fetchone()
        return r[0] if r else None

    def record(self, info: BundleInfo) -> None:
        self.conn.execute(
            "INSERT INTO received_bundles (bundle_id, site_id, key_id, seq, sha256, received_at)"
            " VALUES (?,?,?,?,?,?)",
            (info.bundle_id, info.site_id, info.key_id, info.seq, info.sha256, time.time()))


class FileLedger(Ledger):
    """A JSON ledger beside opened bundles (``bundle open`` outside a data directory)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _load(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError:
            raise BundleError(f"{self.path}: ledger is damaged; refusing to open bundles") from None

    def seen(self, site_id: str, seq: int) -> str | None:
        return self._load().get(f"{site_id}/{seq}")

    def record(self, info: BundleInfo) -> None:
        d = self._load()
        d[f"{info.site_id}/{info.seq}"] = info.bundle_id
        durable.atomic_write(self.path, json.dumps(d, sort_keys=True, indent=1).encode(), 0o600)


@dataclass
class Opened:
    info: BundleInfo
    manifest: dict[str, Any]
    root: Path  # where the files are (the staging directory until committed)


def _check_manifest(m: Any, info: BundleInfo) -> None:
    if not isinstance(m, dict) or set(m) != MANIFEST_KEYS:
        raise BundleError("manifest fields are wrong")
    if m["format"] != info.format:
        raise BundleError(f"unsupported manifest format {m['format']!r} (the outside says "
                          f"{info.format})")
    if m["bundle_id"] != info.bundle_id:
        raise BundleError(f"manifest belongs to bundle {m['bundle_id']}, not {info.bundle_id}")
    if (m["site_id"], m["seq"], m["key_id"]) != (info.site_id, info.seq, info.key_id):
        raise BundleError("manifest site, sequence number or key differ from the signed outside")
    if not isinstance(m["files"], list):
        raise BundleError("manifest file list is malformed")
    names = set()
    for fe in m["files"]:
        if not isinstance(fe, dict) or not MEMBER_RE.match(str(fe.get("name", ""))) \
                or ".." in fe["name"] or fe["name"] in names:
            raise BundleError(f"manifest lists an unsafe or repeated name: {fe!r:.80}")
        if not isinstance(fe.get("size"), int) or not isinstance(fe.get("sha256"), str):
            raise BundleError(f"manifest entry {fe['name']} lacks size or sha256")
        names.add(fe["name"])


def _read_member(tar: tarfile.TarFile, expected: str, limit: int) -> tuple[tarfile.TarInfo, Any]:
    member = tar.next()
    if member is None or member.name != expected or not member.isreg():
        got = member.name if member is not None else "end of archive"
        raise BundleError(f"bundle contents out of order: expected {expected}, found {got}")
    if member.size > limit:
        raise BundleError(f"{expected} is implausibly large")
    return member, tar.extractfile(member)


def _extract(plain: Path, info: BundleInfo, staging: Path) -> dict[str, Any]:
    """Read the decrypted tar: manifest, its signature, then every listed file, hash-checked."""
    with tarfile.open(plain, mode="r:") as tar:
        _, f = _read_member(tar, "manifest.json", MAX_MANIFEST)
        manifest_bytes = f.read()
        _, f = _read_member(tar, "manifest.sig", 1024)
        try:
            info.public_key.verify(f.read(), manifest_bytes)
        except InvalidSignature:
            raise BundleError("manifest signature is invalid (manifest or signature swapped or "
                              "edited)") from None
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError:
            raise BundleError("manifest is not valid JSON") from None
        _check_manifest(manifest, info)
        for fe in manifest["files"]:
            member, src = _read_member(tar, fe["name"], fe["size"])
            if member.size != fe["size"]:
                raise BundleError(f"{fe['name']}: size differs from the manifest")
            dest = staging / fe["name"]
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            h = hashlib.sha256()
            with os.fdopen(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                           "wb") as out:  # patient data: private to the user who opened it
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != fe["sha256"]:
                raise BundleError(f"{fe['name']}: SHA-256 differs from the manifest")
        extra = tar.next()
        if extra is not None:
            raise BundleError(f"bundle holds a file its manifest does not list: {extra.name}")
        durable.atomic_write(staging / "manifest.json", manifest_bytes, 0o600)
    return manifest


def open_to_staging(path: Path, identities: list, staging: Path, ledger: Ledger | None = None,
                    trusted_key_ids: Iterable[str] | None = None) -> Opened:
    """Verify, refuse replays, decrypt and check every hash into ``staging`` (made here).

    On any error ``staging`` is removed and the error raised: the caller's
    destination is never touched by a bad bundle.
    """
    info = verify(path, trusted_key_ids)
    if ledger is not None:
        prior = ledger.seen(info.site_id, info.seq)
        if prior is not None:
            raise BundleError(f"replayed sequence number {info.seq} of site {info.site_id}: "
                              f"already accepted as bundle {prior}")
    staging = Path(staging)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True, mode=0o700)
    try:
        plain = staging / ".plaintext.tar"
        with open(path, "rb") as src, open(plain, "wb") as dst:
            os.chmod(plain, 0o600)
            src.seek(len(MAGIC))
            try:
                pyrage.decrypt_io(_Limited(src, info.ciphertext_size), dst, identities)
            except Exception as e:
                raise BundleError(f"cannot decrypt (not addressed to this identity, or "
                                  f"damaged): {e}") from None
        try:
            manifest = _extract(plain, info, staging)
        except tarfile.TarError as e:
            raise BundleError(f"bundle contents are not a valid archive: {e}") from None
        plain.unlink()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Opened(info, manifest, staging)


class _Limited(io.RawIOBase):
    """The ciphertext only: stops where the trailer starts."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self.left <= 0:
            return 0
        data = self.f.read(min(len(b), self.left))
        b[: len(data)] = data
        self.left -= len(data)
        return len(data)


def open_bundle(path: Path, identities: list, out: Path, ledger: Ledger | None = None,
                trusted_key_ids: Iterable[str] | None = None,
                on_opened: Callable[[Opened], None] | None = None) -> Opened:
    """Open into ``out``: all checks first in a staging directory, then move into place."""
    out = Path(out)
    staging = out.parent / f".{out.name}.opening-{os.getpid()}"
    opened = open_to_staging(path, identities, staging, ledger, trusted_key_ids)
    try:
        if not out.exists():
            durable.ensure_dir(out)
            os.chmod(out, 0o700)
        for fe in [{"name": "manifest.json"}, *opened.manifest["files"]]:
            dest = out / fe["name"]
            if fe["name"] != "manifest.json" and dest.exists():
                raise BundleError(f"{dest} exists already; refusing to overwrite")
        for fe in opened.manifest["files"]:
            dest = out / fe["name"]
            for d in reversed([*dest.relative_to(out).parents][:-1]):
                if not (out / d).exists():
                    (out / d).mkdir(mode=0o700)
            os.replace(staging / fe["name"], dest)
        durable.fsync_dir(out)
        os.replace(staging / "manifest.json",
                   out / f"manifest-{opened.info.bundle_id}.json")
        if ledger is not None:
            ledger.record(opened.info)
        if on_opened:
            on_opened(opened)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    opened.root = out
    return opened
