"""Consult pages and their JSON/SSE endpoints: start, invite, lobby, signaling, chat, stats.

Staff and readers are signed in (``auth.require``). A remote specialist
without an account arrives by invite link, types a name and waits in the
lobby; their participant secret lives in their session cookie only. Views
open to such guests are marked public and check the caller themselves
(:func:`_caller`): no participant of this consult, no access.

One event stream per participant (``/consults/N/events``, SSE) carries
signaling, chat, ladder steps and presence. It polls ``consult_events``
with the row id as cursor, because gunicorn workers share no memory; it
ends after ``STREAM_S`` and the browser's EventSource reconnects with
``Last-Event-ID``, so a stream never pins a worker thread for long.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    jsonify,
    redirect,
    render_template,
    request,
    session,
)

from appliance.accounts import permissions
from appliance.accounts import sessions as auth
from appliance.consults import media_jobs
from appliance.consults import recordings as consult_recordings
from appliance.consults import rooms as consults
from appliance.core import db, metrics
from appliance.web import get_db

bp = Blueprint("consults", __name__)
HOSTS = consults.HOST_ROLES
STREAM_S = 25.0
POLL_S = 0.05  # a message waits at most this long in the table
KEEPALIVE_S = 2.0  # a ping this often: a page knows its channel is silent within 2 s


@bp.errorhandler(consults.ConsultError)
def _consult_error(e: consults.ConsultError):
    if auth.wants_json():
        return jsonify(error=str(e)), 400
    return render_template("error.html", message=str(e)), 400


@bp.errorhandler(permissions.Refused)
def _refused(e: permissions.Refused):
    if auth.wants_json():
        return jsonify(error=e.message), e.status
    return render_template("error.html", message=e.message), e.status


# -- who may see a consult -------------------------------------------------------------------------
def _may_enter(consult: Any, user: dict[str, Any], action: str) -> None:
    """A consult of a study is that study's patient data: its creator, its participants,
    a host who came by its invite link, and whoever may see the study (site, pool, grant)
    may enter; anyone else is refused (403, audited). A consult without a study is open
    to every host."""
    if not consult["study_uid"] or consult["created_by"] == user["username"]:
        return
    if consults.user_participant(get_db(), consult["id"], user["id"]) is not None:
        return
    if str(consult["id"]) in (session.get("consult_invited") or {}):
        return
    permissions.check_study(consult["study_uid"], action)


def _consult_access(action: str) -> Callable:
    """Mark a consult route as patient data and check the signed-in caller first
    (guests, who have no account, are checked by the view against their secret)."""
    def decorate(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(cid: int, *args: Any, **kwargs: Any):
            user = auth.current_user()
            if user is not None:
                _may_enter(consults.get_consult(get_db(), cid), user, action)
            return view(cid, *args, **kwargs)

        return permissions.patient_data("consult")(wrapped)

    return decorate


def _visible_consults(rows: list[dict]) -> list[dict]:
    """The open consults the caller may enter (the list names patients in its titles)."""
    user = auth.current_user()
    seen = permissions.visible_to_caller(r["study_uid"] for r in rows if r["study_uid"])
    mine = {r["consult_id"] for r in get_db().execute(
        "SELECT DISTINCT consult_id FROM consult_participants WHERE user_id = ?", (user["id"],))}
    invited = session.get("consult_invited") or {}
    return [r for r in rows if not r["study_uid"] or r["study_uid"] in seen
            or r["created_by"] == user["username"] or r["id"] in mine or str(r["id"]) in invited]


def _cfg() -> Any:
    return current_app.config["SITE"]


def _now() -> float:
    return auth.now()


def _invite_key() -> bytes:
    return consults.load_key(_cfg().keys_dir, consults.INVITE_KEY_FILE)


def _guest_secret(cid: int) -> str | None:
    return (session.get("consult_guests") or {}).get(str(cid))


def _caller(cid: int, lobby_ok: bool = False) -> tuple[Any, str]:
    """(participant row, audit actor) of the caller in consult ``cid``, or 403."""
    conn = get_db()
    user = auth.current_user()
    if user is not None:
        p = consults.user_participant(conn, cid, user["id"])
        if p is not None and p["state"] == "admitted":
            return p, user["username"]
    secret = _guest_secret(cid)
    if secret:
        p = consults.guest_by_secret(conn, cid, secret)
        if p is not None and (p["state"] == "admitted" or (lobby_ok and p["state"] == "lobby")):
            return p, f"guest:{p['name']}"
    permissions.deny("consult.denied", f"consult:{cid}", "not a participant of this consult")
    abort(403, "you are not in this consult")


def _admitted_guest(cid: int) -> bool:
    """Whether the guest calling is in the call: only then does the page name the consult
    (its title is often the patient's name); a guest in the lobby is a stranger with a link."""
    secret = _guest_secret(cid)
    guest = consults.guest_by_secret(get_db(), cid, secret) if secret else None
    return guest is not None and guest["state"] == "admitted"


def _host_name() -> str:
    """The host name the browser used for us (TURN is on the same host unless configured)."""
    return urlsplit("//" + request.host).hostname or "127.0.0.1"


def _body() -> dict[str, Any]:
    data = request.get_json(silent=True)
    if data is None:
        data = request.form.to_dict()
    if not isinstance(data, dict):
        raise consults.ConsultError("expected a JSON object")
    return data


# -- pages ----------------------------------------------------------------------------------------
@bp.get("/consults")
@auth.require(*HOSTS)
@permissions.patient_data("list")
def index():
    rows = _visible_consults(consults.open_consults(get_db()))
    return render_template("consults/index.html", consults=rows,
                           study_uid=request.args.get("study", ""))


@bp.post("/consults")
@auth.require(*HOSTS)
@permissions.patient_data("study")
def start():
    """Start a consult from a study (``study_uid``) or from scratch."""
    data = _body()
    user = auth.current_user()
    study_uid = str(data.get("study_uid") or "").strip()
    if study_uid and permissions.studies(get_db(), [study_uid]):  # its title names the patient
        permissions.check_study(study_uid, "consult.create")
    cid = consults.create_consult(get_db(), user["username"], data.get("study_uid", ""),
                                  data.get("title", ""), now=_now(), source=auth.client_address())
    if auth.wants_json():
        return jsonify(id=cid, url=f"/consults/{cid}"), 201
    return redirect(f"/consults/{cid}")


@bp.get("/consults/<int:cid>")
@auth.public
@_consult_access("consult.room")
def room(cid: int):
    """The device check, then the call (one page, so the camera is asked for once)."""
    conn = get_db()
    consult = consults.get_consult(conn, cid)
    user = auth.current_user()
    if user is None and not _guest_secret(cid):
        return redirect(f"/login?next=/consults/{cid}")
    if user is not None and user["role"] not in HOSTS:
        abort(403)
    return render_template("consults/room.html", consult=consult, is_host=user is not None,
                           floor=_cfg()["consults"]["video_floor_kbit_s"],
                           admitted=user is not None or _admitted_guest(cid))


@bp.route("/consults/join/<token>", methods=["GET", "POST"])
@auth.public
def join_link(token: str):
    """An invite link: a signed-in host goes straight in; a guest types a name."""
    conn = get_db()
    try:
        cid, nonce = consults.check_invite(conn, _invite_key(), token, now=_now())
    except consults.ConsultError as e:
        return render_template("error.html", message=str(e)), 403
    user = auth.current_user()
    if user is not None and user["role"] in HOSTS:
        session["consult_invited"] = {**(session.get("consult_invited") or {}), str(cid): True}
        return redirect(f"/consults/{cid}")
    if _guest_secret(cid) and consults.guest_by_secret(conn, cid, _guest_secret(cid)):
        return redirect(f"/consults/{cid}")
    error = ""
    if request.method == "POST":
        try:
            _pid, secret = consults.join_guest(conn, cid, request.form.get("name", ""), nonce,
                                               now=_now(), source=auth.client_address())
        except consults.ConsultError as e:
            error = str(e)
        else:
            guests = dict(session.get("consult_guests") or {})
            guests[str(cid)] = secret
            session["consult_guests"] = guests
            return redirect(f"/consults/{cid}")
    return render_template("consults/join.html", consult=consults.get_consult(conn, cid),
                           error=error), 400 if error else 200


# -- JSON -----------------------------------------------------------------------------------------
@bp.post("/consults/<int:cid>/invite")
@auth.require(*HOSTS)
@_consult_access("consult.invite")
def invite(cid: int):
    minutes = _cfg()["consults"]["invite_minutes"]
    token = consults.make_invite(get_db(), _invite_key(), cid, auth.current_user()["username"],
                                 minutes * 60, now=_now(), source=auth.client_address())
    return jsonify(url=f"{_link_base()}/consults/join/{token}", expires_in_s=minutes * 60)


def _link_base() -> str:
    """Where an invite link points: ``web.public_url`` when set (the remote specialist
    reaches the box by that address, not by the bedside's local one), else the address
    the bedside's own browser used."""
    public = str(_cfg()["web"].get("public_url") or "")
    return (public or request.host_url).rstrip("/")


@bp.post("/consults/<int:cid>/join")
@auth.public
@_consult_access("consult.join")
def join(cid: int):
    """Enter after the device check: what the client needs to connect."""
    conn = get_db()
    user = auth.current_user()
    if user is not None and user["role"] in HOSTS:
        pid = consults.join_user(conn, cid, user, now=_now(), source=auth.client_address())
        me = consults.participant(conn, pid)
    else:
        secret = _guest_secret(cid)
        guest = consults.guest_by_secret(conn, cid, secret) if secret else None
        if guest is None:
            abort(403, "you are not in this consult")
        me = consults.rejoin_guest(conn, cid, guest, now=_now())
        if me["state"] not in ("lobby", "admitted"):
            abort(403, "you are not in this consult")
    return jsonify(participant=me["id"], name=me["name"], state=me["state"],
                   seat=me["admitted_at"],
                   host=user is not None,
                   ice_servers=_ice_servers(cid) if me["state"] == "admitted" else [],
                   video_floor_kbit_s=_cfg()["consults"]["video_floor_kbit_s"],
                   roster=consults.roster(conn, cid), cursor=consults.cursor(conn, cid),
                   chat=consults.chat_log(conn, cid) if me["state"] == "admitted" else [])


def _ice_servers(cid: int) -> list[dict]:
    """TURN credentials, for admitted participants only: a guest still in the lobby is a
    stranger with a link, and TURN relays from inside the site."""
    return consults.ice_servers(_cfg(), _host_name(), cid, now=_now())


@bp.post("/consults/<int:cid>/enter")
@auth.public
@permissions.patient_data("consult")  # participants only: _caller
def enter(cid: int):
    """What a guest admitted from the lobby learns: the TURN credentials, the consult's title."""
    _me, _actor = _caller(cid)
    consult = consults.get_consult(get_db(), cid)
    return jsonify(ice_servers=_ice_servers(cid), title=consult["title"],
                   study_uid=consult["study_uid"])


@bp.get("/consults/<int:cid>/events")
@auth.public
@permissions.patient_data("consult")  # participants only: _caller
def events(cid: int):
    """SSE: this participant's events after ``Last-Event-ID`` (or ``?after=``)."""
    me, _actor = _caller(cid, lobby_ok=True)
    try:
        after = int(request.headers.get("Last-Event-ID") or request.args.get("after") or 0)
    except ValueError:
        after = 0
    path, pid = current_app.config["DB_PATH"], me["id"]
    stream_s = float(current_app.config.get("CONSULT_STREAM_S", STREAM_S))

    def stream():
        conn = db.connect(path)
        try:
            cursor, start, last_sent = after, time.monotonic(), time.monotonic()
            yield "retry: 500\n\n"
            while time.monotonic() - start < stream_s:
                who = consults.participant(conn, pid)
                if who is None or who["state"] in ("left", "denied"):
                    yield f"event: gone\ndata: {json.dumps({'state': who and who['state']})}\n\n"
                    return
                for ev in consults.events_after(conn, cid, who, cursor):
                    cursor = ev["id"]
                    last_sent = time.monotonic()
                    yield f"id: {ev['id']}\ndata: {json.dumps(ev, separators=(',', ':'))}\n\n"
                if time.monotonic() - last_sent > KEEPALIVE_S:
                    last_sent = time.monotonic()
                    yield "event: ping\ndata: {}\n\n"  # the page sees its channel is alive
                time.sleep(POLL_S)
        finally:
            conn.close()

    return Response(stream(), mimetype="text/event-stream",
                    headers={"X-Accel-Buffering": "no", "Cache-Control": "no-store"})


@bp.post("/consults/<int:cid>/signal")
@auth.public
@permissions.patient_data("consult")  # participants only: _caller
def post_signal(cid: int):
    me, _actor = _caller(cid)
    data = _body()
    try:
        to = int(data.get("to"))
    except (TypeError, ValueError):
        raise consults.ConsultError("'to' must be a participant id") from None
    eid = consults.signal(get_db(), cid, me, to, data.get("data"))
    return jsonify(id=eid)


@bp.post("/consults/<int:cid>/chat")
@auth.public
@permissions.patient_data("consult")  # participants only: _caller
def post_chat(cid: int):
    me, actor = _caller(cid)
    eid = consults.post_chat(get_db(), cid, me, str(_body().get("text", "")), actor,
                             now=_now(), source=auth.client_address())
    return jsonify(id=eid), 201


@bp.post("/consults/<int:cid>/ladder")
@auth.public
@permissions.patient_data("consult")  # participants only: _caller
def post_ladder(cid: int):
    me, _actor = _caller(cid)
    body = _body()
    eid = consults.record_ladder(get_db(), cid, me, body, now=_now())
    if body.get("step") == "joined" and isinstance(body.get("join_ms"), (int, float)):
        metrics.observe_consult(join_seconds=body["join_ms"] / 1000)
    return jsonify(id=eid)


@bp.post("/consults/<int:cid>/stats")
@auth.public
@permissions.patient_data("consult")  # participants only: _caller
def post_stats(cid: int):
    me, _actor = _caller(cid)
    return jsonify(stored=consults.record_stats(get_db(), cid, me["id"],
                                                _body().get("samples")))


@bp.post("/consults/<int:cid>/leave")
@auth.public
@permissions.patient_data("consult")  # participants only: _caller
def post_leave(cid: int):
    me, _actor = _caller(cid, lobby_ok=True)
    seat = _body().get("seat")
    left = consults.leave(get_db(), cid, me["id"], now=_now(),
                          seat=float(seat) if isinstance(seat, (int, float)) else None)
    return jsonify(ok=True, left=left)


@bp.post("/consults/<int:cid>/admit/<int:pid>")
@auth.require(*HOSTS)
@_consult_access("consult.admit")
def post_admit(cid: int, pid: int):
    allow = _body().get("allow", True) not in (False, "0", "false", "no")
    consults.admit(get_db(), cid, pid, auth.current_user()["username"], allow=allow,
                   now=_now(), source=auth.client_address())
    return jsonify(ok=True, roster=consults.roster(get_db(), cid))


@bp.post("/consults/<int:cid>/remove/<int:pid>")
@auth.require(*HOSTS)
@_consult_access("consult.remove")
def post_remove(cid: int, pid: int):
    """Take someone out of the call: their secret stops working and their stream ends."""
    consults.remove(get_db(), cid, pid, auth.current_user()["username"], now=_now(),
                    source=auth.client_address())
    return jsonify(ok=True, roster=consults.roster(get_db(), cid))


@bp.post("/consults/<int:cid>/invites/revoke")
@auth.require(*HOSTS)
@_consult_access("consult.invite_revoke")
def post_revoke_invites(cid: int):
    """Withdraw every invite link of this consult (a new one can be made after)."""
    n = consults.revoke_invites(get_db(), cid, auth.current_user()["username"], now=_now(),
                                source=auth.client_address())
    return jsonify(ok=True, revoked=n, roster=consults.roster(get_db(), cid))


@bp.post("/consults/<int:cid>/consent")
@auth.require(*HOSTS)
@_consult_access("consult.consent")
def post_consent(cid: int):
    consults.record_consent(get_db(), cid, auth.current_user()["username"], now=_now(),
                            source=auth.client_address())
    return jsonify(ok=True)


@bp.post("/consults/<int:cid>/recording")
@auth.require(*HOSTS)
@_consult_access("consult.recording")
def post_recording(cid: int):
    """Ask the media service to record (after consent; refused with the reason otherwise)."""
    if not _cfg()["sync"]["recipients"]:
        raise consults.ConsultError("recording needs sync.recipients (age public keys) to"
                                    " encrypt to: nothing is recorded in the clear")
    seconds = _body().get("seconds", media_jobs.MAX_SECONDS["record"])
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        raise consults.ConsultError("seconds must be a number")
    jid = media_jobs.request(get_db(), cid, "record", auth.current_user()["username"],
                             float(seconds), now=_now(), source=auth.client_address())
    return jsonify(job=jid, state=media_jobs.get(get_db(), jid)["state"]), 202


@bp.post("/consults/<int:cid>/recording/stop")
@auth.require(*HOSTS)
@_consult_access("consult.recording")
def post_recording_stop(cid: int):
    n = media_jobs.cancel(get_db(), cid, "record", auth.current_user()["username"], now=_now(),
                          source=auth.client_address())
    return jsonify(stopped=n)


@bp.post("/consults/<int:cid>/relay")
@auth.public
@permissions.patient_data("consult")  # participants only: _caller
def post_relay(cid: int):
    """A participant whose media cannot get through even TURN asks for the appliance relay."""
    _me, actor = _caller(cid)
    jid = media_jobs.request(get_db(), cid, "relay", actor, media_jobs.MAX_SECONDS["relay"],
                             now=_now(), source=auth.client_address())
    return jsonify(job=jid), 202


@bp.post("/consults/<int:cid>/end")
@auth.require(*HOSTS)
@_consult_access("consult.end")
def post_end(cid: int):
    consults.end_consult(get_db(), cid, auth.current_user()["username"], now=_now(),
                         source=auth.client_address())
    metrics.observe_consult(ended=True, dropped=consults.was_dropped(get_db(), cid))
    return jsonify(ok=True)


@bp.get("/consults/summary")
@auth.require(*HOSTS)
def summary():
    """Call quality over the last ``days`` (30): join p50/p95, drop rate, share of time degraded.

    No patient data: figures only (for the status page and responders).
    """
    try:
        days = float(request.args.get("days", 30))
    except ValueError:
        raise consults.ConsultError("days must be a number") from None
    return jsonify(consults.call_summary(get_db(), since=_now() - days * 86400))


@bp.get("/consults/<int:cid>/record")
@auth.require(*HOSTS)
@_consult_access("consult.view")
def record(cid: int):
    """The consult's record: who took part, the chat, the ladder steps, its sealed recordings
    (audited: patient data)."""
    conn = get_db()
    consult = consults.get_consult(conn, cid)
    auth.audit_event("consult.view", consult["study_uid"] or f"consult:{cid}",
                     detail={"consult": cid})
    ladder = [dict(json.loads(r["body"]), ts=r["ts"], sender=r["sender"]) for r in conn.execute(
        "SELECT ts, sender, body FROM consult_events WHERE consult_id = ? AND kind = 'ladder'"
        " ORDER BY id", (cid,))]
    people = [dict(r) for r in conn.execute(
        "SELECT id, name, role, kind, state, created_at, admitted_at, left_at"
        " FROM consult_participants WHERE consult_id = ? ORDER BY id", (cid,))]
    recordings = [{k: r[k] for k in ("name", "size", "sha256", "sealed_at", "complete")}
                  for r in consult_recordings.listing(conn, cid)]  # sealed: names, no media
    return jsonify(consult=dict(consult), participants=people,
                   chat=consults.chat_log(conn, cid), ladder=ladder, recordings=recordings)
