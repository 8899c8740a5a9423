"""WADO-RS pixel access: frames, bulk data, rendered images, media-type negotiation.

Frames are cut out of the stored file by offset (``dicomweb_metadata`` keeps
where each frame lies), so serving frame 150 of a CT reads half a megabyte,
not the whole file, and never parses it.  ``transfer-syntax=*`` returns the
stored bytes untouched; a named syntax is served when it is the stored one,
an uncompressed one we can decode to, RLE Lossless / JPEG 2000 Lossless
when pydicom can encode it here, or HTJ2K lossless (RPCL, .202, or .201) from the
derived cache (:mod:`appliance.dicomweb.htj2k_cache`); anything else is a 406 with the reason.  Rendered/thumbnail images apply the modality LUT and a window
(the request's, else the file's, else min/max) and are JPEG or PNG.
"""

from __future__ import annotations

import io
import json
import re
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.dicomweb import htj2k

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
NATIVE = (EXPLICIT_LE, IMPLICIT_LE)
# Media types of compressed frames (PS3.18 Table 8.7.3-2), for part headers.
FRAME_MEDIA = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
}
MEDIA_DEFAULT_TS = {"application/octet-stream": EXPLICIT_LE, "image/jpeg": "1.2.840.10008.1.2.4.70",
                    "image/jls": "1.2.840.10008.1.2.4.80", "image/jp2": "1.2.840.10008.1.2.4.90",
                    "image/dicom-rle": "1.2.840.10008.1.2.5", "application/dicom": EXPLICIT_LE,
                    "image/jphc": "1.2.840.10008.1.2.4.202"}
# Lossless syntaxes a frame can be transcoded to on request, when pydicom has an encoder
# here (RLE is pydicom's own; JPEG 2000 needs pylibjpeg-openjpeg).
LOSSLESS_ENCODE = ("1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90")
CHUNK = 256 * 1024
PART_LIMIT = 2 * 1024**3  # largest multipart part accepted (STOW-RS)
RENDER_TYPES = ("image/jpeg", "image/png")


class NotAcceptable(Exception):
    """No representation the client accepts can be produced; the message says why (406)."""


class BadRequest(ValueError):
    """A malformed parameter (400)."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an Accept header: ``multipart/related; type=…; transfer-syntax=…; q=…``."""

    media: str
    part_type: str
    transfer_syntax: str
    q: float


def parse_accept(header: str | None) -> list[MediaRange]:
    """Accept entries by preference (q, then order); an absent header means ``*/*``."""
    out = []
    for i, raw in enumerate(_split_outside_quotes(header or "*/*", ",")):
        pieces = _split_outside_quotes(raw, ";")
        media = pieces[0].strip().lower()
        if not media:
            continue
        params = {}
        for p in pieces[1:]:
            k, _, v = p.partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        try:
            q = float(params.get("q", "1"))
        except ValueError:
            q = 1.0
        out.append((-q, i, MediaRange(media, params.get("type", "").lower(),
                                      params.get("transfer-syntax", ""), q)))
    return [m for _, _, m in sorted(out) if m.q > 0]


def _split_outside_quotes(s: str, sep: str) -> list[str]:
    parts, buf, quoted = [], "", False
    for ch in s:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            parts.append(buf)
            buf = ""
        else:
            buf += ch
    parts.append(buf)
    return parts


def can_decode(ts: str) -> bool:
    """Whether pydicom has a working decoder here for ``ts`` (plugins are optional)."""
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(ts).is_available
    except (NotImplementedError, ValueError):
        return False


def can_encode(ts: str) -> bool:
    """Whether pydicom has a working encoder here for ``ts``."""
    from pydicom.pixels import get_encoder

    try:
        return get_encoder(ts).is_available
    except (NotImplementedError, ValueError):
        return False


@dataclass(frozen=True)
class FramePlan:
    """What to send for frames: the syntax, the part media type, multipart or one body.

    ``decode``: the stored frame is decompressed first; ``encode``: the (native)
    frame is then compressed to ``transfer_syntax``.
    """

    transfer_syntax: str
    part_media: str
    multipart: bool
    decode: bool
    encode: bool = False
    derived: bool = False  # from the HTJ2K cache (appliance.dicomweb.htj2k_cache)


def plan_frames(accept: str | None, stored_ts: str) -> FramePlan:
    """Negotiate frames (PS3.18 §8.7.3): the first acceptable range we can serve wins."""
    reasons = []
    for m in parse_accept(accept):
        if m.media == "multipart/related":
            part, multipart = m.part_type or "application/octet-stream", True
        elif m.media in ("*/*", "application/*"):
            part, multipart = "application/octet-stream", True
        elif m.media in ("application/octet-stream", *FRAME_MEDIA.values()):
            part, multipart = m.media, False
        else:
            reasons.append(f"{m.media} is not a frame media type")
            continue
        wanted = m.transfer_syntax or MEDIA_DEFAULT_TS.get(part, "")
        if part in ("*/*", "application/*", "image/*"):  # the server's choice: as stored
            part, wanted = "application/octet-stream", "*"
        if wanted == "*" or wanted == stored_ts or (wanted in NATIVE and stored_ts in NATIVE):
            ts = stored_ts if wanted == "*" else wanted
            media = "application/octet-stream" if part == "application/octet-stream" or \
                ts in NATIVE else FRAME_MEDIA.get(ts, part)
            return FramePlan(ts, media, multipart, False)
        if wanted in NATIVE and part == "application/octet-stream":
            if can_decode(stored_ts):
                return FramePlan(wanted, "application/octet-stream", multipart, True)
            reasons.append(f"no decoder here for the stored transfer syntax {stored_ts}")
            continue
        if wanted in htj2k.SYNTAXES and part in (htj2k.MEDIA, "application/octet-stream"):
            if htj2k.available():
                return FramePlan(wanted, htj2k.MEDIA if part == htj2k.MEDIA else part,
                                 multipart, decode=False, derived=True)
            reasons.append(f"no HTJ2K encoder here ({htj2k.TOOL})")
            continue
        if wanted in LOSSLESS_ENCODE and part in (FRAME_MEDIA[wanted], "application/octet-stream"):
            plan = _encode_plan(wanted, part, multipart, stored_ts, reasons)
            if plan:
                return plan
            continue
        reasons.append(f"cannot transcode the stored {stored_ts} to {wanted or part}")
    lossless = [ts for ts in LOSSLESS_ENCODE if can_encode(ts)]
    lossless += list(htj2k.SYNTAXES) if htj2k.available() else []
    raise NotAcceptable("; ".join(reasons) + f". Available: transfer-syntax=* (stored "
                        f"{stored_ts}) or {EXPLICIT_LE} as application/octet-stream"
                        + (", or " + " / ".join(f"{FRAME_MEDIA[t]}; transfer-syntax={t}"
                                                for t in lossless) if lossless else ""))


def _encode_plan(wanted: str, part: str, multipart: bool, stored_ts: str,
                 reasons: list[str]) -> FramePlan | None:
    """A plan compressing frames losslessly to ``wanted``, or None with the reason noted."""
    if not can_encode(wanted):
        reasons.append(f"no encoder here for {wanted}")
        return None
    if stored_ts not in NATIVE and not can_decode(stored_ts):
        reasons.append(f"no decoder here for the stored transfer syntax {stored_ts}")
        return None
    media = "application/octet-stream" if part == "application/octet-stream" else FRAME_MEDIA[wanted]
    return FramePlan(wanted, media, multipart, decode=stored_ts not in NATIVE, encode=True)


def parse_frame_list(text: str, count: int) -> list[int]:
    """``1,3,5`` → [1, 3, 5]; BadRequest for junk, NotFound-style ValueError beyond the end."""
    try:
        frames = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadRequest(f"frame list must be numbers separated by commas, got {text!r}") from None
    if not frames or any(f < 1 for f in frames):
        raise BadRequest("frame numbers start at 1")
    beyond = [f for f in frames if f > count]
    if beyond:
        raise LookupError(f"frame {beyond[0]} does not exist (the instance has {count})")
    return frames


def frame_count(pixel: dict[str, Any] | None, fallback: int | None) -> int:
    """Frames in an instance, from its frame index (or the fallback when it has none)."""
    if pixel:
        return int(pixel["n"])
    return int(fallback or 1)


def read_frame(path: Path, pixel: dict[str, Any] | None, n: int) -> bytes:
    """The stored bytes of frame ``n`` (1-based), by offset when the index has one."""
    if pixel:
        with open(path, "rb") as f:
            if not pixel["enc"]:
                f.seek(pixel["offset"] + (n - 1) * pixel["size"])
                return f.read(pixel["size"])
            out = bytearray()
            for off, length in pixel["frames"][n - 1]:
                f.seek(off)
                out += f.read(length)
            return bytes(out)
    return _frame_with_pydicom(path, n)


def _frame_with_pydicom(path: Path, n: int) -> bytes:
    """Fallback for layouts without an offset index (deflate, odd fragments, 1-bit)."""
    import pydicom
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        for i, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=count), 1):
            if i == n:
                return frame
        raise LookupError(f"frame {n} not found")
    arr = ds.pixel_array
    return (arr[n - 1] if count > 1 else arr).tobytes()


def decoded_frame(path: Path, n: int) -> bytes:
    """Frame ``n`` decoded to native little-endian bytes (transcoding to uncompressed)."""
    from pydicom.pixels import pixel_array

    arr = pixel_array(str(path), index=n - 1)
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def frame_bytes(path: Path, pixel: dict[str, Any] | None, n: int, plan: FramePlan) -> bytes:
    """Frame ``n`` as the plan says: stored bytes by offset, decoded, and/or re-encoded."""
    native = decoded_frame(path, n) if plan.decode else read_frame(path, pixel, n)
    return encoded_frame(path, native, plan.transfer_syntax, plan.decode) if plan.encode \
        else native


def encoded_frame(path: Path, native: bytes, ts: str, decoded: bool) -> bytes:
    """One native frame compressed losslessly to ``ts``, described by the file's header.

    A ValueError (pixel values the header does not allow, an odd layout) is for
    the caller to turn into a 406: the client can still ask for the stored syntax.
    """
    import pydicom
    from pydicom.pixels import get_encoder

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if decoded and samples == 3:
        photometric = "RGB"  # pydicom hands decoded colour frames over as RGB
    bits, signed = int(ds.BitsAllocated), int(ds.get("PixelRepresentation", 0))
    rows, cols = int(ds.Rows), int(ds.Columns)
    try:
        # As an array, so pydicom checks every value fits Bits Stored: given bytes, an
        # encoder may drop high bits silently, and "lossless" would not be.
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        arr = np.frombuffer(native, dtype=dtype)
        if samples > 1 and not decoded and int(ds.get("PlanarConfiguration", 0)) == 1:
            arr = arr.reshape(samples, rows, cols).transpose(1, 2, 0)
        arr = arr.reshape((rows, cols, samples) if samples > 1 else (rows, cols))
        return get_encoder(ts).encode(
            np.ascontiguousarray(arr), rows=rows, columns=cols, samples_per_pixel=samples,
            bits_allocated=bits, bits_stored=int(ds.get("BitsStored", bits)),
            pixel_representation=signed, photometric_interpretation=photometric,
            number_of_frames=1, planar_configuration=0)
    except (RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"cannot encode this frame as {ts}: {e}") from e


# -- multipart ------------------------------------------------------------------------
def new_boundary() -> str:
    """A multipart boundary that cannot occur in DICOM data by accident."""
    return uuid.uuid4().hex


def multipart(parts: Iterable[tuple[str, Iterable[bytes]]], boundary: str) -> Iterator[bytes]:
    """Stream ``multipart/related`` parts: (content type, chunks) each; never the whole body."""
    for content_type, chunks in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("ascii")
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("ascii")


def file_chunks(path: Path) -> Iterator[bytes]:
    """A file in CHUNK-sized pieces, so responses stream instead of loading whole files."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def gzip_stream(chunks: Iterable[bytes], level: int = 1) -> Iterator[bytes]:
    """gzip on the fly (level 1: ~3 ms per 512 KB CT frame here, a fraction of a thin link's time)."""
    z = zlib.compressobj(level, zlib.DEFLATED, 31)
    for chunk in chunks:
        out = z.compress(chunk)
        if out:
            yield out
    yield z.flush()


def wants_gzip(accept_encoding: str | None) -> bool:
    """Whether the client accepts gzip (and did not refuse it with q=0)."""
    for item in (accept_encoding or "").split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() == "gzip":
            key, _, value = params.replace(" ", "").partition("=")
            try:
                return key != "q" or float(value) > 0
            except ValueError:
                return False
    return False


def iter_parts(read: Callable[[int], bytes], boundary: bytes) -> Iterator[tuple[dict, bytes]]:
    """Parts of a multipart body read in chunks: (headers, body), one part in memory at a time."""
    delim = b"--" + boundary
    buf = bytearray()
    eof = False

    def fill() -> bool:
        nonlocal eof
        if eof:
            return False
        chunk = read(256 * 1024)
        if not chunk:
            eof = True
            return False
        buf.extend(chunk)
        return True

    while (i := buf.find(delim)) < 0:
        if not fill():
            raise ValueError("no multipart boundary found in the request body")
    del buf[: i + len(delim)]
    while True:
        while len(buf) < 2 and fill():
            pass
        if buf[:2] == b"--":
            return
        while (h := buf.find(b"\r\n\r\n")) < 0:
            if not fill():
                raise ValueError("a part ends before its headers do")
        headers = {}
        for line in bytes(buf[:h]).decode("latin-1").split("\r\n"):
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        del buf[: h + 4]
        end = b"\r\n" + delim
        start = 0
        while (j := buf.find(end, start)) < 0:
            if len(buf) > PART_LIMIT:
                raise ValueError("a part is larger than the 2 GiB limit")
            start = max(0, len(buf) - len(end))
            if not fill():
                raise ValueError("the body ends inside a part (missing closing boundary)")
        body = bytes(buf[:j])
        del buf[: j + len(end)]
        yield headers, body


# -- transcoding whole instances --------------------------------------------------------
def plan_instances(accept: str | None) -> tuple[str, str]:
    """(transfer syntax or '*', media) for application/dicom retrieval, or NotAcceptable."""
    reasons = []
    for m in parse_accept(accept):
        if m.media == "multipart/related" and m.part_type in ("", "application/dicom"):
            return m.transfer_syntax or EXPLICIT_LE, "multipart"
        if m.media in ("*/*", "application/*"):
            return "*", "multipart"
        if m.media == "application/dicom":
            return m.transfer_syntax or EXPLICIT_LE, "single"
        reasons.append(f"{m.media}{'; type=' + m.part_type if m.part_type else ''} "
                       "is not available for DICOM instances")
    raise NotAcceptable("; ".join(reasons) + '. Available: multipart/related; '
                        'type="application/dicom"')


def instance_servable(stored_ts: str, wanted: str) -> str | None:
    """None if the instance can be sent in ``wanted``, else the reason it cannot."""
    if wanted in ("*", stored_ts) or (wanted in NATIVE and stored_ts in NATIVE):
        return None
    if wanted == EXPLICIT_LE and can_decode(stored_ts):
        return None
    return f"cannot transcode the stored {stored_ts} to {wanted}"


def instance_chunks(path: Path, stored_ts: str, wanted: str) -> Iterable[bytes]:
    """The Part 10 bytes as stored, or decompressed to Explicit VR Little Endian."""
    if wanted in ("*", stored_ts) or (wanted in NATIVE and stored_ts in NATIVE):
        return file_chunks(path)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.decompress()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return [buf.getvalue()]


# -- rendered ----------------------------------------------------------------------------
def plan_rendered(accept_param: str | None, accept_header: str | None) -> str:
    """The image media type: the ``accept`` query parameter wins over the Accept header."""
    source = accept_param if accept_param else accept_header
    for m in parse_accept(source):
        if m.media in RENDER_TYPES:
            return m.media
        if m.media in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptable(f"rendered images are {' or '.join(RENDER_TYPES)}; asked for {source!r}")


@dataclass(frozen=True)
class RenderParams:
    window: tuple[float, float] | None
    viewport: tuple[int, int] | None
    quality: int


def parse_render_params(args: Any, thumbnail: bool = False) -> RenderParams:
    """``window=center,width[,linear]``, ``viewport=w,h``, ``quality=1..100`` (PS3.18 §8.3.5)."""
    window = None
    if args.get("window"):
        parts = args["window"].split(",")
        try:
            window = (float(parts[0]), float(parts[1]))
        except (ValueError, IndexError):
            raise BadRequest("window must be center,width[,function], e.g. window=40,80") from None
        if window[1] <= 0:
            raise BadRequest("window width must be greater than 0")
    viewport = (128, 128) if thumbnail else None
    if args.get("viewport"):
        parts = args["viewport"].split(",")
        try:
            viewport = (int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            raise BadRequest("viewport must be width,height in pixels, e.g. viewport=512,512") \
                from None
        if not (0 < viewport[0] <= 4096 and 0 < viewport[1] <= 4096):
            raise BadRequest("viewport sizes must be between 1 and 4096")
    quality = 90
    if args.get("quality"):
        if not re.fullmatch(r"\d{1,3}", args["quality"]) or not 1 <= int(args["quality"]) <= 100:
            raise BadRequest("quality must be a number from 1 to 100")
        quality = int(args["quality"])
    return RenderParams(window, viewport, quality)


def render(path: Path, n: int, media: str, params: RenderParams) -> bytes:
    """Frame ``n`` as an 8-bit JPEG/PNG: modality LUT, window, photometric, viewport."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, pixel_array

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    arr = pixel_array(str(path), index=n - 1)
    if ds.get("SamplesPerPixel", 1) == 1:
        values = apply_modality_lut(arr, ds).astype(np.float64)
        center, width = params.window or _file_window(ds, values)
        low = center - 0.5 - (width - 1) / 2
        scaled = np.clip((values - low) / max(width - 1, 1e-6), 0, 1) * 255
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            scaled = 255 - scaled
        img = Image.fromarray(scaled.astype(np.uint8), "L")
    else:
        img = Image.fromarray(arr.astype(np.uint8), "RGB")
    if params.viewport:
        img.thumbnail(params.viewport, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    if media == "image/png":
        img.save(out, "PNG")
    else:
        img.save(out, "JPEG", quality=params.quality)
    return out.getvalue()


def _file_window(ds: Any, values: np.ndarray) -> tuple[float, float]:
    c, w = ds.get("WindowCenter"), ds.get("WindowWidth")
    if c is not None and w is not None:
        c = c[0] if isinstance(c, list | tuple) or type(c).__name__ == "MultiValue" else c
        w = w[0] if isinstance(w, list | tuple) or type(w).__name__ == "MultiValue" else w
        if float(w) > 0:
            return float(c), float(w)
    lo, hi = float(values.min()), float(values.max())
    return (lo + hi) / 2, max(hi - lo, 1.0)


def pixel_info(text: str) -> dict[str, Any] | None:
    """The frame index kept in ``dicomweb_metadata.pixel`` (None: let pydicom find frames)."""
    return json.loads(text) if text else None
