"""``/notify/ack/<token>``: the acknowledgement link of a message, after sign-in; and
``/notify/contacts``: the signed-in user's own contact points (email, phone), each verified
by the code sent to it before any notification goes there.

GET shows what is acknowledged and a button; POST (with the session's CSRF token) records it.
A link is never acted on by GET alone: mail scanners and link previews fetch URLs.
"""

from __future__ import annotations

from flask import Blueprint, current_app, render_template, request

from appliance.accounts import sessions as auth
from appliance.core import audit
from appliance.notify import acks, channels, contacts, outbox
from appliance.web import get_db

bp = Blueprint("notify", __name__, url_prefix="/notify")


def _message(token: str) -> tuple[dict | None, str]:
    try:
        message_id = acks.check_token(acks.link_key(current_app.config["SITE"]), token,
                                      auth.now())
    except acks.AckError as e:
        return None, str(e)
    msg = acks.message(get_db(), message_id)
    if msg is None or msg["username"] != auth.current_user()["username"]:
        return None, "this message was sent to someone else"
    return msg, ""


@bp.get("/ack/<token>")
@auth.require()
def ack_page(token: str):
    msg, error = _message(token)
    return render_template("notify/ack.html", msg=msg, error=error, token=token,
                           done=False), (200 if msg else 403)


@bp.post("/ack/<token>")
@auth.require()
def ack(token: str):
    msg, error = _message(token)
    if msg is not None:
        try:
            acks.acknowledge(get_db(), msg["id"], msg["username"], auth.now(), "web",
                             auth.client_address())
        except acks.AckError as e:
            msg, error = None, str(e)
    return render_template("notify/ack.html", msg=msg, error=error, token=token,
                           done=msg is not None), (200 if msg else 409)


def _contacts_page(message: str = "", error: str = "", status: int = 200):
    user = auth.current_user()
    points = contacts.listing(get_db(), user["username"])
    return render_template("notify/contacts.html", points=points, message=message,
                           error=error), status


@bp.get("/contacts")
@auth.require()
def contacts_page():
    return _contacts_page()


@bp.post("/contacts")
@auth.require()
def set_contacts():
    """Your email and/or phone: stored unverified, a code sent there at once."""
    user, form = auth.current_user(), request.form
    wanted = {"email": form.get("email", "").strip(), "sms": form.get("phone", "").strip()}
    if not any(wanted.values()):
        return _contacts_page(error="give an email address or a phone number", status=400)
    try:
        lines = outbox.set_contacts(get_db(), current_app.config["SITE"], user["username"],
                                    wanted, auth.now(), user["username"],
                                    auth.client_address())
    except (contacts.ContactError, channels.CredentialsError) as e:
        return _contacts_page(error=str(e), status=400)
    return _contacts_page(message="; ".join(lines) + ". Enter the code below.")


@bp.post("/contacts/verify")
@auth.require()
def verify_contact():
    user, form = auth.current_user(), request.form
    channel = form.get("channel", "")
    try:
        contacts.verify(get_db(), user["username"], channel, form.get("code", ""), auth.now())
    except contacts.ContactError as e:
        return _contacts_page(error=str(e), status=400)
    audit.record(get_db(), user["username"], "notify.contact_verified", user["username"],
                 source=auth.client_address(), detail={"channel": channel})
    return _contacts_page(message=f"{channel} verified: notifications go there now.")
