"""The email channel: one message per SMTP transaction, STARTTLS, implicit TLS or plain.

The Message-ID is the outbox row's stable key, so a resend after a crash carries the same
Message-ID and a receiving mail system (or a person) can recognise the duplicate; SMTP offers
no way to ask a server whether it already holds a message, so ``already_sent`` is False.
"""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate

from appliance.core.notifications import DeliveryError, OutboundMessage


class EmailChannel:
    """Hands each message to one SMTP server (the site's relay or a provider)."""

    name = "email"
    resend_safe = False  # SMTP cannot be asked what it holds: never sent twice (at most once)

    def __init__(self, host: str, port: int, security: str, sender: str, user: str = "",
                 password: str = "", timeout_s: float = 10.0):
        self.host, self.port, self.security = host, port, security
        self.sender, self.user, self.password = sender, user, password
        self.timeout_s = timeout_s

    def _connect(self) -> smtplib.SMTP:
        context = ssl.create_default_context()
        if self.security == "tls":
            return smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout_s,
                                    context=context)
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout_s)
        if self.security == "starttls":
            smtp.starttls(context=context)
        return smtp

    def send(self, address: str, message: OutboundMessage,
             committing: Callable[[], None] = lambda: None) -> str:
        """Deliver to the server; the answer is the server's reply to the message's DATA."""
        mail = EmailMessage()
        mail["From"], mail["To"] = self.sender, address
        mail["Subject"] = message.subject
        mail["Date"] = formatdate(usegmt=True)
        mail["Message-ID"] = f"<{message.key}@{self.sender.rpartition('@')[2] or 'appliance'}>"
        mail.set_content(message.body)
        try:
            with self._connect() as smtp:
                if self.user:
                    smtp.login(self.user, self.password)
                smtp.ehlo_or_helo_if_needed()
                code, answer = smtp.mail(self.sender)
                if code != 250:
                    raise smtplib.SMTPSenderRefused(code, answer, self.sender)
                code, answer = smtp.rcpt(address)
                if code not in (250, 251):
                    raise smtplib.SMTPRecipientsRefused({address: (code, answer)})
                committing()
                code, answer = smtp.data(mail.as_bytes())
        except (smtplib.SMTPException, OSError) as e:
            raise DeliveryError(f"{type(e).__name__}: {_reason(e)}") from None
        return f"{code} {answer.decode('utf-8', 'replace')[:200]}"

    def already_sent(self, address: str, key: str) -> bool:
        return False


def _reason(e: Exception) -> str:
    """The server's words or the socket error, never our credentials."""
    if isinstance(e, smtplib.SMTPResponseException):
        return f"{e.smtp_code} {e.smtp_error.decode('utf-8', 'replace')[:200]}"
    return str(e)[:200]
