"""One sending pass: due outbox rows, per destination, a batch at a time over
``forwarding.associations`` associations side by side.

Each file's outcome is written before the next file goes, so a worker killed at any line
loses at most the knowledge of one C-STORE (that row's lease runs out and the same file is
sent again: the PACS keeps one object per SOP Instance UID).  After the batch, the rows
stored are proved: by a Storage Commitment request on the same association when the
destination has ``commitment: true`` (the result arrives on this association or on one
the PACS opens to our DICOM node: :mod:`appliance.forwarding.commitment`), otherwise by a
C-FIND at IMAGE level that must find each of them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from pydicom.uid import generate_uid

from appliance.core import audit, db, leases
from appliance.core.config import Config, KnownAE
from appliance.forwarding import commitment as commit
from appliance.forwarding import outbox
from dicom_node import index as dicom_index
from dicom_node import store_scu

log = logging.getLogger("appliance.forwarding")
SWEEP_BUDGET_S = 30.0
RECORD_EVERY = 25  # stored outcomes per transaction (one fsync per group, not per file)
PROOF_SETTLE_S = 2.0  # a live sender proves its batch within this after its last C-STORE
MIN_PER_LANE = 20  # a batch smaller than this per association goes on one


def _items(conn: sqlite3.Connection, cfg: Config,
           rows: list[sqlite3.Row]) -> dict[str, tuple[store_scu.Item, str, tuple[str, str]]]:
    """sop_uid → (the file to send, its SHA-256, (its series, its Patient ID now)) for the
    rows still stored."""
    found = dicom_index.instances_to_send(conn, sop_uids=[r["sop_uid"] for r in rows])
    return {r["sop_uid"]: (store_scu.Item(r["sop_class_uid"], r["sop_uid"], r["transfer_syntax"],
                                          Path(cfg.studies_dir) / r["path"]),
                           r["sha256"], (r["series_uid"], r["patient_id"] or "")) for r in found}


def send_batch(conn: sqlite3.Connection, cfg: Config, peer: KnownAE, rows: list[sqlite3.Row],
               owner: str, clock=time.time) -> dict[str, int]:
    """Send leased rows to ``peer``; record each outcome; ask for the proof of what was stored."""
    f = cfg["forwarding"]
    counts = {"stored": 0, "refused": 0, "retry": 0}
    items = _items(conn, cfg, rows)
    for r in rows:
        if r["sop_uid"] not in items:
            outbox.refused(conn, r, owner, "the instance is no longer stored here", "", clock())
            counts["refused"] += 1
    rows = [r for r in rows if r["sop_uid"] in items]
    if not rows:
        return counts
    try:
        link = store_scu.Connection(cfg["dicom"]["ae_title"], peer.name, peer.host, peer.port,
                                    [items[r["sop_uid"]][0] for r in rows], f["timeout_s"],
                                    commitment=peer.commitment, verify=not peer.commitment,
                                    on_report=lambda ds: commit.record(cfg, ds))
    except store_scu.AssociationFailed as e:
        outbox.retry_later(conn, [r["id"] for r in rows], owner, str(e), clock(),
                           f["retry_min_s"], f["retry_max_s"])
        outbox.defer_destination(conn, peer.name, clock())
        counts["retry"] += len(rows)
        return counts
    done: list[tuple[sqlite3.Row, store_scu.Sent]] = []
    pending: list[tuple[int, str, str, str]] = []
    with link:
        for i, r in enumerate(rows):
            sent = link.send(items[r["sop_uid"]][0])
            if sent.outcome == "stored":
                pending.append((r["id"], items[r["sop_uid"]][1], sent.syntax,
                                f"0x{sent.status:04X}"))
                if sent.syntax != sent.item.transfer_syntax:
                    log.info("forwarded %s to %s %s", r["sop_uid"], peer.name, sent.note)
                done.append((r, sent))
            else:
                _record(conn, r, sent, owner, f, clock())
            counts[sent.outcome] += 1
            if len(pending) >= RECORD_EVERY or i == len(rows) - 1 or not link.alive:
                outbox.stored(conn, pending, owner, clock())
                pending = []
            if not link.alive:
                left = [x["id"] for x in rows[i + 1:]]
                outbox.retry_later(conn, left, owner, "association lost", clock(),
                                   f["retry_min_s"], f["retry_max_s"])
                counts["retry"] += len(left)
                break
        if done and link.alive:
            _prove(conn, link, peer, [(r, s, items[r["sop_uid"]][2]) for r, s in done], clock)
    if done:
        audit.record(conn, outbox.ACTOR, "forward.sent", peer.name, source="worker",
                     ts=clock(), detail={"instances": len(done),
                                         "studies": sorted({r["study_uid"] for r, _ in done}),
                                         "decompressed": sum(s.syntax != s.item.transfer_syntax
                                                             for _, s in done)})
    return counts


def send_lanes(conn: sqlite3.Connection, cfg: Config, peer: KnownAE, rows: list[sqlite3.Row],
               owner: str, clock=time.time) -> dict[str, int]:
    """Send a leased batch over ``forwarding.associations`` associations at once.

    One association waits for each C-STORE response before the next file goes, so a single
    one leaves the link and the PACS idle between files; a few side by side keep both busy
    (3 send a 300-slice CT to Orthanc faster than dcmtk's storescu on one).  Rows are dealt
    out in turn, so the STAT rows at the head of the batch go first on every lane.  Each
    lane is a :func:`send_batch` with its own SQLite connection: its outcomes are recorded
    as they come, under the same lease, and it asks for its own proof."""
    lanes = max(1, min(int(cfg["forwarding"]["associations"]), len(rows) // MIN_PER_LANE))
    if lanes == 1:
        return send_batch(conn, cfg, peer, rows, owner, clock)
    results: list[dict[str, int]] = []
    errors: list[BaseException] = []

    def lane(part: list[sqlite3.Row]) -> None:
        own = db.connect(cfg.db_path)
        try:
            results.append(send_batch(own, cfg, peer, part, owner, clock))
        except BaseException as e:  # re-raised below, in the caller's thread
            errors.append(e)
        finally:
            own.close()

    threads = [threading.Thread(target=lane, args=(rows[i::lanes],), daemon=True,
                                name=f"forward-{peer.name}-{i}") for i in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {k: sum(r[k] for r in results) for k in ("stored", "refused", "retry")}


def _record(conn: sqlite3.Connection, r: sqlite3.Row, sent: store_scu.Sent, owner: str,
            f: dict[str, Any], now: float) -> None:
    """A refusal or a failure that may pass, written at once."""
    status = f"0x{sent.status:04X}" if sent.status is not None else ""
    if sent.outcome == "refused":
        outbox.refused(conn, r, owner, sent.note, status, now)
        log.warning("%s refused %s permanently: %s", r["destination"], r["sop_uid"], sent.note)
    else:
        outbox.retry_later(conn, [r["id"]], owner, sent.note, now, f["retry_min_s"],
                           f["retry_max_s"])


def _prove(conn: sqlite3.Connection, link: store_scu.Connection, peer: KnownAE,
           done: list[tuple[sqlite3.Row, store_scu.Sent, tuple[str, str]]], clock) -> None:
    """Commitment request, or a C-FIND that finds each stored instance under its current
    Patient ID (after a reconciliation the PACS may still hold the old copy, same SOP
    Instance UID, under the temporary ID: that one proves nothing)."""
    if peer.commitment:
        uid = generate_uid()
        commit.asked(conn, peer.name, uid, [r["sop_uid"] for r, _, _ in done], clock())
        status = link.request_commitment(uid, [(s.item.sop_class, r["sop_uid"])
                                               for r, s, _ in done])
        if status != 0x0000:
            log.warning("%s answered the commitment request with %s", peer.name, status)
        return
    by_series: dict[tuple[str, str, str], list[str]] = {}
    for r, _, (series, patient_id) in done:
        by_series.setdefault((r["study_uid"], series, patient_id), []).append(r["sop_uid"])
    for (study, series, patient_id), uids in by_series.items():
        found = link.find_instances(study, series, patient_id=patient_id or None)
        if found is None:
            continue  # no answer: the rows stay stored and are asked again (commit_wait_s)
        outbox.delivered(conn, peer.name, [u for u in uids if u in found], "c-find", clock())


def prove_left_over(conn: sqlite3.Connection, cfg: Config, now: float, clock) -> int:
    """Ask for the proof of rows a dead sender stored but never proved (one association per
    destination; C-FIND or commitment, as for a fresh batch)."""
    n = 0
    for name, rows in outbox.unproved(conn, now, PROOF_SETTLE_S, cfg["forwarding"]["batch"]).items():
        peer = cfg.known_ae(name)
        if peer is None or not peer.host:
            continue
        items = _items(conn, cfg, rows)
        rows = [r for r in rows if r["sop_uid"] in items]
        try:
            link = store_scu.Connection(cfg["dicom"]["ae_title"], peer.name, peer.host, peer.port,
                                        [items[r["sop_uid"]][0] for r in rows],
                                        cfg["forwarding"]["timeout_s"], commitment=peer.commitment,
                                        verify=not peer.commitment,
                                        on_report=lambda ds: commit.record(cfg, ds))
        except store_scu.AssociationFailed:
            continue  # asked again at the next pass
        with link:
            _prove(conn, link, peer, [(r, store_scu.Sent(items[r["sop_uid"]][0], "stored"),
                                       items[r["sop_uid"]][2]) for r in rows], clock)
        n += len(rows)
    return n


def run_due(cfg: Config, now: float | None = None, conn: sqlite3.Connection | None = None,
            budget_s: float = SWEEP_BUDGET_S) -> dict[str, int]:
    """Recover dead leases, then send due rows, destination by destination, within a budget."""
    own = conn is None
    conn = conn or db.connect(cfg.db_path)
    clock = (lambda: now) if now is not None else time.time
    owner = leases.new_owner()
    counts = {"stored": 0, "refused": 0, "retry": 0}
    started = time.monotonic()
    try:
        outbox.recover(conn, clock())
        commit.expire(conn, clock(), cfg["forwarding"]["commit_wait_s"])
        prove_left_over(conn, cfg, clock(), clock)
        skip: set[str] = set()
        while time.monotonic() - started < budget_s:
            dests = [d for d in outbox.due_destinations(conn, clock()) if d not in skip]
            if not dests:
                break
            name = dests[0]
            peer = cfg.known_ae(name)
            rows = outbox.lease(conn, name, owner, clock(), cfg["forwarding"]["lease_s"],
                                cfg["forwarding"]["batch"])
            if peer is None or not peer.host:
                outbox.retry_later(conn, [r["id"] for r in rows], owner,
                                   f"{name} is not a known AE with a host (appliance ae add"
                                   f" {name} --host H --port P)", clock(),
                                   cfg["forwarding"]["retry_min_s"],
                                   cfg["forwarding"]["retry_max_s"])
                skip.add(name)
                continue
            got = send_lanes(conn, cfg, peer, rows, owner, clock)
            for k, v in got.items():
                counts[k] += v
            if got["retry"] and not got["stored"]:
                skip.add(name)  # unreachable or refusing: the others go first
    finally:
        if own:
            conn.close()
    return counts


def sweep(cfg: Config, now: float | None = None) -> None:
    """The worker's periodic step (registered in runtime/tasks.py SWEEP_MODULES)."""
    run_due(cfg, now)

