"""HTJ2K (High-Throughput JPEG 2000) encoding of one image frame, lossless, RPCL order.

A thin-link reader's viewer (cornerstone3D in OHIF) decodes the first few
kilobytes of an RPCL codestream as a low-resolution preview: the packets of
the coarsest resolutions come first, so a byte range of 1/16 of a frame is a
whole, smaller image.  The reversible 5/3 wavelet makes the full codestream
lossless.

The encoder is OpenJPH's ``ojph_compress`` (Debian ``openjph-tools``).  The
PyPI ``ojph`` bindings would save a process per frame, but they need OpenJPH
headers newer than Debian 12's 0.9 and do not build here; the tool takes
~17 ms per 512×512 16-bit frame including the process start (measured here,
see README), a fraction of what that frame costs on a thin link.

Frames are handed over as numpy arrays of stored values (before Rescale), so
Bits Stored and signedness decide the codestream's bit depth: values that fit
Bits Stored are coded with it, anything wider with Bits Allocated, so no
stored value is ever clipped.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"
SYNTAXES = (HTJ2K_RPCL, HTJ2K_LOSSLESS)
MEDIA = "image/jphc"  # PS3.18 Table 8.7.3-2: HTJ2K frames
TOOL = "ojph_compress"
TIMEOUT_S = 30.0


class EncodeError(ValueError):
    """A frame that cannot be coded losslessly here (odd layout, tool missing or failing)."""


def available() -> bool:
    """Whether the encoder tool is installed."""
    return shutil.which(TOOL) is not None


def bit_depth(arr: np.ndarray, bits_stored: int, signed: bool) -> int:
    """The codestream bit depth: Bits Stored when every value fits it, else the dtype's width."""
    width = arr.dtype.itemsize * 8
    bits = max(1, min(int(bits_stored or width), width))
    if arr.size == 0:
        return bits
    lo, hi = int(arr.min()), int(arr.max())
    if signed:
        fits = -(1 << (bits - 1)) <= lo and hi < (1 << (bits - 1))
    else:
        fits = lo >= 0 and hi < (1 << bits)
    return bits if fits else width


def encode(arr: np.ndarray, bits_stored: int, signed: bool) -> bytes:
    """One frame (rows×cols, or rows×cols×3 RGB) as a lossless HTJ2K RPCL codestream."""
    if not available():
        raise EncodeError(f"{TOOL} is not installed (Debian package openjph-tools)")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return _encode_rgb(arr)
    if arr.ndim != 2 or arr.dtype.itemsize not in (1, 2):
        raise EncodeError(f"HTJ2K here codes 8/16-bit grey or 8-bit RGB frames, not {arr.shape}"
                          f" {arr.dtype}")
    bits = bit_depth(arr, bits_stored, signed)
    values = arr.astype(np.int64)
    if signed:  # see _mark_signed: coded as the level-shifted unsigned samples
        values = values + (1 << (bits - 1))
    data = values.astype(f"<u{arr.dtype.itemsize}").tobytes()
    rows, cols = arr.shape
    codestream = _run("frame.raw", data, ["-dims", f"{{{cols},{rows}}}", "-num_comps", "1",
                                          "-signed", "false", "-bit_depth", str(bits),
                                          "-downsamp", "{1,1}"])
    return _mark_signed(codestream) if signed else codestream


def _mark_signed(codestream: bytes) -> bytes:
    """Set the sign bit of the one component's Ssiz in the SIZ marker segment.

    ``ojph_compress`` 0.9 reads raw samples as unsigned only (signed input comes
    out wrong in other decoders).  JPEG 2000 level-shifts unsigned samples by
    2^(bits-1) before the wavelet and signed ones not at all, so the coded data of
    the unsigned samples v + 2^(bits-1) is exactly that of the signed samples v:
    only SIZ's sign bit differs.  SIZ starts right after SOC (Part 1 A.5.1), its
    first Ssiz is byte 42.
    """
    if codestream[:4] != b"\xff\x4f\xff\x51" or codestream[40:42] != b"\x00\x01":
        raise EncodeError("unexpected codestream header from the encoder")
    out = bytearray(codestream)
    out[42] |= 0x80
    return bytes(out)


def _encode_rgb(arr: np.ndarray) -> bytes:
    """8-bit RGB through PPM, without the colour transform (the frame stays RGB, not YBR_RCT)."""
    if arr.dtype.itemsize != 1:
        raise EncodeError("HTJ2K here codes 8-bit colour frames only")
    rows, cols, _ = arr.shape
    header = f"P6\n{cols} {rows}\n255\n".encode("ascii")
    data = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    return _run("frame.ppm", data, ["-colour_trans", "false"])


def _run(name: str, data: bytes, args: list[str]) -> bytes:
    """Run the encoder on ``data`` in a private temporary directory (tmpfs when there is one)."""
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(prefix="htj2k-", dir=shm if shm.is_dir() else None) as tmp:
        src, out = Path(tmp) / name, Path(tmp) / "frame.j2c"
        src.write_bytes(data)
        try:
            proc = subprocess.run(
                [TOOL, "-i", str(src), "-o", str(out), "-reversible", "true",
                 "-prog_order", "RPCL", *args],
                capture_output=True, timeout=TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EncodeError(f"{TOOL} failed: {e}") from e
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()[-300:]
            raise EncodeError(f"{TOOL} failed ({proc.returncode}): {tail}")
        return out.read_bytes()
