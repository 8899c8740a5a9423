"""Read items: the worklist every remote reader works from, and its state machine.

One read item per study (``UNIQUE(study_uid)``), created by the read queue
sweep when the study is complete, or while it still arrives when its rule says
STAT (``arriving`` until the study is complete).  States::

    queued → claimed → preliminary → final → delivered
       ↑        |                                  (cancelled from any open state;
       └────────┘ release / claim expiry             a cancelled item may be re-queued)

A claim is a lease: it expires unless renewed, so a reader whose laptop died
does not sit on a stroke CT.  Every change is one transaction that also
writes the item's history row, and claims, releases, expiries and
transitions are audited.  Time is always a parameter (``now``) so tests
drive it with a fake clock.

The read is "done" for the SLA at the first preliminary or final report
(``read_at``): that is when the clinician has an answer; escalation stops there.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from appliance.accounts import permissions
from appliance.accounts import users as accounts
from appliance.core import audit, db
from workflows.schema import PRIORITIES, Pool

log = logging.getLogger("appliance.worklist")

STATES = ("queued", "claimed", "preliminary", "final", "delivered", "cancelled")
OPEN_STATES = ("queued", "claimed")  # escalation runs until a report exists
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("cancelled",),  # queued → claimed goes through claim()
    "claimed": ("preliminary", "final", "cancelled"),  # → queued goes through release()
    "preliminary": ("final", "cancelled"),
    "final": ("delivered",),
    "delivered": (),
    "cancelled": ("queued",),
}
DEFAULT_LEASE_S = 20 * 60
SYSTEM_ACTOR = "system:read-queue"


class WorklistError(Exception):
    """A request on the worklist that cannot be done; ``status`` is the HTTP equivalent."""

    status = 400


class NotFound(WorklistError):
    status = 404


class Conflict(WorklistError):
    status = 409


class NotAllowed(WorklistError):
    status = 403


# -- reading ---------------------------------------------------------------------------------
ITEM_COLUMNS = """
    r.id, r.study_uid, r.state, r.priority, r.priority_rank, r.sla_minutes, r.first_received,
    r.due_at, r.created_at, r.updated_at, r.pool, r.pool_roles, r.pool_tags, r.workflow, r.rule,
    r.actions, r.hold, r.modalities, r.instances_seen, r.late_instances, r.late_at, r.breached,
    r.breached_at, r.claimed_by, r.claimed_at, r.claim_expires_at, r.read_at, r.final_at,
    r.arriving, r.completed_at, s.patient_id, s.patient_name, s.accession_number,
    s.study_description, s.study_date, s.institution_name, s.num_instances, s.num_series
"""


def _split(text: str) -> list[str]:
    return [t for t in (text or "").split(",") if t]


def _item(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["pool"] = {"name": d["pool"], "roles": _split(d.pop("pool_roles")),
                 "tags": _split(d.pop("pool_tags"))}
    d["actions"] = json.loads(d["actions"])
    d["hold"] = bool(d["hold"])
    d["breached"] = bool(d["breached"])
    d["modalities"] = [m for m in (d["modalities"] or "").split("\\") if m]
    d["late"] = d["late_instances"] > 0
    d["arriving"] = bool(d["arriving"])  # images still arriving (a STAT study listed early)
    return d


def get_item(conn: sqlite3.Connection, item_id: int) -> dict[str, Any]:
    row = conn.execute(
        f"SELECT {ITEM_COLUMNS} FROM read_items r LEFT JOIN studies s USING (study_uid)"
        " WHERE r.id = ?", (item_id,),
    ).fetchone()
    if row is None:
        raise NotFound(f"no read item {item_id}")
    item = _item(row)
    item["escalations"] = [dict(r) for r in conn.execute(
        "SELECT id, step_index, action, description, fire_at, fired_at, skipped_at"
        " FROM escalation_steps WHERE item_id = ? ORDER BY step_index", (item_id,))]
    return item


def item_for_study(conn: sqlite3.Connection, study_uid: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT id FROM read_items WHERE study_uid = ?", (study_uid,)).fetchone()
    return get_item(conn, row["id"]) if row else None


def _as_list(value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [v for v in value if v]


_OPEN_SQL = "r.state IN ('queued', 'claimed', 'preliminary')"  # read_items_open_due's WHERE


def list_items(
    conn: sqlite3.Connection, *, state: str | Iterable[str] | None = None,
    priority: str | Iterable[str] | None = None, modality: str | None = None,
    pool: str | None = None, breached: bool | None = None, hold: bool | None = None,
    claimed_by: str | None = None, eligible_for: Mapping[str, Any] | None = None,
    limit: int = 100, offset: int = 0,
) -> list[dict[str, Any]]:
    """Read items matching every filter given, soonest due first: one page, one query.

    ``state`` defaults to the open states (queued, claimed, preliminary).
    ``eligible_for`` (a user with ``role`` and ``tags``) keeps the items whose
    pool admits that reader.
    """
    states = _as_list(state) or ["queued", "claimed", "preliminary"]
    bad = [s for s in states if s not in STATES]
    if bad:
        raise WorklistError(f"unknown state {bad[0]!r} (states: {', '.join(STATES)})")
    where, args = _filters(states, priority, modality, pool, breached, hold, claimed_by)
    if eligible_for is not None:
        where.append("instr(',' || r.pool_roles || ',', ?) > 0")
        args.append("," + str(eligible_for.get("role", "")) + ",")
    # Open states walk the partial index of open items in due order and stop at the page:
    # neither the months of delivered items nor a sort of every open one is read (100,000
    # closed items: 60 ms for the plain due index, 1.6 ms this way). "+r.state" keeps the
    # planner off the state index, which would collect and sort every match.
    source = "read_items r"
    if set(states) <= {"queued", "claimed", "preliminary"}:
        source = "read_items r INDEXED BY read_items_open_due"
        where.insert(0, _OPEN_SQL)
    limit, skip = max(1, min(int(limit), 1000)), max(0, int(offset))
    sql = (f"SELECT {ITEM_COLUMNS} FROM {source} LEFT JOIN studies s USING (study_uid)"
           f" WHERE {' AND '.join(where)} ORDER BY r.due_at, r.id")
    if eligible_for is None:
        return [_item(r) for r in conn.execute(sql + " LIMIT ? OFFSET ?", (*args, limit, skip))]
    # Pool tags are checked here, once per distinct pool, on rows read lazily in due order:
    # the cursor stops as soon as the page is full.
    admitted: dict[tuple[str, str], bool] = {}
    out: list[dict[str, Any]] = []
    for r in conn.execute(sql, args):
        key = (r["pool_roles"], r["pool_tags"])
        if key not in admitted:
            admitted[key] = _admits(*key, eligible_for)
        if not admitted[key]:
            continue
        if skip:
            skip -= 1
            continue
        out.append(_item(r))
        if len(out) >= limit:
            break
    return out


def _filters(states: list[str], priority: str | Iterable[str] | None, modality: str | None,
             pool: str | None, breached: bool | None, hold: bool | None,
             claimed_by: str | None) -> tuple[list[str], list[Any]]:
    """The WHERE terms and their parameters of :func:`list_items`' filters."""
    where = [f"+r.state IN ({', '.join('?' for _ in states)})"]
    args: list[Any] = list(states)
    prios = _as_list(priority)
    if prios:
        bad = [p for p in prios if p not in PRIORITIES]
        if bad:
            raise WorklistError(f"unknown priority {bad[0]!r} (priorities: "
                                f"{', '.join(PRIORITIES)})")
        where.append(f"r.priority IN ({', '.join('?' for _ in prios)})")
        args += prios
    if modality:
        where.append("instr('\\' || r.modalities || '\\', ?) > 0")
        args.append("\\" + modality.strip().upper() + "\\")
    for column, value in (("r.pool", pool), ("r.claimed_by", claimed_by)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    for column, flag in (("r.breached", breached), ("r.hold", hold)):
        if flag is not None:
            where.append(f"{column} = ?")
            args.append(int(flag))
    return where, args


def visible_items(conn: sqlite3.Connection, items: Iterable[Mapping[str, Any]],
                  user: Mapping[str, Any] | None, now: float) -> set[str]:
    """Study UIDs among listed items the user may see: :func:`permissions.decide` on the
    facts the rows already carry (site, pool, claim), so a page costs no second query
    over its studies; only the user's live break-glass grants are read."""
    granted = permissions.grants(conn, user, now)
    out = set()
    for i in items:
        if i.get("num_series") is None:
            continue  # the study left the index: nothing to see (as permissions.visible)
        pool = i["pool"]
        study = permissions.Study(i["study_uid"], i.get("institution_name") or "",
                                  Pool(pool["name"], tuple(pool["roles"]), tuple(pool["tags"])),
                                  i.get("claimed_by"))
        if permissions.decide(user, study, i["study_uid"] in granted):
            out.add(i["study_uid"])
    return out


def _admits(pool_roles: str, pool_tags: str, user: Mapping[str, Any]) -> bool:
    """Whether the item's pool admits the reader (who may claim it): ``permissions.in_pool``."""
    pool = Pool("", tuple(_split(pool_roles)), tuple(_split(pool_tags)))
    return permissions.in_pool(user, pool)


def history(conn: sqlite3.Connection, item_id: int) -> list[dict[str, Any]]:
    """Every stored change of an item, oldest first."""
    if conn.execute("SELECT 1 FROM read_items WHERE id = ?", (item_id,)).fetchone() is None:
        raise NotFound(f"no read item {item_id}")
    out = []
    for r in conn.execute("SELECT ts, actor, event, from_state, to_state, detail"
                          " FROM read_item_history WHERE item_id = ? ORDER BY id", (item_id,)):
        d = dict(r)
        d["detail"] = json.loads(d["detail"])
        out.append(d)
    return out


def add_history(conn: sqlite3.Connection, item_id: int, now: float, actor: str, event: str,
                from_state: str | None = None, to_state: str | None = None,
                detail: Mapping[str, Any] | None = None) -> None:
    """One history row; call inside the transaction that made the change."""
    conn.execute(
        "INSERT INTO read_item_history (item_id, ts, actor, event, from_state, to_state, detail)"
        " VALUES (?,?,?,?,?,?,?)",
        (item_id, now, actor, event, from_state, to_state,
         json.dumps(dict(detail or {}), sort_keys=True)),
    )


# -- claims --------------------------------------------------------------------------------------
def _user(conn: sqlite3.Connection, user: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(user, Mapping):
        return dict(user)
    row = accounts.public_user(conn, user)
    if row is None or row["disabled"]:
        raise NotAllowed(f"no active user {user!r}")
    return row


def _locked_row(conn: sqlite3.Connection, item_id: int) -> sqlite3.Row:
    row = conn.execute("SELECT * FROM read_items WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        raise NotFound(f"no read item {item_id}")
    return row


def _expire_if_due(conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> bool:
    """Return the item to the queue when its claim lapsed; True when it did."""
    if row["state"] != "claimed" or (row["claim_expires_at"] or 0) > now:
        return False
    conn.execute(
        "UPDATE read_items SET state = 'queued', claimed_by = NULL, claimed_at = NULL,"
        " claim_expires_at = NULL, updated_at = ? WHERE id = ? AND state = 'claimed'",
        (now, row["id"]),
    )
    detail = {"item_id": row["id"], "reader": row["claimed_by"],
              "expired_at": row["claim_expires_at"]}
    add_history(conn, row["id"], now, SYSTEM_ACTOR, "claim_expired", "claimed", "queued", detail)
    log.warning("claim expired, item back in the queue", extra=detail)
    audit.record(conn, SYSTEM_ACTOR, "read_item.claim_expired", row["study_uid"],
                 source="worker", detail=detail, ts=now)
    return True


def claim(conn: sqlite3.Connection, item_id: int, user: str | Mapping[str, Any], now: float,
          lease_s: float = DEFAULT_LEASE_S, source: str = "") -> dict[str, Any]:
    """Take an item for reading: only one reader holds it until release or expiry.

    Claiming an item one already holds renews the lease.
    """
    with db.transaction(conn):
        who = _user(conn, user)
        name = who["username"]
        row = _locked_row(conn, item_id)
        if _expire_if_due(conn, row, now):
            row = _locked_row(conn, item_id)
        if row["state"] == "claimed" and row["claimed_by"] == name:
            return _renew_locked(conn, row, name, now, lease_s, source)
        if row["state"] == "claimed":
            raise Conflict(f"item {item_id} is claimed by {row['claimed_by']} until "
                           f"{_iso(row['claim_expires_at'])}")
        if row["state"] != "queued":
            raise Conflict(f"item {item_id} is {row['state']}, not queued")
        if row["hold"]:
            raise Conflict(f"item {item_id} is held for manual triage")
        if not _admits(row["pool_roles"], row["pool_tags"], who):
            raise NotAllowed(f"{name} is not in pool {row['pool']} (needs role "
                             f"{' or '.join(_split(row['pool_roles']))}"
                             f"{' and tags ' + row['pool_tags'] if row['pool_tags'] else ''})")
        expires = now + lease_s
        conn.execute(
            "UPDATE read_items SET state = 'claimed', claimed_by = ?, claimed_at = ?,"
            " claim_expires_at = ?, updated_at = ? WHERE id = ?",
            (name, now, expires, now, item_id),
        )
        detail = {"item_id": item_id, "expires_at": expires}
        add_history(conn, item_id, now, name, "claimed", "queued", "claimed", detail)
        audit.record(conn, name, "read_item.claim", row["study_uid"], source=source,
                     detail=detail, ts=now)
    return get_item(conn, item_id)


def _renew_locked(conn: sqlite3.Connection, row: sqlite3.Row, name: str, now: float,
                  lease_s: float, source: str) -> dict[str, Any]:
    expires = now + lease_s
    conn.execute("UPDATE read_items SET claim_expires_at = ?, updated_at = ? WHERE id = ?",
                 (expires, now, row["id"]))
    detail = {"item_id": row["id"], "expires_at": expires}
    add_history(conn, row["id"], now, name, "renewed", "claimed", "claimed", detail)
    audit.record(conn, name, "read_item.renew", row["study_uid"], source=source, detail=detail,
                 ts=now)
    return {"id": row["id"], "claim_expires_at": expires}


def renew(conn: sqlite3.Connection, item_id: int, user: str | Mapping[str, Any], now: float,
          lease_s: float = DEFAULT_LEASE_S, source: str = "") -> dict[str, Any]:
    """Extend one's own live claim; an expired claim cannot be renewed (claim again)."""
    with db.transaction(conn):
        name = _user(conn, user)["username"]
        row = _locked_row(conn, item_id)
        if _expire_if_due(conn, row, now):
            raise Conflict(f"the claim on item {item_id} expired; claim it again")
        if row["state"] != "claimed" or row["claimed_by"] != name:
            raise Conflict(f"item {item_id} is not claimed by {name}")
        _renew_locked(conn, row, name, now, lease_s, source)
    return get_item(conn, item_id)


def release(conn: sqlite3.Connection, item_id: int, user: str | Mapping[str, Any], now: float,
            reason: str = "", source: str = "") -> dict[str, Any]:
    """Give a claimed item back to the queue (the holder, or an admin/responder)."""
    with db.transaction(conn):
        who = _user(conn, user)
        name = who["username"]
        row = _locked_row(conn, item_id)
        if row["state"] != "claimed":
            raise Conflict(f"item {item_id} is {row['state']}, not claimed")
        if row["claimed_by"] != name and who.get("role") not in permissions.OPERATORS:
            raise NotAllowed(f"item {item_id} is claimed by {row['claimed_by']}, not {name}")
        conn.execute(
            "UPDATE read_items SET state = 'queued', claimed_by = NULL, claimed_at = NULL,"
            " claim_expires_at = NULL, updated_at = ? WHERE id = ?", (now, item_id),
        )
        detail = {"item_id": item_id, "reader": row["claimed_by"], "reason": reason}
        add_history(conn, item_id, now, name, "released", "claimed", "queued", detail)
        audit.record(conn, name, "read_item.release", row["study_uid"], source=source,
                     detail=detail, ts=now)
    return get_item(conn, item_id)


def expire_claims(conn: sqlite3.Connection, now: float) -> int:
    """Return every lapsed claim to the queue; logged in history and audit."""
    expired = 0
    ids = [r["id"] for r in conn.execute(
        "SELECT id FROM read_items WHERE state = 'claimed' AND claim_expires_at <= ?", (now,))]
    for item_id in ids:
        with db.transaction(conn):
            expired += _expire_if_due(conn, _locked_row(conn, item_id), now)
    return expired


# -- transitions ------------------------------------------------------------------------------------
def transition(conn: sqlite3.Connection, item_id: int, new_state: str,
               actor: str | Mapping[str, Any], now: float,
               detail: Mapping[str, Any] | None = None, source: str = "") -> dict[str, Any]:
    """Move an item along the state machine; the reader who holds it writes the reports.

    preliminary/final: only the claim holder (or, once preliminary, its
    author). delivered: anyone delivering the final report (the report
    delivery task). cancelled / re-queue: an admin or responder.
    """
    if new_state not in STATES:
        raise WorklistError(f"unknown state {new_state!r} (states: {', '.join(STATES)})")
    with db.transaction(conn):
        who = _user(conn, actor) if not str(actor).startswith("system:") else \
            {"username": str(actor), "role": "system"}
        name = who["username"]
        row = _locked_row(conn, item_id)
        old = row["state"]
        if new_state not in TRANSITIONS[old]:
            hint = " (use claim/release)" if new_state in ("claimed", "queued") else ""
            raise Conflict(f"item {item_id} cannot go from {old} to {new_state}{hint}")
        _check_actor(row, new_state, who)
        sets = {"state": new_state, "updated_at": now}
        if new_state in ("preliminary", "final"):
            sets["claim_expires_at"] = None  # the author keeps it; no lease once reported
            if row["read_at"] is None:
                sets["read_at"] = now
                if now > row["due_at"] and not row["breached"]:
                    # read late while no sweep ran: the breach step is skipped below,
                    # the flag must still say what happened
                    sets.update(breached=1, breached_at=row["due_at"])
            if new_state == "final":
                sets["final_at"] = now
        if new_state == "queued":
            sets.update(claimed_by=None, claimed_at=None, claim_expires_at=None)
        conn.execute(
            f"UPDATE read_items SET {', '.join(f'{k} = ?' for k in sets)} WHERE id = ?",
            (*sets.values(), item_id),
        )
        if new_state in ("preliminary", "final", "cancelled"):
            conn.execute("UPDATE escalation_steps SET skipped_at = ? WHERE item_id = ?"
                         " AND fired_at IS NULL AND skipped_at IS NULL", (now, item_id))
        if new_state == "queued":
            conn.execute("UPDATE escalation_steps SET skipped_at = NULL WHERE item_id = ?"
                         " AND fired_at IS NULL", (item_id,))
        info = {"item_id": item_id, **dict(detail or {})}
        add_history(conn, item_id, now, name, new_state, old, new_state, info)
        audit.record(conn, name, f"read_item.{new_state}", row["study_uid"], source=source,
                     detail=info, ts=now)
    return get_item(conn, item_id)


def _check_actor(row: sqlite3.Row, new_state: str, who: Mapping[str, Any]) -> None:
    name, role = who["username"], who.get("role")
    if role == "system":
        return
    if new_state in ("preliminary", "final") and row["claimed_by"] != name:
        raise NotAllowed(f"only {row['claimed_by'] or 'the claiming reader'} may report "
                         f"item {row['id']}")
    if new_state in ("cancelled", "queued") and role not in permissions.OPERATORS:
        raise NotAllowed(f"only an admin or responder may set item {row['id']} {new_state}")


def release_hold(conn: sqlite3.Connection, item_id: int, actor: str, now: float,
                 note: str = "") -> dict[str, Any]:
    """Manual triage done: a held item may now be claimed."""
    with db.transaction(conn):
        row = _locked_row(conn, item_id)
        if not row["hold"]:
            raise Conflict(f"item {item_id} is not held")
        conn.execute("UPDATE read_items SET hold = 0, updated_at = ? WHERE id = ?", (now, item_id))
        add_history(conn, item_id, now, actor, "hold_released", row["state"], row["state"],
                    {"note": note})
        audit.record(conn, actor, "read_item.hold_released", row["study_uid"],
                     detail={"item_id": item_id}, ts=now)
    return get_item(conn, item_id)


# -- metrics ---------------------------------------------------------------------------------------
def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def turnaround(conn: sqlite3.Connection, since: float, until: float) -> dict[str, Any]:
    """Reads done in [since, until): count, p50/p90 minutes from first image to read, share in SLA."""
    rows = conn.execute(
        "SELECT priority, read_at - first_received AS tat, read_at <= due_at AS in_sla"
        " FROM read_items WHERE read_at >= ? AND read_at < ?", (since, until),
    ).fetchall()
    groups: dict[str, list[sqlite3.Row]] = {"all": list(rows)}
    for r in rows:
        groups.setdefault(r["priority"], []).append(r)
    out: dict[str, Any] = {"since": since, "until": until, "by_priority": {}}
    for key, group in groups.items():
        tats = [r["tat"] / 60.0 for r in group]
        stats = {
            "read": len(group),
            "p50_minutes": _round(_percentile(tats, 50)),
            "p90_minutes": _round(_percentile(tats, 90)),
            "within_sla": sum(1 for r in group if r["in_sla"]),
            "within_sla_share": round(sum(1 for r in group if r["in_sla"]) / len(group), 4)
            if group else None,
        }
        if key == "all":
            out.update(stats)
        else:
            out["by_priority"][key] = stats
    open_rows = conn.execute(
        "SELECT state, COUNT(*) AS n, SUM(breached) AS breached FROM read_items"
        " WHERE state IN ('queued', 'claimed') GROUP BY state").fetchall()
    out["open"] = {r["state"]: r["n"] for r in open_rows}
    out["open_breached"] = sum(r["breached"] or 0 for r in open_rows)
    out["breached_in_window"] = conn.execute(
        "SELECT COUNT(*) FROM read_items WHERE breached_at >= ? AND breached_at < ?",
        (since, until)).fetchone()[0]
    return out


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _iso(ts: float | None) -> str:
    import datetime as dt

    if ts is None:
        return "?"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sync_wish(conn: sqlite3.Connection, study_uid: str) -> tuple[str | None, str | None]:
    """(the read item's priority, the last ``sync:`` its workflow asked for) for a study;
    (None, None) without a read item. Sync ranks a study's bundle by it."""
    r = conn.execute("SELECT priority, actions FROM read_items WHERE study_uid=?",
                     (study_uid,)).fetchone()
    if r is None:
        return None, None
    wanted = [a["sync"] for a in json.loads(r["actions"] or "[]")
              if isinstance(a, dict) and "sync" in a]
    return r["priority"], (wanted[-1] if wanted else None)
