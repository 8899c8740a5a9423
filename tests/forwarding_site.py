"""Set-up shared by the forwarding tests: a local site with a ``forward:`` rule, studies
through the real study store, the read queue run on a fake clock, a real Orthanc."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from conftest import free_port, require_tool
from dicom_data import write_series
from orthanc import Orthanc
from reporting_site import local_site

from appliance.core import config, db
from appliance.reading import read_queue
from dicom_node.study_store import StudyStore

FAR = 4_000_000_000.0  # a clock after every quiet period


def forwarding_site(base: Path, pacs: Orthanc, destination: str = "SITEPACS",
                    commitment: bool = False, port: int | None = None,
                    dicomweb_url: str = "", **forwarding: float):
    """A site whose workflow forwards everything to ``destination`` (Orthanc; at ``port``
    when a relay stands in front of it)."""
    site = local_site(base)
    add_destination(site, destination, port or pacs.dicom_port, commitment, dicomweb_url)
    for other in (site.data_dir / "workflows").glob("*.yaml"):
        other.unlink()  # only this rule decides
    (site.data_dir / "workflows" / "forward.yaml").write_text(f"""\
workflow: forward-all
order: 1
pools:
  radiologists: {{role: radiologist}}
rules:
  - name: stroke
    match: {{study_description: "stroke"}}
    priority: stat
    sla_minutes: 30
    pool: radiologists
    actions: [{{forward: {destination}}}]
  - name: everything
    default: true
    priority: routine
    sla_minutes: 60
    pool: radiologists
    actions: [{{forward: {destination}}}]
""")
    text = (site.data_dir / "appliance.yaml").read_text()
    text = text.replace("  port: 11112", f"  port: {pacs.node_port}", 1)
    if forwarding:
        text += "forwarding:\n" + "".join(f"  {k}: {v}\n" for k, v in forwarding.items())
    (site.data_dir / "appliance.yaml").write_text(text)
    return site, config.load(site.data_dir)


def site_pacs(workdir: Path, aet: str = "SITEPACS", **extra) -> Orthanc:
    """An Orthanc that knows our node (FIELDAPP at a free port) as a modality: it may C-FIND
    and it sends Storage Commitment reports there (on an association it opens)."""
    node_port = free_port()
    pacs = Orthanc(workdir, aet=aet, binary=require_tool("Orthanc", "/usr/sbin/Orthanc"),
                   extra_config={"DicomModalities": {"FIELDAPP": ["FIELDAPP", "127.0.0.1",
                                                                  node_port]}, **extra})
    pacs.node_port = node_port
    return pacs


def add_destination(site, name: str, port: int, commitment: bool = False,
                    dicomweb_url: str = "") -> None:
    from ruamel.yaml.comments import CommentedMap

    entry = {"name": name, "host": "127.0.0.1", "port": port}
    if commitment:
        entry["commitment"] = True
    if dicomweb_url:
        entry["dicomweb_url"] = dicomweb_url
    config.edit_known_aes(site.data_dir, lambda items: items.append(CommentedMap(entry)))


def store_files(site, paths: list[Path]) -> None:
    store = StudyStore(site.data_dir / "studies", site.data_dir / "appliance.db",
                       connect=db.connect)
    for path in paths:
        result = store.store(path.read_bytes(), calling_ae="CT1", remote_addr="127.0.0.1")
        assert result.outcome in ("ok", "duplicate"), result.comment


def ingest(site, count: int, **kwargs) -> tuple[str, list[Path]]:
    out = Path(site.data_dir) / "incoming" / str(len(list((site.data_dir / "incoming").glob("*")))
                                                   if (site.data_dir / "incoming").exists() else 0)
    study_uid, _series, paths = write_series(out, count, **kwargs)
    store_files(site, paths)
    return study_uid, paths


def complete(cfg, now: float = FAR) -> dict:
    """The read queue's pass: quiet studies get their read item (and their forward rows)."""
    return read_queue.sweep(cfg, now=now)


def pacs_sop_uids(pacs: Orthanc) -> list[str]:
    """SOP Instance UIDs Orthanc holds, one entry per stored object."""
    return [pacs.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"]
            for i in pacs.instances()]


def sign_report(conn, cfg, study_uid: str, findings: str = "No acute abnormality.") -> int:
    """A final report by dr.ray on the study, signed (its deliveries queued); its id."""
    from appliance.reports import delivery
    from appliance.reports import model as reports

    templates = reports.load_templates()
    rid = reports.create(conn, study_uid=study_uid, author="dr.ray", template_id="generic",
                         templates=templates)
    reports.autosave(conn, rid, actor="dr.ray", templates=templates, base_revision=0,
                     findings=findings, impression="Normal.")
    delivery.sign(conn, cfg, rid, actor="dr.ray", level="final", templates=templates)
    return rid


class ThrottledLink:
    """A TCP relay on a free port in front of the PACS that carries at most ``bytes_per_s``
    each way: a thin link, so a hand-back takes several sending passes and its progress can
    be read while it moves (loopback alone sends a small test set in one pass)."""

    def __init__(self, upstream_port: int, bytes_per_s: float):
        self.upstream, self.rate = upstream_port, float(bytes_per_s)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                return
            self.socks += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        due = time.monotonic()
        try:
            while data := src.recv(16384):
                due = max(due, time.monotonic()) + len(data) / self.rate
                time.sleep(max(0.0, due - time.monotonic()))  # the link's pace, by design
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                _shut(sock)

    def close(self) -> None:
        _shut(self.listener)  # shutdown wakes the accepting thread
        for sock in self.socks:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
