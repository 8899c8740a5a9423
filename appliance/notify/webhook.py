"""The webhook channel: a JSON POST signed with HMAC-SHA256, for a paging gateway or a chat room.

Scheme (README "Webhook signature"): headers ``X-Appliance-Timestamp: <unix seconds>``,
``X-Appliance-Idempotency-Key: <key>`` and ``X-Appliance-Signature: sha256=<hex>`` where the
hex is HMAC-SHA256(secret, ``<timestamp>.<raw body>``). A receiver recomputes it over the raw
bytes, rejects a timestamp older than 5 minutes (a replay) and a key it has seen. The body has
``text`` (what Mattermost and Slack incoming webhooks show) and the message's fields.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from appliance.core.notifications import DeliveryError, OutboundMessage

REPLAY_WINDOW_S = 300


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` over ``timestamp.body``: what the receiver recomputes."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, headers: dict[str, str], body: bytes, now: float | None = None,
           window_s: float = REPLAY_WINDOW_S) -> bool:
    """A receiver's check: the signature matches the raw body and the timestamp is fresh."""
    now = time.time() if now is None else now
    ts = headers.get("X-Appliance-Timestamp", "")
    if not ts.isdigit() or abs(now - int(ts)) > window_s:
        return False
    return hmac.compare_digest(signature(secret, ts, body),
                               headers.get("X-Appliance-Signature", ""))


class WebhookChannel:
    """POSTs each message to one URL (the site's ``notify.webhook_url``)."""

    name = "webhook"
    resend_safe = True  # the receiver drops an idempotency key it has seen

    def __init__(self, secret: bytes, timeout_s: float = 10.0, clock=time.time):
        self.secret, self.timeout_s, self.clock = secret, timeout_s, clock

    def send(self, address: str, message: OutboundMessage,
             committing: Callable[[], None] = lambda: None) -> str:
        """A 2xx answer is delivery; anything else is an error kept on the outbox row."""
        body = json.dumps({"text": f"{message.subject}\n{message.body}", "key": message.key,
                           **message.fields}, sort_keys=True).encode("utf-8")
        ts = str(int(self.clock()))
        req = urllib.request.Request(address, data=body, method="POST", headers={
            "Content-Type": "application/json", "X-Appliance-Timestamp": ts,
            "X-Appliance-Idempotency-Key": message.key,
            "X-Appliance-Signature": signature(self.secret, ts, body)})
        committing()
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            raise DeliveryError(f"HTTP {e.code}") from None
        except (urllib.error.URLError, OSError) as e:
            raise DeliveryError(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from None

    def already_sent(self, address: str, key: str) -> bool:
        return False  # the receiver drops a key it has seen (the idempotency key)
