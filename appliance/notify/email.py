"""The email channel: one message per SMTP transaction, STARTTLS, implicit TLS or plain.

SMTP offers no way to ask a server whether it holds a message, so the hand-over mark is set
only once the whole message is written (after that the server has it, whether or not this
process lives to read its "250"): a row found handed after a crash counts as sent, a row not
handed is sent again (the server dropped the partial message). The Message-ID is the outbox
row's stable key all the same.
"""

from __future__ import annotations

import re
import smtplib
import ssl
from collections.abc import Callable
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate

from appliance.core.notifications import DeliveryError, OutboundMessage


class EmailChannel:
    """Hands each message to one SMTP server (the site's relay or a provider)."""

    name = "email"
    resend_safe = False  # handed over means the server holds it: never sent twice

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
                code, answer = _data(smtp, mail.as_bytes(policy=SMTP), committing)
        except (smtplib.SMTPException, OSError) as e:
            raise DeliveryError(f"{type(e).__name__}: {_reason(e)}") from None
        return f"{code} {answer.decode('utf-8', 'replace')[:200]}"

    def already_sent(self, address: str, key: str) -> bool:
        return False


def _data(smtp: smtplib.SMTP, content: bytes,
          committing: Callable[[], None]) -> tuple[int, bytes]:
    """DATA by hand, so ``committing()`` runs once the whole message and its final "." are
    written: past that point the server has all of it even if this process dies (the kernel
    still sends the written bytes), so a restart must not send it again."""
    smtp.putcmd("data")
    code, answer = smtp.getreply()
    if code != 354:
        raise smtplib.SMTPDataError(code, answer)
    body = re.sub(rb"(?m)^\.", b"..", content)
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    smtp.send(body + b".\r\n")
    committing()
    code, answer = smtp.getreply()
    if code != 250:
        raise smtplib.SMTPDataError(code, answer)
    return code, answer


def _reason(e: Exception) -> str:
    """The server's words or the socket error, never our credentials."""
    if isinstance(e, smtplib.SMTPResponseException):
        return f"{e.smtp_code} {e.smtp_error.decode('utf-8', 'replace')[:200]}"
    return str(e)[:200]
