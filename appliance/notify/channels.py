"""The outbound channels this site has configured (``notify:`` in appliance.yaml).

Secrets (the SMTP password, the webhook secret) are read from ``notify.credentials_file``,
a 0600 file of ``name = value`` lines, never from appliance.yaml, and never logged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from appliance.core import config
from appliance.core.notifications import OutboundChannel
from appliance.notify.email import EmailChannel
from appliance.notify.sms import SmsChannel
from appliance.notify.webhook import WebhookChannel

SECRET_NAMES = ("smtp_password", "webhook_secret")


class CredentialsError(Exception):
    """The credentials file is unreadable, readable by others, or malformed."""


def read_credentials(path: Path) -> dict[str, str]:
    """``smtp_password = …`` / ``webhook_secret = …``; refused unless only its owner reads it."""
    text = config.read_secret_file(path, CredentialsError)
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or name.strip() not in SECRET_NAMES:
            raise CredentialsError(f"{path}:{n}: expected one of {', '.join(SECRET_NAMES)}"
                                   " = VALUE")
        out[name.strip()] = value.strip()
    return out


def write_credentials(path: Path, values: dict[str, str]) -> None:
    """Create or replace the file with mode 0600 (for `notify` setup and tests)."""
    data = "".join(f"{k} = {v}\n" for k, v in values.items() if k in SECRET_NAMES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data)
    os.chmod(path, 0o600)


def configured(cfg: config.Config,
               clock: Callable[[], float] = time.time) -> dict[str, OutboundChannel]:
    """Channel name → channel, for each channel appliance.yaml sets up (``clock`` stamps
    webhook timestamps: the worker's clock, so tests under a fake clock agree)."""
    n = cfg["notify"]
    secrets = read_credentials(Path(n["credentials_file"])) if n["credentials_file"] else {}
    out: dict[str, OutboundChannel] = {}
    if n["smtp_host"]:
        out["email"] = EmailChannel(n["smtp_host"], int(n["smtp_port"]), n["smtp_security"],
                                    n["smtp_from"], n["smtp_user"],
                                    secrets.get("smtp_password", ""), float(n["timeout_s"]))
    if n["sms_spool"]:
        out["sms"] = SmsChannel(Path(n["sms_spool"]))
    if n["webhook_url"]:
        if not secrets.get("webhook_secret"):
            raise CredentialsError("notify.webhook_url is set but the credentials file has no"
                                   " webhook_secret")
        out["webhook"] = WebhookChannel(secrets["webhook_secret"].encode("utf-8"),
                                        float(n["timeout_s"]), clock)
    return out
