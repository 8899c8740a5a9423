"""``appliance media serve``: the appliance's WebRTC participant as a long-running service.

One asyncio loop (aiortc's) that takes work from ``consult_media_jobs``
(:mod:`appliance.consults.media_jobs`): recordings asked for after consent, synthetic
probes (every ``consults.probe_interval_s`` for each consult with someone in
it, for the SLO dashboard; 0 = off) and the capped relay. It beats a
``media`` heartbeat so ``/readyz``, ``/status`` and ``appliance status`` show it.

Idempotent: at start it first seals what a killed recorder left (see
:mod:`appliance.consults.recordings`: a non-empty clear part is sealed and
indexed as incomplete, an empty one discarded), then takes over jobs whose
holder is gone, releasing the dead participant's seat. On SIGTERM every
participant leaves and every recording is sealed before the process exits;
recordings and relays of consults still open are handed back (not finished),
so the service that starts next resumes them in a new part.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from appliance.consults import media, media_jobs
from appliance.consults import recordings as consult_recordings
from appliance.consults import rooms as consults
from appliance.core import components, db, metrics

log = logging.getLogger("appliance.media")
TICK_S = 0.25
PROBE_SECONDS = 6.0
STOP_GRACE_S = 10.0
RENEW_EVERY_S = 2.0  # leases last media_jobs.LEASE_S (10 s)


class MediaService:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.owner = media_jobs.new_owner()
        self.conn = db.open_db(cfg.db_path)
        self.capacity = media.RelayCapacity(cfg["consults"]["relay_max_streams"])
        self.running: dict[int, tuple[asyncio.Task, media.Participant | None]] = {}
        self.next_probe = time.monotonic()  # the first probes at start, then every interval
        self.stopping = asyncio.Event()
        self.shutting_down = False
        self.renewed_at = 0.0

    # -- start -----------------------------------------------------------------------------
    def recover(self) -> dict[str, list[str]]:
        """Seal or discard what a killed recorder left; never leave clear media behind."""
        try:
            recipients = media._recipients(self.cfg)
        except media.MediaError:
            recipients = []
        part_dir = consult_recordings.partial_dir(self.cfg.data_dir)
        if not recipients:  # nothing can be sealed: clear media must not stay on disk
            dropped = [p.name for p in part_dir.glob("*.mkv")]
            for p in part_dir.glob("*.mkv"):
                p.unlink()
            if dropped:
                log.error("no sync.recipients to seal %d partial recording(s): discarded",
                          len(dropped))
            return {"sealed": [], "discarded": dropped}
        found = consult_recordings.recover(self.conn, self.cfg.data_dir, recipients)
        if found["sealed"] or found["discarded"]:
            log.warning("recordings left by a stopped recorder: sealed %s, discarded %s",
                        found["sealed"], found["discarded"])
        return found

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        self.recover()
        stop_beat = components.start_heartbeat(
            lambda: db.connect(self.cfg.db_path), "media", interval=2.0,
            detail=lambda: {"jobs": len(self.running), "relay_streams": self.capacity.active,
                            "relay_capacity": media.relay_capacity(self.capacity.max_streams)})
        log.info("media service started", extra={"owner": self.owner})
        try:
            while not self.stopping.is_set():
                self._tick()
                try:
                    await asyncio.wait_for(self.stopping.wait(), TICK_S)
                except TimeoutError:
                    pass
        finally:
            await self._stop_all()
            stop_beat.set()
            self.conn.close()

    def _tick(self) -> None:
        """Renew leases, notice cancelled jobs, claim new ones (writes only when there is work:
        an idle service must not keep taking SQLite's write lock from ingest)."""
        if self.running:
            if time.monotonic() - self.renewed_at >= RENEW_EVERY_S:
                media_jobs.renew(self.conn, self.owner)
                self.renewed_at = time.monotonic()
            held = media_jobs.held(self.conn, self.owner)
            for jid, (task, part) in list(self.running.items()):
                if jid not in held and part is not None and not task.done():
                    part.stop()  # cancelled from the page (or taken over): leave, seal
        for job in media_jobs.claim(self.conn, self.owner):
            if job["id"] in self.running:
                continue
            self._release_dead_seat(job)
            task = asyncio.ensure_future(self._job(job))
            self.running[job["id"]] = (task, None)
            task.add_done_callback(lambda _t, j=job["id"]: self.running.pop(j, None))
        interval = self.cfg["consults"]["probe_interval_s"]
        if interval > 0 and time.monotonic() >= self.next_probe:
            self.next_probe = time.monotonic() + interval
            self._schedule_probes()

    def _release_dead_seat(self, job) -> None:
        """A job taken over from a killed service: its participant row is still 'admitted'."""
        if job["participant_id"]:
            consults.leave(self.conn, job["consult_id"], job["participant_id"])

    def _schedule_probes(self) -> None:
        """A probe for each open consult with a browser in it and no media participant."""
        for consult_id in consults.needing_probe(self.conn):
            try:
                media_jobs.request(self.conn, consult_id, "probe", media_jobs.ACTOR, PROBE_SECONDS)
            except consults.ConsultError as e:
                log.info("no probe for consult %s: %s", consult_id, e)

    async def _stop_all(self) -> None:
        self.shutting_down = True
        for _task, part in self.running.values():
            if part is not None:
                part.stop()
        tasks = [t for t, _ in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_GRACE_S)

    # -- one job -----------------------------------------------------------------------------
    async def _job(self, job) -> None:
        jid, cid, kind = job["id"], job["consult_id"], job["kind"]
        elapsed = time.time() - (job["started_at"] or time.time())
        seconds = max(1.0, job["seconds"] - elapsed)
        try:
            part = self._participant(job)
        except (consults.ConsultError, media.MediaError) as e:
            media_jobs.finish(self.conn, jid, self.owner, "refused", {"error": str(e)})
            return
        media_jobs.set_participant(self.conn, jid, part.pid)
        self.running[jid] = (self.running[jid][0], part)
        state, out = "done", {}
        try:
            result = await part.run(seconds)
            out = result.as_dict()
            if isinstance(part, media.Recorder):
                out["files"] = [p.name for p in part.seal()]
            if kind == "probe" and result.join_ms is not None:
                me = consults.participant(self.conn, part.pid)
                consults.record_ladder(self.conn, cid, me, {"step": "joined",
                                                            "join_ms": result.join_ms})
                metrics.observe_consult(join_seconds=result.join_ms / 1000)
            if isinstance(part, media.Relay):
                out["forwarded"] = dict(part.forwarded)
        except Exception as e:  # one job's failure never stops the service
            log.exception("media job %s (%s, consult %s) failed", jid, kind, cid)
            state, out = "failed", {"error": f"{type(e).__name__}: {e}"}
            if isinstance(part, media.Recorder):
                out["files"] = [p.name for p in part.seal()]
        if self._hand_back(job, state):
            media_jobs.release(self.conn, jid, self.owner)
            return
        media_jobs.finish(self.conn, jid, self.owner, state, out)

    def _hand_back(self, job, state: str) -> bool:
        """Stopping for a restart mid-recording (or mid-relay) of an open consult."""
        if not self.shutting_down or state != "done" or job["kind"] == "probe":
            return False
        held = media_jobs.get(self.conn, job["id"])
        return consults.is_open(self.conn, job["consult_id"]) and held["state"] == "running"

    def _participant(self, job) -> media.Participant:
        if job["kind"] == "record":
            return media.Recorder(self.cfg, job["consult_id"], job["id"])
        if job["kind"] == "relay":
            return media.Relay(self.cfg, job["consult_id"], self.capacity)
        return media.Participant(self.cfg, job["consult_id"], "probe")


def serve(cfg: Any) -> int:
    """Run until SIGTERM/SIGINT; every recording is sealed on the way out."""
    metrics.setup(cfg.data_dir)

    async def main() -> None:
        service = MediaService(cfg)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stopping.set)
        await service.run()

    asyncio.run(main())
    return 0
