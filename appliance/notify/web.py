"""``/notify/ack/<token>``: the acknowledgement link of a message, after sign-in.

GET shows what is acknowledged and a button; POST (with the session's CSRF token) records it.
A link is never acted on by GET alone: mail scanners and link previews fetch URLs.
"""

from __future__ import annotations

from flask import Blueprint, current_app, render_template

from appliance.accounts import sessions as auth
from appliance.notify import acks
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
