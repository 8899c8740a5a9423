"""The SMS channel: files in gammu-smsd's spool (its FILES backend), so a GSM modem sends them
with no internet at all; replies ("ACK <code>") are read from the same spool's inbox.

Layout under ``notify.sms_spool`` (gammu-smsd's ``OutboxPath``, ``SentSMSPath``,
``ErrorSMSPath``, ``InboxPath``): ``outbox/``, ``sent/``, ``error/``, ``inbox/``. A message
file is ``OUTA<date>_<time>_00_<number>_<key>.txt``: the key in the note field makes a resend
after a crash recognisable (``already_sent`` looks for it in outbox, sent and error).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from appliance.core import durable
from appliance.core.notifications import DeliveryError, OutboundMessage

NUMBER_RE = re.compile(r"^\+?[0-9]{3,20}$")
SMS_LIMIT = 459  # three concatenated 7-bit parts
INBOX_RE = re.compile(r"^IN(\d{8})_(\d{6})_(\d{2})_([^_]+)_(\d{2})\.txt$")


class SmsChannel:
    """Queues each message for gammu-smsd by writing one file into its outbox."""

    name = "sms"
    resend_safe = True  # already_sent finds the file by its key in outbox, sent or error

    def __init__(self, spool: Path):
        self.spool = Path(spool)

    def send(self, address: str, message: OutboundMessage,
             committing: Callable[[], None] = lambda: None) -> str:
        """Write the file atomically (gammu-smsd ignores names not starting with OUT)."""
        if not NUMBER_RE.match(address):
            raise DeliveryError(f"not a phone number: {address!r}")
        outbox = self.spool / "outbox"
        if not outbox.is_dir():
            raise DeliveryError(f"gammu-smsd outbox {outbox} does not exist")
        stamp = time.strftime("%Y%m%d_%H%M%S", time.gmtime())
        name = f"OUTA{stamp}_00_{address}_{message.key}.txt"
        text = message.body.encode("ascii", "replace")[:SMS_LIMIT]
        committing()
        try:
            durable.atomic_write(outbox / name, text)  # its temp name starts with "."
        except OSError as e:
            raise DeliveryError(f"cannot write to the gammu-smsd outbox: {e.strerror}") from None
        return f"queued for gammu-smsd as {name}"

    def already_sent(self, address: str, key: str) -> bool:
        for folder in ("outbox", "sent", "error"):
            if any((self.spool / folder).glob(f"OUT*_{address}_{key}.txt")):
                return True
        return False

    def replies(self) -> list[tuple[Path, str, str]]:
        """(file, sender number, text) of each received message in gammu-smsd's inbox."""
        out = []
        inbox = self.spool / "inbox"
        for path in sorted(inbox.glob("IN*.txt")) if inbox.is_dir() else []:
            m = INBOX_RE.match(path.name)
            if m:
                out.append((path, m.group(4), path.read_text("utf-8", "replace")))
        return out

    def done_with(self, path: Path) -> None:
        """Move a handled reply out of the inbox (to ``inbox/handled/``), so it counts once."""
        handled = path.parent / "handled"
        handled.mkdir(exist_ok=True)
        os.replace(path, handled / path.name)

