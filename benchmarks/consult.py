"""Consult benchmark: join time, and what a consult costs the appliance, P2P vs relayed.

Against ``appliance web`` as deployed (gunicorn, HTTPS) and Debian's coturn, with two
Debian chromium instances (fake camera and microphone) in one consult:

* **join**: join to the first decoded remote frame, over ``--joins`` joins (the remote side
  leaves and joins again); p50/p95. Targets: p95 < 1 s on loopback, < 2 s through coturn.
* **CPU per consult**: CPU time of the appliance's processes (gunicorn master and workers,
  coturn) over ``--seconds`` of a steady call, as a share of one core: P2P (media browser to
  browser; the appliance only signals; target < 10 %) and relay-only (every packet through
  coturn).
* **aiortc relay ceiling**: what one 640×480 stream costs aiortc: decoding (``appliance media
  probe`` receiving the call, its process CPU) plus VP8 re-encoding (aiortc's encoder on 640×480
  frames in this process); streams 80 % of the cores carry, next to ``relay_capacity``.
* **CPU in relay mode**: ``appliance media serve`` joined as the relay of last resort between
  two aiortc endpoints (640×480 moving pattern + audio each way, the test client of
  tests/consult_aiortc_client.py), the service process's CPU per relayed consult over
  ``--seconds``, next to that ceiling.

Browsers share the 2 cores with the appliance: figures are pessimistic; compare runs here.
Run: ``.venv/bin/python benchmarks/consult.py [--joins 20] [--seconds 10]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a benchmark named like a standard module (it was queue.py) would shadow it

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from fractions import Fraction  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the aiortc consult endpoint the tests use

from appliance.accounts import users as accounts  # noqa: E402
from appliance.consults import media, turn  # noqa: E402
from appliance.consults import rooms as consults  # noqa: E402
from appliance.core import config, db  # noqa: E402

PASSWORD = "bench-consult-password"
ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        "--allow-loopback-in-peer-connection", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--autoplay-policy=no-user-gesture-required"]
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open")


def tree(pid: int) -> list[int]:
    """A process and its descendants (gunicorn's workers)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / TICKS


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def make_site(base: Path) -> tuple[Path, int]:
    data = base / "site"
    web_port = free_port()
    subprocess.run([sys.executable, "-m", "appliance", "init", "--data-dir", str(data),
                    "--dicom-port", str(free_port()), "--web-port", str(web_port)],
                   check=True, capture_output=True)
    path = data / "appliance.yaml"
    path.write_text(path.read_text().replace("turn_port: 3478", f"turn_port: {free_port()}")
                    .replace('turn_bind: "0.0.0.0"', 'turn_bind: "127.0.0.1"')
                    .replace("totp_required_for_readers: true", "totp_required_for_readers: false"))
    conn = db.open_db(data / "appliance.db")
    accounts.add_user(conn, "nurse", "site_staff", PASSWORD, display_name="Nurse")
    accounts.add_user(conn, "neuro", "neurologist", PASSWORD, display_name="Dr Neuro")
    conn.close()
    return data, web_port


def sign_in(page, base: str, user: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/login" not in url, timeout=90000)  # argon2 on a busy box


def enter(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("[data-testid=join]:not([disabled])", timeout=20000)
    page.click("[data-testid=join]")


def joined(page) -> int:
    page.wait_for_function("() => window.consult && window.consult.joinMs !== null",
                           timeout=30000)
    return page.evaluate("window.consult.joinMs")


def steady_cpu(pids: list[int], seconds: float) -> float:
    before, t0 = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)  # measuring a steady call: time passing is the measurement
    return (cpu_seconds(pids) - before) / (time.monotonic() - t0)


def encode_share(frames: int = 150) -> float:
    """CPU share of one core to VP8-encode a 640x480 stream at 30 fps with aiortc's encoder."""
    import av
    import numpy as np
    from aiortc.codecs.vpx import Vp8Encoder

    enc = Vp8Encoder()
    y = np.arange(640, dtype=np.int32)[None, :].repeat(480, 0)
    t0 = time.process_time()
    for i in range(frames):
        img = np.stack([(y + i * 3) % 256, y[::-1] % 256, (y * 2 + i) % 256], axis=2)
        frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
        frame.pts, frame.time_base = i * 3000, Fraction(1, 90000)
        enc.encode(frame)
    return (time.process_time() - t0) / frames * 30


def relay_mode(cfg, data: Path, seconds: float) -> dict:
    """CPU of ``appliance media serve`` relaying one consult between two aiortc endpoints."""
    import asyncio

    from consult_aiortc_client import Endpoint, wait_for_media_participant

    from appliance.consults import media_jobs

    conn = db.connect(cfg.db_path)
    cid = consults.create_consult(conn, "nurse", title="Relayed benchmark consult")
    media_jobs.request(conn, cid, "relay", "nurse", 3600)
    conn.close()
    service = subprocess.Popen([sys.executable, "-m", "appliance", "media", "serve",
                                "--data-dir", str(data)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)

    async def phase() -> dict:
        ice = consults.ice_servers(cfg, "127.0.0.1", cid)
        a = Endpoint(cfg, cid, {"id": 1, "username": "nurse", "role": "site_staff"},
                     ice_servers=ice, size=(640, 480))
        b = Endpoint(cfg, cid, {"id": 2, "username": "neuro", "role": "neurologist"},
                     ice_servers=ice, size=(640, 480))
        try:
            relay = await wait_for_media_participant(a, "relay", timeout=60)
            t0 = time.monotonic()
            await a.offer(relay)
            await b.offer(relay)
            both = lambda: a.frames["video"] > 30 and b.frames["video"] > 30  # noqa: E731
            await asyncio.gather(a.run_until(both, 60), b.run_until(both, 60))
            up = time.monotonic() - t0
            f0, c0, w0 = (a.frames["video"], b.frames["video"]), cpu_seconds([service.pid]), \
                time.monotonic()
            await asyncio.gather(a.run_until(lambda: False, seconds),
                                 b.run_until(lambda: False, seconds))
            wall = time.monotonic() - w0
            return {"cpu": (cpu_seconds([service.pid]) - c0) / wall, "up_s": up,
                    "fps": ((a.frames["video"] - f0[0]) / wall,
                            (b.frames["video"] - f0[1]) / wall)}
        finally:
            await a.close()
            await b.close()

    try:
        return asyncio.run(phase())
    finally:
        os.killpg(service.pid, signal.SIGTERM)
        service.wait(timeout=20)


def print_relay(relayed: dict, cfg, ceiling: int | None = None) -> None:
    per_consult = relayed["cpu"]
    ceiling_txt = "" if ceiling is None else \
        f" next to the ceiling of {ceiling} relayed streams ({ceiling // 2} consults) and"
    print(f"CPU in relay mode (appliance media serve relaying one consult, 2 x 640x480 video +"
          f" audio, both ways): {per_consult:.0%} of a core; media up through the relay in"
          f" {relayed['up_s']:.1f} s; {relayed['fps'][0]:.1f} / {relayed['fps'][1]:.1f} fps"
          f" delivered -> {(os.cpu_count() or 1) * 0.8 / max(per_consult, 1e-6):.1f} relayed"
          f" consults in 80% of {os.cpu_count()} cores,{ceiling_txt} the configured cap of"
          f" {media.relay_capacity(cfg['consults']['relay_max_streams'])} streams")


def relay_only(seconds: float) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        data, _web_port = make_site(Path(tmp))
        cfg = config.load(data)
        coturn = subprocess.Popen(turn.command(cfg), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            relayed = relay_mode(cfg, data, seconds)
        finally:
            coturn.terminate()
            coturn.wait(timeout=10)
    print_relay(relayed, cfg)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--joins", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--relay-only", action="store_true",
                    help="only the aiortc relay phase (no browsers)")
    args = ap.parse_args()
    if args.relay_only:
        return relay_only(args.seconds)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        data, web_port = make_site(Path(tmp))
        cfg = config.load(data)
        conn = db.connect(cfg.db_path)
        cid = consults.create_consult(conn, "nurse", title="Benchmark consult")
        conn.close()
        coturn = subprocess.Popen(turn.command(cfg), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        web = subprocess.Popen([sys.executable, "-m", "appliance", "web", "--data-dir", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
        try:
            wait_for_port(web_port)
            base, room = f"https://127.0.0.1:{web_port}", f"https://127.0.0.1:{web_port}/consults/{cid}"
            with sync_playwright() as pw:
                b1 = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
                b2 = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=ARGS)
                nurse = b1.new_context(ignore_https_errors=True).new_page()
                neuro = b2.new_context(ignore_https_errors=True).new_page()
                sign_in(nurse, base, "nurse")
                sign_in(neuro, base, "neuro")
                enter(nurse, room)
                enter(neuro, room)
                joins = [joined(neuro)]
                for _ in range(args.joins - 1):
                    neuro.click("[data-testid=leave]")
                    neuro.wait_for_function("() => window.consult.step === 'left'")
                    enter(neuro, room)
                    joins.append(joined(neuro))
                appliance_pids = tree(web.pid) + [coturn.pid]
                neuro.wait_for_function("() => window.consult.fps > 5", timeout=20000)
                p2p = steady_cpu(appliance_pids, args.seconds)
                p2p_turn = steady_cpu([coturn.pid], 0.01)
                # Relay only: both sides through coturn.
                relay_joins = []
                for _ in range(3):
                    neuro.click("[data-testid=leave]")
                    neuro.wait_for_function("() => window.consult.step === 'left'")
                    nurse.goto("about:blank")
                    enter(nurse, room + "?relay=1")
                    enter(neuro, room + "?relay=1")
                    relay_joins.append(joined(neuro))
                neuro.wait_for_function("() => window.consult.fps > 5", timeout=20000)
                t0c = cpu_seconds([coturn.pid])
                relay = steady_cpu(appliance_pids, args.seconds)
                relay_turn = (cpu_seconds([coturn.pid]) - t0c) / args.seconds
                # aiortc: decoding one stream (the probe receives the nurse's camera).
                ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                probe = subprocess.Popen(
                    [sys.executable, "-m", "appliance", "media", "probe", "--consult", str(cid),
                     "--seconds", str(args.seconds), "--data-dir", str(data)],
                    stdout=subprocess.PIPE, text=True)
                out, _ = probe.communicate(timeout=args.seconds + 60)
                ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                b1.close()
                b2.close()
            relayed = relay_mode(cfg, data, args.seconds)
        finally:
            os.killpg(web.pid, signal.SIGTERM)
            coturn.terminate()
            web.wait(timeout=20)
            coturn.wait(timeout=10)
    result = json.loads(out)
    # The probe's whole CPU (start-up and ICE included) over its stay: decoding dominates.
    streams = max(1, result["video_tracks"])  # the probe receives every browser's camera
    decode = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / args.seconds / streams
    encode = encode_share()
    per_stream = decode + encode
    ceiling = int((os.cpu_count() or 1) * 0.8 / per_stream)
    print(f"consult joins (join to first remote frame, {len(joins)} joins, loopback):"
          f" p50 {statistics.median(joins):.0f} ms, p95 {pct(joins, 0.95):.0f} ms (target p95 < 1000)")
    print(f"through coturn, relay only ({len(relay_joins)} joins): p50"
          f" {statistics.median(relay_joins):.0f} ms, p95 {pct(relay_joins, 0.95):.0f} ms"
          " (target < 2000)")
    print(f"appliance CPU per consult, P2P: {p2p:.1%} of a core (target < 10%;"
          f" coturn idle {p2p_turn:.1%})")
    print(f"appliance CPU per consult, relay via coturn: {relay:.1%} of a core"
          f" (coturn {relay_turn:.1%}); ratio relay/P2P {relay / max(p2p, 1e-6):.1f}x")
    print(f"aiortc per 640x480 stream: decode ~{decode:.0%} (probe: {streams} streams,"
          f" {result['frames']} frames,"
          f" {result['fps']} fps, join {result['join_ms']} ms) + VP8 encode {encode:.0%}"
          f" = {per_stream:.0%} of a core -> ceiling {ceiling} relayed streams on"
          f" {os.cpu_count()} cores; configured cap {media.relay_capacity(cfg['consults']['relay_max_streams'])}")
    print(f"ratio aiortc relay / coturn relay CPU per stream: {per_stream / max(relay_turn, 1e-6):.0f}x")
    print_relay(relayed, cfg, ceiling)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
