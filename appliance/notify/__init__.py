"""Notifications that leave the box: email (SMTP), SMS (gammu-smsd spool), webhooks; the
delivery outbox, acknowledgement links and SMS codes, the unacknowledged-page ladder."""
