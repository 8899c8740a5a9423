"""Notify benchmark: from a notification (an escalation firing) to the message at the SMTP
server, in gammu-smsd's outbox and at the webhook, with the worker sweeping at its default
interval (``worker.sweep_interval_s``, 2 s); then the same with the SMTP server refusing
(451) for a minute. Target: p95 < 10 s with every receiver up.

Real parts on loopback: aiosmtpd as the SMTP server, an HTTP receiver checking the HMAC
signature, gammu-smsd's FILES spool (the file's arrival in ``outbox/``). No peer runs here
(a paging product), so no ratio is printed.
Run: ``.venv/bin/python benchmarks/notify.py [--messages 200] [--refuse-s 60]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # a benchmark named like a standard module would shadow it

import argparse  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from appliance.core import config, db, notifications  # noqa: E402
from appliance.notify import channels, contacts, outbox  # noqa: E402
from appliance.setup import site  # noqa: E402

SECRET = "bench-webhook-secret"
SUBJECT = re.compile(r"Bench (\w+)-(\d+)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Arrivals:
    def __init__(self):
        self.at: dict[str, dict[str, float]] = {"email": {}, "sms": {}, "webhook": {}}
        self.refuse_until = 0.0

    def seen(self, channel: str, text: str) -> None:
        m = SUBJECT.search(text)
        if m:
            self.at[channel].setdefault(m.group(0), time.time())


def smtp_server(arr: Arrivals):
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            if time.time() < arr.refuse_until:
                return "451 try again later"
            arr.seen("email", envelope.content.decode("utf-8", "replace"))
            return "250 OK"

    port = _port()
    c = Controller(Handler(), hostname="127.0.0.1", port=port)
    c.start()
    return c, port


def webhook_server(arr: Arrivals):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers["Content-Length"]))
            ts = self.headers["X-Appliance-Timestamp"]
            mac = hmac.new(SECRET.encode(), ts.encode() + b"." + body, hashlib.sha256)
            ok = hmac.compare_digest("sha256=" + mac.hexdigest(),
                                     self.headers["X-Appliance-Signature"])
            if ok:
                arr.seen("webhook", json.loads(body)["text"])
            self.send_response(200 if ok else 401)
            self.end_headers()

        def log_message(self, *a):
            pass

    port = _port()
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, port


def watch_sms(spool: Path, arr: Arrivals, stop: threading.Event) -> None:
    """gammu-smsd would take these files; we time their arrival in its outbox."""
    seen: set[str] = set()
    while not stop.is_set():
        for p in (spool / "outbox").glob("OUT*.txt"):
            if p.name not in seen:
                seen.add(p.name)
                arr.seen("sms", p.read_text())
        stop.wait(0.05)


def worker(cfg, stop: threading.Event) -> None:
    """The worker's ticker: one notify sweep every worker.sweep_interval_s."""
    interval = float(cfg["worker"]["sweep_interval_s"])
    while not stop.is_set():
        outbox.sweep(cfg)
        stop.wait(interval)


def run_phase(cfg, arr: Arrivals, label: str, n: int, spread_s: float,
              refuse_s: float = 0.0) -> dict[str, list[float]]:
    conn = db.connect(cfg.db_path)
    sent: dict[str, float] = {}
    arr.refuse_until = time.time() + refuse_s
    for i in range(n):
        key = f"Bench {label}-{i}"
        user = "dr.mail" if i % 2 == 0 else "dr.phone"
        sent[key] = time.time()
        notifications.notify(conn, [user], "escalation.bench", key, now=sent[key])
        time.sleep(spread_s / n)
    conn.close()
    deadline = time.time() + 120 + refuse_s
    expected = {"email": n // 2 + n % 2, "sms": n // 2, "webhook": n}
    while time.time() < deadline:
        got = {c: sum(1 for k in arr.at[c] if k.startswith(f"Bench {label}-"))
               for c in expected}
        if got == expected:
            break
        time.sleep(0.2)
    return {c: [arr.at[c][k] - sent[k] for k in sent if k in arr.at[c]] for c in expected}


def _p(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def report(title: str, lat: dict[str, list[float]], n: int) -> None:
    print(title)
    for channel, values in lat.items():
        print(f"  {channel:8} {len(values):4d} delivered   p50 {_p(values, 0.5):6.2f} s   "
              f"p95 {_p(values, 0.95):6.2f} s   max {max(values, default=float('nan')):6.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--spread-s", type=float, default=20.0, help="escalations spread over this")
    ap.add_argument("--refuse-s", type=float, default=60.0)
    args = ap.parse_args()
    arr = Arrivals()
    smtp, smtp_port = smtp_server(arr)
    hook, hook_port = webhook_server(arr)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        spool = base / "sms"
        for d in ("outbox", "sent", "error", "inbox"):
            (spool / d).mkdir(parents=True)
        creds = base / "creds"
        channels.write_credentials(creds, {"webhook_secret": SECRET})
        res = site.init_data_dir(base / "site", site_name="Bench")
        cfg_path = res.data_dir / config.CONFIG_NAME
        cfg_path.write_text(cfg_path.read_text() + (
            f"\nnotify:\n  health_alerts: false\n  smtp_host: 127.0.0.1\n"
            f"  smtp_port: {smtp_port}\n  smtp_security: none\n  sms_spool: {spool}\n"
            f"  webhook_url: http://127.0.0.1:{hook_port}/hook\n  credentials_file: {creds}\n"))
        cfg = config.load(res.data_dir)
        conn = db.open_db(cfg.db_path)
        from appliance.accounts import users

        now = time.time()
        for name, channel, address in (("dr.mail", "email", "mail@bench.example"),
                                       ("dr.phone", "sms", "+254700000001")):
            users.add_user(conn, name, "radiologist", "correct-horse-battery")
            code = contacts.set_contact(conn, name, channel, address, now)
            contacts.verify(conn, name, channel, code, now)
        conn.close()
        stop = threading.Event()
        threads = [threading.Thread(target=worker, args=(cfg, stop), daemon=True),
                   threading.Thread(target=watch_sms, args=(spool, arr, stop), daemon=True)]
        for t in threads:
            t.start()
        print(f"notify benchmark: {args.messages} escalations over {args.spread_s:g} s, worker"
              f" sweeping every {cfg['worker']['sweep_interval_s']} s (target p95 < 10 s)")
        report("all receivers up:", run_phase(cfg, arr, "up", args.messages, args.spread_s),
               args.messages)
        n2 = max(2, args.messages // 4)
        report(f"SMTP refusing (451) for {args.refuse_s:g} s ({n2} escalations; mail retried"
               f" with backoff, SMS unaffected):",
               run_phase(cfg, arr, "refusing", n2, args.spread_s / 4, args.refuse_s), n2)
        stop.set()
        for t in threads:
            t.join(10)
    smtp.stop()
    hook.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
