"""Return to service: hand everything acquired on the appliance back to the restored PACS.

1. List the instances stored here (since ``--since``), by study and series.
2. Ask the PACS what it already holds: C-FIND at IMAGE level, one query per series, or
   QIDO-RS (one search per study) when its known AE has a ``dicomweb_url``.
3. Queue what it lacks in the forwarding outbox (origin ``handback``): the same durable,
   leased rows as ``forward:``, so an interrupted hand-back resumes where it stopped and
   a second run finds the instances already there and sends nothing twice.
4. Send (passes of :func:`appliance.forwarding.sending.run_due`) with a progress line.
   Then every report version and addendum signed here goes as an SR by report delivery
   (:func:`appliance.reports.delivery.enqueue_handback`: once per version and PACS), and
   is asked for by C-FIND like the images.
5. Write the signed manifest (:mod:`appliance.forwarding.manifest`): every instance, its
   SHA-256, where it went and how its delivery was proved (``commitment``, ``c-find`` after
   sending, or ``c-find``/``qido`` because the PACS already held it).

Progress (instances, bytes and report documents planned and sent, rate, state) is written to
``handback_progress`` as the run goes (:mod:`appliance.forwarding.progress`): the terminal
bar gets the same snapshot, the status page reads it back.  A run that stops early leaves
its row ``interrupted``; the next one to the same PACS continues it.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.core import audit
from appliance.core.config import Config, KnownAE
from appliance.forwarding import manifest, outbox, qido, sending
from appliance.forwarding import progress as runs
from appliance.reports import delivery as report_delivery
from dicom_node import index as dicom_index
from dicom_node import store_scu

ORIGIN = "handback"
REPORT_WAIT_S = 120.0  # for report documents to be stored (and committed) before the manifest
SEND_PASS_S = 1.0  # one sending pass's budget: the progress moves at least this often
Progress = Callable[[runs.Snapshot], None]  # the figures just written for the status page


class HandbackError(Exception):
    """The hand-back cannot start or cannot finish now (resumable: run it again)."""


def asked_by(peer: KnownAE) -> str:
    """How :func:`held_by` asks this PACS what it holds: ``qido`` or ``c-find``."""
    return "qido" if peer.dicomweb_url else "c-find"


def held_by(cfg: Config, peer: KnownAE, expected: dict[tuple[str, str], set[str]],
            calling_ae: str | None = None, tries: int = 3) -> dict[tuple[str, str], set[str]]:
    """(study, series) → SOP Instance UIDs the PACS holds: by QIDO-RS when the AE has a
    ``dicomweb_url`` (a failure is an error, never an empty answer), else by C-FIND."""
    if peer.dicomweb_url:
        try:
            return qido.held(peer.dicomweb_url, expected, cfg["forwarding"]["timeout_s"])
        except qido.QidoError as e:
            raise HandbackError(f"cannot ask {peer.name} what it holds by QIDO-RS: {e}"
                                " (check dicomweb_url in appliance ae list)") from None
    return _held_by_find(cfg, peer, expected, calling_ae, tries)


def _held_by_find(cfg: Config, peer: KnownAE, expected: dict[tuple[str, str], set[str]],
                  calling_ae: str | None, tries: int) -> dict[tuple[str, str], set[str]]:
    """(study, series) → SOP Instance UIDs the PACS holds (C-FIND IMAGE level).

    A series answered without all ``expected`` instances is asked again on a fresh
    association (up to ``tries`` in all) and the answers are united: pynetdicom 3.0 may drop
    a response when several C-FINDs share an association (pynetdicom issue #875), and a
    dropped response must not read as a missing instance."""
    out: dict[tuple[str, str], set[str]] = {k: set() for k in expected}
    todo = sorted(expected)
    for _ in range(tries):
        if not todo:
            break
        try:
            link = store_scu.Connection(calling_ae or cfg["dicom"]["ae_title"], peer.name,
                                        peer.host, peer.port, [], cfg["forwarding"]["timeout_s"],
                                        verify=True)
        except store_scu.AssociationFailed as e:
            raise HandbackError(f"cannot ask {peer.name} what it holds: {e}") from None
        with link:
            for key in todo:
                if not link.alive:
                    break
                out[key] |= link.find_instances(*key) or set()
        todo = [k for k in todo if not expected[k] <= out[k]]
    return out


def _peer(cfg: Config, to: str) -> KnownAE:
    peer = cfg.known_ae(to)
    if peer is None or not peer.host:
        raise HandbackError(f"{to!r} is not a known AE with a host (appliance ae add {to}"
                            " --host H --port P [--commitment])")
    return peer


def plan(conn: sqlite3.Connection, cfg: Config, to: str,
         since: float | None = None) -> dict[str, Any]:
    """What the site holds, what the PACS holds of it and what it lacks."""
    peer = _peer(cfg, to)
    rows = dicom_index.instances_to_send(conn, received_since=since or 0.0)
    expected: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        expected.setdefault((r["study_uid"], r["series_uid"]), set()).add(r["sop_uid"])
    held = held_by(cfg, peer, expected)
    lacking = [r for r in rows if r["sop_uid"] not in held[(r["study_uid"], r["series_uid"])]]
    return {"peer": peer, "instances": rows, "lacking": lacking,
            "bytes_lacking": sum(r["size"] for r in lacking)}


def run(conn: sqlite3.Connection, cfg: Config, to: str, since: float | None = None,
        dry_run: bool = False, progress: Progress | None = None, actor: str = "cli",
        out_dir: Path | None = None) -> dict[str, Any]:
    """Plan, queue, send and prove; then write and return the signed manifest's path.

    Refused while another live process hands back to the same PACS; the progress row is
    left ``interrupted`` when this run stops early (any exception, Ctrl-C)."""
    if not dry_run:
        _not_running(conn, to)
    p = plan(conn, cfg, to, since)
    peer, lacking = p["peer"], p["lacking"]
    summary = {"destination": peer.name, "instances": len(p["instances"]),
               "already_held": len(p["instances"]) - len(lacking), "to_send": len(lacking),
               "bytes_to_send": p["bytes_lacking"], "dry_run": dry_run}
    if dry_run:
        return summary
    try:
        track = runs.begin(
            conn, peer.name, since or 0.0, [(r["sop_uid"], r["size"]) for r in lacking],
            lambda t: {r["sop_uid"] for r in dicom_index.instances_to_send(
                conn, received_since=max(t, since or 0.0))})
    except runs.AlreadyRunning as e:
        raise HandbackError(str(e)) from None
    try:
        return _run(conn, cfg, peer, p, summary, since, progress_cb=progress, track=track,
                    actor=actor, out_dir=out_dir)
    except BaseException as e:  # Ctrl-C too: the row says so at once, not only once we exit
        why = str(e) if isinstance(e, HandbackError) else f"stopped ({type(e).__name__})"
        runs.interrupt(conn, track, why)
        raise


def _not_running(conn: sqlite3.Connection, to: str) -> None:
    """Fail fast, before asking the PACS, when a live process already hands back there."""
    try:
        runs.check_not_running(conn, to.strip(), time.time())
    except runs.AlreadyRunning as e:
        raise HandbackError(str(e)) from None


def _run(conn: sqlite3.Connection, cfg: Config, peer: KnownAE, p: dict[str, Any],
         summary: dict[str, Any], since: float | None, progress_cb: Progress | None,
         track: runs.Run, actor: str, out_dir: Path | None) -> dict[str, Any]:
    lacking = p["lacking"]
    now = time.time()
    by_study: dict[str, list[str]] = {}
    for r in lacking:
        by_study.setdefault(r["study_uid"], []).append(r["sop_uid"])
    for study, uids in by_study.items():
        outbox.requeue(conn, peer.name, study, uids, ORIGIN, now)
    audit.record(conn, actor, "handback.start", peer.name, source="cli",
                 detail={k: v for k, v in summary.items() if k != "dry_run"})
    _send(conn, cfg, peer, lacking, track, progress_cb)
    docs = _send_reports(conn, cfg, peer, since, track, progress_cb)
    body = _body(conn, cfg, peer, p["instances"], {r["sop_uid"] for r in lacking}, docs)
    path = (out_dir or cfg.data_dir / "handback") / (
        f"manifest-{peer.name}-{dt.datetime.now(dt.UTC).strftime('%Y%m%dT%H%M%SZ')}.json")
    manifest.write(path, manifest.sign(body, cfg.keys_dir))
    snap = runs.finish(conn, track, str(path), body["not_delivered"])
    if progress_cb:
        progress_cb(snap)
    summary.update(manifest=str(path), sent=body["sent"], not_delivered=body["not_delivered"],
                   report_documents=body["report_documents"])
    audit.record(conn, actor, "handback.done", peer.name, source="cli",
                 outcome="ok" if not body["not_delivered"] else "failed",
                 detail={"manifest": path.name, "instances": summary["instances"],
                         "sent": body["sent"], "not_delivered": body["not_delivered"]})
    return summary


def _send(conn: sqlite3.Connection, cfg: Config, peer: KnownAE, lacking: list[sqlite3.Row],
          track: runs.Run, progress_cb: Progress | None) -> None:
    """Passes until every lacking instance is delivered or failed; stalls end in an error.

    Each pass is short (:data:`SEND_PASS_S`) so the progress row, and the bar, move while
    a large hand-back goes; the figures are written before the bar shows them."""
    uids = [r["sop_uid"] for r in lacking]
    size = {r["sop_uid"]: r["size"] for r in lacking}
    idle = 0
    while True:
        rows = outbox.rows_for(conn, peer.name, uids)
        open_ = [u for u, r in rows.items() if r["state"] not in ("delivered", "failed")]
        snap = runs.instances(conn, track, *runs.counted(rows.values(), size))
        if progress_cb:
            progress_cb(snap)
        if not open_:
            return
        got = sending.run_due(cfg, conn=conn, budget_s=SEND_PASS_S)
        if got["stored"] == 0:
            idle += 1
            if idle > 50:
                raise HandbackError(f"{len(open_)} instance(s) not delivered to {peer.name} yet"
                                    " (see appliance forward status); run handback again")
            time.sleep(0.2)  # waiting for a commitment report or a backoff
        else:
            idle = 0


def _send_reports(conn: sqlite3.Connection, cfg: Config, peer: KnownAE, since: float | None,
                  track: runs.Run, progress_cb: Progress | None) -> list[dict[str, Any]]:
    """Every final report version and addendum to the PACS as an SR; each one's proof is a
    C-FIND that finds it (or its storage commitment, which report delivery waits for)."""
    ids = report_delivery.enqueue_handback(conn, peer.name, since or 0.0)
    before = report_delivery.handback_rows(conn, ids)
    _report_progress(conn, track, before, progress_cb)
    held = _held_documents(cfg, peer, before)
    gone = [d["id"] for d in before if d["state"] == "delivered" and d["sop_uid"] not in held]
    report_delivery.make_due(conn, gone, again=True)  # delivered once, lost since
    deadline = time.monotonic() + REPORT_WAIT_S
    while True:
        rows = report_delivery.handback_rows(conn, ids)
        _report_progress(conn, track, rows, progress_cb)
        pending = [r["id"] for r in rows if r["state"] != "delivered"]
        if not pending or time.monotonic() > deadline:
            break
        report_delivery.make_due(conn, pending)
        report_delivery.run_due(cfg, conn=conn)
        if any(r["state"] != "delivered" for r in report_delivery.handback_rows(conn, pending)):
            time.sleep(1.0)  # a commitment report on its way, or the PACS busy
    docs = report_delivery.handback_rows(conn, ids)
    held = _held_documents(cfg, peer, docs)
    for d in docs:
        d["proof"] = ("commitment" if peer.commitment else "c-find") \
            if d["state"] == "delivered" and d["sop_uid"] in held else "not delivered"
    snap = runs.reports(conn, track, len(docs),
                            sum(d["proof"] != "not delivered" for d in docs))
    if progress_cb:
        progress_cb(snap)
    return docs


def _report_progress(conn: sqlite3.Connection, track: runs.Run, rows: list[dict[str, Any]],
                     progress_cb: Progress | None) -> None:
    snap = runs.reports(conn, track, len(rows), sum(r["state"] == "delivered" for r in rows))
    if progress_cb:
        progress_cb(snap)


def _held_documents(cfg: Config, peer: KnownAE, docs: list[dict[str, Any]]) -> set[str]:
    """SOP Instance UIDs of these report documents that the PACS holds (C-FIND)."""
    expected: dict[tuple[str, str], set[str]] = {}
    for d in docs:
        expected.setdefault((d["study_uid"], d["series_uid"]), set()).add(d["sop_uid"])
    if not expected:
        return set()
    return set().union(*held_by(cfg, peer, expected).values())


def _body(conn: sqlite3.Connection, cfg: Config, peer: KnownAE, instances: list[sqlite3.Row],
          sent: set[str], docs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    rows = outbox.rows_for(conn, peer.name, [r["sop_uid"] for r in instances])
    studies: dict[str, dict[str, list[dict[str, Any]]]] = {}
    missing = 0
    for r in instances:
        row = rows.get(r["sop_uid"])
        if r["sop_uid"] not in sent:
            proof = f"{asked_by(peer)} (already held)"
        elif row is not None and row["state"] == "delivered":
            proof = row["proof"]
        else:
            proof, missing = "not delivered", missing + 1
        studies.setdefault(r["study_uid"], {}).setdefault(r["series_uid"], []).append(
            {"sop_instance_uid": r["sop_uid"], "sha256": r["sha256"], "proof": proof})
    for d in docs or []:  # report documents, in their study like any instance
        missing += d["proof"] == "not delivered"
        studies.setdefault(d["study_uid"], {}).setdefault(d["series_uid"], []).append(
            {"sop_instance_uid": d["sop_uid"], "sha256": d["sha256"], "proof": d["proof"],
             "document": d["kind"], "report_id": d["report_id"]})
    return {"site": cfg["site"]["name"], "site_id": cfg["site"]["id"],
            "sent_to": {"ae_title": peer.name, "host": peer.host, "port": peer.port},
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "instances": len(instances), "report_documents": len(docs or []),
            "sent": len(sent), "not_delivered": missing,
            "studies": [{"study_instance_uid": st, "series": [
                {"series_instance_uid": se, "instances": inst} for se, inst in sers.items()]}
                for st, sers in studies.items()]}


def verify(cfg: Config, path: Path, public_key_pem: bytes, peer: KnownAE,
           calling_ae: str | None = None) -> dict[str, Any]:
    """Check the signature, then ask the PACS for every instance; return what is missing."""
    body = manifest.load_verified(path, public_key_pem)
    expected = {(st["study_instance_uid"], se["series_instance_uid"]):
                {i["sop_instance_uid"] for i in se["instances"]}
                for st in body["studies"] for se in st["series"]}
    held = held_by(cfg, peer, expected, calling_ae)
    missing = [{"study_instance_uid": st["study_instance_uid"],
                "series_instance_uid": se["series_instance_uid"],
                "sop_instance_uid": i["sop_instance_uid"]}
               for st in body["studies"] for se in st["series"] for i in se["instances"]
               if i["sop_instance_uid"] not in held[(st["study_instance_uid"],
                                                     se["series_instance_uid"])]]
    return {"instances": body["instances"],
            "report_documents": body.get("report_documents", 0), "missing": missing}
