"""Site configuration: ``DATA_DIR/appliance.yaml``.

The file is written once by ``appliance init`` with comments a responder can
follow, then edited by hand or by CLI commands (``appliance ae add``).  It is
read with ruamel.yaml in round-trip mode so that commands which edit it keep
every comment, and so that validation errors can name the line.

Validation is strict on purpose: an unknown key (often a typo such as
``store_form``) or a wrong type stops the process before it touches data,
with the key path, the line and what is wrong.
"""

from __future__ import annotations

import io
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from appliance.core import durable

CONFIG_NAME = "appliance.yaml"
AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: no backslash, <= 16 chars


class ConfigError(Exception):
    """The configuration is missing or invalid; the message is shown as is."""


# A schema node is either a leaf (type, default, validator) or a nested dict.
@dataclass(frozen=True)
class Leaf:
    kind: type | tuple[type, ...]
    default: Any
    check: Any = None  # callable(value) -> error message or None
    help: str = ""
    echo: bool = True  # False: an error never repeats the value (it may hold a password)


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else "must be a port number between 1 and 65535"


def _ae(v: str) -> str | None:
    v = v.strip()
    if not v:
        return "must not be empty"
    return None if AE_TITLE_RE.match(v) else "must be 1-16 printable characters without a backslash"


def _choice(*options: str):
    def check(v: str) -> str | None:
        return None if v in options else f"must be one of: {', '.join(options)}"

    return check


def _public_url(v: str) -> str | None:
    """Empty, or an http(s) address with a host: links the appliance hands out start with it."""
    from urllib.parse import urlsplit

    if not v:
        return None
    u = urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        return "must be empty or an address like https://pacs.example.org:8443"
    return None


def _split_address(v: str):
    """``urlsplit`` of an address, or None when it does not parse (a bad port included)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(v)
        u.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        return None
    return u


def read_secret_file(path: Path, error: type[Exception]) -> str:
    """The text of a credentials file, refused (``error``) unless only its owner may read it:
    secrets live in 0600 files, never in ``appliance.yaml``, a command line or a URL."""
    import stat

    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read credentials file {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise error(f"{path} is readable by others: chmod 600 {path}")
    return text


def _api_url(v: str) -> str | None:
    """A known AE's ``orthanc_url``: empty, or http(s)://host[:port][/path] with no user,
    password, query or fragment (credentials go in ``patients.pacs_credentials_file``)."""
    if not v:
        return None
    u = _split_address(v)
    if u is None:
        return "must be an address like http://10.0.0.5:8042"
    if u.username is not None or u.password is not None:
        return ("must not carry a user or password (put them in"
                " patients.pacs_credentials_file)")
    if u.scheme not in ("http", "https") or not u.hostname or u.query or u.fragment:
        return "must be empty or an address like http://10.0.0.5:8042"
    return None


def _dicomweb_url(v: str) -> str | None:
    """Empty, or the http(s) root of a PACS's DICOMweb service (QIDO-RS asks it what it
    holds).  No credentials in it: secrets never go in URLs (they would reach logs)."""
    if not v:
        return None
    u = _split_address(v)
    if u is None or u.scheme not in ("http", "https") or not u.hostname or u.query \
            or u.fragment:
        return "must be an http:// or https:// address like http://pacs:8042/dicom-web"
    if u.username is not None or u.password is not None:
        return "must not carry a user name or password"
    return None


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _probe_interval(v: float) -> str | None:
    """consults.probe_interval_s: 0 (off), or often enough to matter but not every call."""
    return None if v == 0 or v >= 10 else "0 (off) or at least 10 seconds"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else "must not be negative"


def _age_recipients(v: list) -> str | None:
    bad = [r for r in v if not (isinstance(r, str) and r.startswith("age1") and len(r) == 62)]
    return f"not age X25519 public keys (age1…, 62 characters): {bad}" if bad else None


_HHMM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _timetable(v: list) -> str | None:
    """Each window: {days: [mon…sun] (optional), from: "HH:MM", to: "HH:MM", kbit_s: N}."""
    for i, w in enumerate(v):
        if not isinstance(w, dict) or set(w) - {"days", "from", "to", "kbit_s"}:
            return f"entry {i}: expected keys days, from, to, kbit_s"
        if not all(_HHMM.match(str(w.get(k, ""))) for k in ("from", "to")):
            return f"entry {i}: from and to must be HH:MM (24 h)"
        if not isinstance(w.get("kbit_s"), int) or isinstance(w.get("kbit_s"), bool) \
                or w["kbit_s"] < 0:
            return f"entry {i}: kbit_s must be an integer >= 0 (0 means unlimited)"
        if any(d not in _DAYS for d in w.get("days", [])):
            return f"entry {i}: days must be among {', '.join(_DAYS)}"
    return None


def _peer_ips(v: list) -> str | None:
    """turn.allowed_peer_ips: IP addresses or networks (192.168.1.0/24, 2001:db8::/64)."""
    for i, item in enumerate(v):
        try:
            ipaddress.ip_network(str(item) if isinstance(item, str) else "", strict=False)
        except ValueError:
            return (f"entry {i}: {item!r} is not an IP address or network"
                    " (such as 192.168.1.0/24 or 192.168.1.20)")
    return None


def _temporary_prefix(v: str) -> str | None:
    """patients.temporary_prefix: capitals and digits, at most 8 (it goes into a 16-char LO)."""
    return None if v == "" or (v.isalnum() and v.isupper() and len(v) <= 8) else \
        "must be up to 8 capital letters or digits, such as CAMPN"


def _procedures(v: list) -> str | None:
    """patients.procedures: entries with code, name, modality."""
    for i, p in enumerate(v):
        if not isinstance(p, dict) or set(p) != {"code", "name", "modality"} \
                or not all(isinstance(p[k], str) and p[k] for k in p):
            return f"entry {i}: expected code, name and modality (text)"
    return None


SCHEMA: dict[str, Any] = {
    "site": {
        "name": Leaf(str, "Field site", None, "shown on every page and report"),
        "id": Leaf(str, "field-site", None, "short identifier, used in bundle names"),
    },
    "dicom": {
        "ae_title": Leaf(str, "FIELDAPP", _ae),
        "port": Leaf(int, 11112, _port),
        "bind": Leaf(str, "0.0.0.0"),
        "store_from": Leaf(str, "any", _choice("any", "known")),
        "max_associations": Leaf(int, 16, _positive),
        "processes": Leaf(int, 2, lambda v: None if 1 <= v <= 32 else "must be between 1 and 32"),
        "fast_store": Leaf(bool, True),
        "low_water_mb": Leaf(int, 500, _non_negative),
        "max_dataset_bytes": Leaf(int, 2 << 30, _positive),
        "max_associations_per_peer": Leaf(int, 4, lambda v: None if 1 <= v <= 1024
                                          else "must be between 1 and 1024"),
        "max_association_idle_life_s": Leaf((int, float), 600, _positive),
        "require_host_for_query": Leaf(bool, True),
        "known_aes": Leaf((list,), []),
        "allowed_modalities": Leaf((list,), [], lambda v: None if all(
            isinstance(m, str) and m.isalnum() for m in v) else "must be modality codes such as CT, MR"),
    },
    "web": {
        "port": Leaf(int, 8443, _port),
        "bind": Leaf(str, "0.0.0.0"),
        "workers": Leaf(int, 2, _positive),
        "public_url": Leaf(str, "", _public_url),
        "htj2k_cache_mb": Leaf(int, 4096, _positive),
    },
    "worker": {
        "quiet_period_s": Leaf((int, float), 30, _positive),
        "sweep_interval_s": Leaf((int, float), 2, _positive),
        "claim_lease_s": Leaf((int, float), 1200, _positive),
    },
    "logging": {
        "level": Leaf(str, "info", _choice("debug", "info", "warning", "error")),
    },
    "health": {
        "sync_lag_limit_min": Leaf((int, float), 120, _positive),
        "cert_warn_days": Leaf(int, 14, _positive),
    },
    "sync": {
        "target": Leaf(str, "none", _choice("none", "s3", "folder")),
        "url": Leaf(str, ""),
        "region": Leaf(str, "us-east-1"),
        "bucket": Leaf(str, ""),
        "prefix": Leaf(str, ""),
        "folder": Leaf(str, ""),
        "credentials_file": Leaf(str, ""),
        "recipients": Leaf((list,), [], _age_recipients),
        "stat_keywords": Leaf((list,), ["STAT", "STROKE"]),
        "bandwidth_kbit_s": Leaf(int, 0, _non_negative),
        "timetable": Leaf((list,), [], _timetable),
        "audit_interval_s": Leaf((int, float), 3600, _positive),
        "part_size_mb": Leaf(int, 8, lambda v: None if 5 <= v <= 512 else "must be 5..512"),
        "parallel_parts": Leaf(int, 1, lambda v: None if 1 <= v <= 16 else "must be 1..16"),
        "lease_s": Leaf((int, float), 120, _positive),
        "timeout_s": Leaf((int, float), 20, _positive),
        "retry_min_s": Leaf((int, float), 5, _positive),
        "retry_max_s": Leaf((int, float), 600, _positive),
    },
    "reports": {
        "deliver_to": Leaf(str, "", None, "AE title from dicom.known_aes that receives reports"),
        "formats": Leaf((list,), ["sr"], lambda v: _report_formats(v)),
        "critical_ack_minutes": Leaf((int, float), 15, _positive),
        "retry_max_backoff_s": Leaf((int, float), 300, _positive),
    },
    "forwarding": {
        "retry_min_s": Leaf((int, float), 5, _positive),
        "retry_max_s": Leaf((int, float), 300, _positive),
        "lease_s": Leaf((int, float), 120, _positive),
        "batch": Leaf(int, 100, _positive),
        "associations": Leaf(int, 3, _positive),
        "timeout_s": Leaf((int, float), 10, _positive),
        "commit_wait_s": Leaf((int, float), 600, _positive),
        "failing_alert_min": Leaf((int, float), 15, _positive),
    },
    "patients": {
        "temporary_prefix": Leaf(str, "", _temporary_prefix,
                                 "prefix of trauma identities (empty: site.id in capitals)"),
        "procedures": Leaf((list,), [], _procedures, "the site's procedure list (empty: built in)"),
        "pacs_credentials_file": Leaf(str, "", None, "0600 file of AE = user:password lines for"
                                      " the Orthanc REST APIs of known AEs (orthanc_url)"),
    },
    "auth": {
        "idle_timeout_min": Leaf((int, float), 15, _positive),
        "session_max_hours": Leaf((int, float), 12, _positive),
        "totp_required_for_readers": Leaf(bool, True),
        "lockout_after_failures": Leaf(int, 5, _positive),
        "lockout_min": Leaf((int, float), 15, _positive),
        "attempts_per_account": Leaf(int, 10, _positive),
        "attempts_per_address": Leaf(int, 30, _positive),
        "attempt_window_min": Leaf((int, float), 10, _positive),
        "break_glass_hours": Leaf((int, float), 8, _positive),
    },
    "consults": {
        "turn_port": Leaf(int, 3478, _port),
        "turn_bind": Leaf(str, "0.0.0.0"),
        "turn_host": Leaf(str, ""),
        "relay_min_port": Leaf(int, 49160, _port),
        "relay_max_port": Leaf(int, 49359, _port),
        "credential_minutes": Leaf(int, 240, _positive),
        "invite_minutes": Leaf(int, 60, _positive),
        "video_floor_kbit_s": Leaf(int, 150, _positive),
        "relay_max_streams": Leaf(int, 2, _non_negative),
        "probe_interval_s": Leaf((int, float), 0, _probe_interval),
    },
    "turn": {
        "allowed_peer_ips": Leaf((list,), [], _peer_ips),
    },
    "notify": {  # appliance/notify: messages that leave the box (README "Notifications")
        "smtp_host": Leaf(str, ""),
        "smtp_port": Leaf(int, 587, _port),
        "smtp_security": Leaf(str, "starttls", _choice("none", "starttls", "tls")),
        "smtp_user": Leaf(str, ""),
        "smtp_from": Leaf(str, "appliance@localhost"),
        "credentials_file": Leaf(str, ""),
        "sms_spool": Leaf(str, ""),
        "webhook_url": Leaf(str, ""),
        "ack_minutes": Leaf((int, float), 15, _positive),
        "ack_minutes_stat": Leaf((int, float), 5, _positive),
        "failover_s": Leaf((int, float), 120, _positive),
        "link_minutes": Leaf((int, float), 1440, _positive),
        "retry_min_s": Leaf((int, float), 5, _positive),
        "retry_max_s": Leaf((int, float), 300, _positive),
        "timeout_s": Leaf((int, float), 10, _positive),
        "health_alerts": Leaf(bool, True),
    },
}


def _report_formats(v: list) -> str | None:
    """reports.formats: any of sr (Basic Text SR), pdf (Encapsulated PDF), print (paper page)."""
    bad = [f for f in v if f not in ("sr", "pdf", "print")]
    return f"unknown format(s) {bad}: use sr, pdf, print" if bad else None

KNOWN_AE_KEYS: dict[str, Leaf] = {
    "name": Leaf(str, None, _ae),
    "host": Leaf(str, ""),
    "port": Leaf(int, 104, _port),
    "query": Leaf(bool, False),
    "move_destination": Leaf(bool, False),
    "worklist": Leaf(bool, False),
    "description": Leaf(str, ""),
    "commitment": Leaf(bool, False),
    "orthanc_url": Leaf(str, "", _api_url, echo=False),
    "dicomweb_url": Leaf(str, "", _dicomweb_url, echo=False),
}


@dataclass(frozen=True)
class KnownAE:
    """A remote application entity this site knows by name."""

    name: str
    host: str = ""
    port: int = 104
    query: bool = False
    move_destination: bool = False
    description: str = ""
    commitment: bool = False  # forwarding asks it for Storage Commitment (PS3.4 Annex J)
    worklist: bool = False
    orthanc_url: str = ""  # its Orthanc REST API: old copies of corrected instances removed there
    dicomweb_url: str = ""  # QIDO-RS root: the hand-back asks it what the PACS holds


class Config:
    """Validated configuration with defaults filled in.

    ``cfg["dicom"]["port"]`` reads like the file; ``cfg.data_dir`` is where
    everything lives.
    """

    def __init__(self, data_dir: Path, values: dict[str, Any]):
        self.data_dir = Path(data_dir)
        self.values = values

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def known_aes(self) -> list[KnownAE]:
        return [KnownAE(**ae) for ae in self.values["dicom"]["known_aes"]]

    def known_ae(self, name: str) -> KnownAE | None:
        for ae in self.known_aes:
            if ae.name == name.strip():
                return ae
        return None

    # Paths of the data directory (DESIGN.md).
    @property
    def db_path(self) -> Path:
        return self.data_dir / "appliance.db"

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.db"

    @property
    def studies_dir(self) -> Path:
        return self.data_dir / "studies"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def workflows_dir(self) -> Path:
        return self.data_dir / "workflows"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _where(node: Any, key: Any, path: Path) -> str:
    """``file:line:col`` of ``key`` inside a ruamel mapping/sequence, best effort."""
    try:
        if isinstance(node, CommentedMap):
            line, col = node.lc.key(key)
        elif isinstance(node, CommentedSeq):
            line, col = node.lc.item(key)
        else:
            line, col = node.lc.line, node.lc.col
        return f"{path}:{line + 1}:{col + 1}"
    except Exception:
        return str(path)


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_leaf(leaf: Leaf, value: Any, keypath: str, where: str) -> Any:
    kinds = leaf.kind if isinstance(leaf.kind, tuple) else (leaf.kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        raise ConfigError(f"{where}: {keypath}: expected {_type_name(leaf.kind)}, got {value!r}")
    if leaf.check is not None:
        msg = leaf.check(value)
        if msg:
            got = f" (got {value!r})" if leaf.echo else ""
            raise ConfigError(f"{where}: {keypath}: {msg}{got}")
    return value


def _validate_map(node: Any, schema: dict[str, Any], prefix: str, path: Path) -> dict[str, Any]:
    if node is None:
        node = CommentedMap()
    if not isinstance(node, dict):
        raise ConfigError(f"{path}: {prefix or 'top level'}: expected a mapping of keys")
    out: dict[str, Any] = {}
    for key in node:
        keypath = f"{prefix}.{key}" if prefix else str(key)
        if key not in schema:
            known = ", ".join(schema)
            raise ConfigError(f"{_where(node, key, path)}: {keypath}: unknown key (known: {known})")
    for key, spec in schema.items():
        keypath = f"{prefix}.{key}" if prefix else key
        if isinstance(spec, dict):
            out[key] = _validate_map(node.get(key), spec, keypath, path)
        elif key in node and node[key] is not None:
            out[key] = _check_leaf(spec, node[key], keypath, _where(node, key, path))
        else:
            out[key] = spec.default if not isinstance(spec.default, list) else list(spec.default)
    return out


def _validate_known_aes(items: list[Any], path: Path, node: Any) -> list[dict[str, Any]]:
    out, seen = [], set()
    for i, item in enumerate(items):
        keypath = f"dicom.known_aes[{i}]"
        where = _where(node, i, path) if node is not None else str(path)
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: {keypath}: expected a mapping with name, host, port")
        ae: dict[str, Any] = {}
        for key in item:
            if key not in KNOWN_AE_KEYS:
                raise ConfigError(
                    f"{_where(item, key, path)}: {keypath}.{key}: unknown key "
                    f"(known: {', '.join(KNOWN_AE_KEYS)})"
                )
        for key, leaf in KNOWN_AE_KEYS.items():
            if key in item and item[key] is not None:
                ae[key] = _check_leaf(leaf, item[key], f"{keypath}.{key}", _where(item, key, path))
            elif leaf.default is None:
                raise ConfigError(f"{where}: {keypath}.{key}: required")
            else:
                ae[key] = leaf.default
        ae["name"] = ae["name"].strip()
        if ae["name"] in seen:
            raise ConfigError(f"{where}: {keypath}.name: duplicate AE title {ae['name']!r}")
        seen.add(ae["name"])
        out.append(ae)
    return out


def parse(text: str, path: Path) -> dict[str, Any]:
    """Validate YAML text against the schema; return plain values with defaults."""
    try:
        doc = _yaml().load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{loc}: not valid YAML: {getattr(e, 'problem', e)}") from None
    values = _validate_map(doc, SCHEMA, "", path)
    dicom_node = doc.get("dicom") if isinstance(doc, dict) else None
    ae_node = dicom_node.get("known_aes") if isinstance(dicom_node, dict) else None
    values["dicom"]["known_aes"] = _validate_known_aes(values["dicom"]["known_aes"], path, ae_node)
    _check_report_destination(doc, values, path)
    return values


def _check_report_destination(doc: Any, values: dict[str, Any], path: Path) -> None:
    """reports.deliver_to must name a known AE with a host, or the reports would go nowhere."""
    name = values["reports"]["deliver_to"].strip()
    if not name:
        return
    node = doc.get("reports") if isinstance(doc, dict) else None
    where = _where(node, "deliver_to", path) if node is not None else str(path)
    ae = next((a for a in values["dicom"]["known_aes"] if a["name"] == name), None)
    if ae is None:
        raise ConfigError(f"{where}: reports.deliver_to: {name!r} is not in dicom.known_aes "
                          f"(appliance ae add {name} --host H --port P)")
    if not ae["host"]:
        raise ConfigError(f"{where}: reports.deliver_to: known AE {name!r} has no host to send to")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """``--data-dir`` wins, then ``APPLIANCE_DATA_DIR``; one is required."""
    value = data_dir or os.environ.get("APPLIANCE_DATA_DIR")
    if not value:
        raise ConfigError("no data directory: pass --data-dir DIR or set APPLIANCE_DATA_DIR")
    return Path(value).resolve()


def load(data_dir: str | os.PathLike | None) -> Config:
    """Load and validate ``appliance.yaml``; raise ConfigError with a clear message."""
    root = resolve_data_dir(data_dir)
    path = root / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: missing (run 'appliance init --data-dir {root}' first)")
    return Config(root, parse(path.read_text(encoding="utf-8"), path))


def edit_known_aes(data_dir: Path, change) -> None:
    """Apply ``change(list_of_ae_maps)`` to the file, keeping comments; validate first.

    The new text is validated as a whole before it replaces the old file, and
    is written atomically, so a running node never reads half a file.
    """
    path = Path(data_dir) / CONFIG_NAME
    y = _yaml()
    doc = y.load(path.read_text(encoding="utf-8"))
    if doc.get("dicom") is None:
        doc["dicom"] = CommentedMap()
    if doc["dicom"].get("known_aes") is None:
        doc["dicom"]["known_aes"] = CommentedSeq()
    change(doc["dicom"]["known_aes"])
    buf = io.StringIO()
    y.dump(doc, buf)
    text = buf.getvalue()
    parse(text, path)
    durable.atomic_write(path, text.encode("utf-8"), mode=0o600)


def render_default(site_name: str, site_id: str, ae_title: str, dicom_port: int, web_port: int) -> str:
    """The commented ``appliance.yaml`` written by ``appliance init``."""
    return DEFAULT_TEMPLATE.format(
        site_name=_yaml_str(site_name),
        site_id=_yaml_str(site_id),
        ae_title=_yaml_str(ae_title),
        dicom_port=dicom_port,
        web_port=web_port,
    )


def _yaml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


DEFAULT_TEMPLATE = """\
# appliance.yaml: the site configuration of this field appliance.
# It is checked at every start: an unknown key or a wrong type stops the
# process with the line and what is wrong, before any data is touched.
# Edit it with any text editor; `appliance ae add|remove` edits it for you.

site:
  # Shown on every page, worklist entry and report.
  name: {site_name}
  # Short identifier (letters, digits, dashes): names this site's cloud bundles.
  id: {site_id}

dicom:
  # The AE title and port scanners and workstations send to.
  ae_title: {ae_title}
  port: {dicom_port}
  # Address to listen on; 0.0.0.0 means every network interface.
  bind: "0.0.0.0"
  # Who may C-ECHO / C-STORE: "any" calling AE (a new scanner can send at
  # once; every association is logged with its address) or only "known" AEs.
  store_from: any
  # Associations served at the same time (by each process).
  max_associations: 16
  # Node processes sharing the port: one Python process ingests on about one
  # core, so parallel senders need more than one. Usually the number of cores.
  processes: 2
  # Serve storage-only associations (scanners sending images) on the node's
  # own lean receive path; false hands every association to pynetdicom.
  fast_store: true
  # Refuse new images (Out of Resources, 0xA700) when free disk in the data
  # directory drops below this many MiB, so what is stored stays intact.
  low_water_mb: 500
  # Limits against a misbehaving (or hostile) machine on the network:
  # a dataset larger than this many bytes is refused (Out of Resources) and
  # nothing of it is stored; 2147483648 = 2 GiB.
  max_dataset_bytes: 2147483648
  # Associations one address may hold at once, across all node processes;
  # the next one from that address is rejected, other senders are still served.
  max_associations_per_peer: 4
  # Seconds an association may stay open without sending any data (a C-ECHO
  # is not data): a peer that only echoes is disconnected after this long.
  max_association_idle_life_s: 600
  # A known AE added with --query but no --host may query/retrieve only from
  # this machine itself: from the network anyone could claim its AE title.
  require_host_for_query: true
  # Remote AEs this site knows. C-FIND, C-MOVE and C-GET are answered only
  # for AEs with query: true; C-MOVE sends only to move_destination: true.
  # Manage with: appliance ae add NAME --host H --port P [--query] [--move-destination]
  # A PACS with dicomweb_url (--dicomweb-url URL) is asked by QIDO-RS what it holds.
  known_aes: []
  # Modalities this site is expected to send (e.g. [CT, MR, CR]; [] = any).
  # A study of another modality is still stored, and the status page raises an alert.
  allowed_modalities: []

web:
  # HTTPS port of the web app (worklist, viewer, health at /livez /readyz).
  port: {web_port}
  bind: "0.0.0.0"
  # gunicorn worker processes.
  workers: 2
  # The address readers use to reach this appliance, if not https://<host>:<port>.
  public_url: ""
  # Derived HTJ2K frames (progressive loading over thin links) kept beside the
  # studies in DATA_DIR/htj2k/; the oldest studies' frames are pruned above this.
  htj2k_cache_mb: 4096

worker:
  # A study is complete when no instance has arrived for this many seconds.
  quiet_period_s: 30
  # How often the worker sweeps for due work (SLA escalations, leases).
  sweep_interval_s: 2
  # A reader's claim on a study lapses after this many seconds unless renewed
  # (the viewer renews it while open); the study then returns to the queue.
  claim_lease_s: 1200

logging:
  # debug, info, warning or error. Logs are JSON lines under logs/.
  level: info

health:
  # /readyz turns 503 (and the status page red) when the oldest bundle not yet
  # uploaded is older than this many minutes (only when sync.target is set).
  sync_lag_limit_min: 120
  # The status page warns this many days before the TLS certificate expires.
  cert_warn_days: 14

sync:
  # Encrypted, signed bundles of studies, reports and the audit trail go to
  # cloud object storage whenever a link is up (appliance sync status|now).
  # target: none (keep everything local), s3 (any S3-compatible store:
  # AWS S3, MinIO, Ceph RGW) or folder (e.g. a USB disk to carry out by hand).
  target: none
  # S3: endpoint URL ("" = AWS), region, bucket and a key prefix.
  url: ""
  region: us-east-1
  bucket: ""
  prefix: ""
  # folder target: an absolute path (a mounted USB disk).
  folder: ""
  # S3 credentials are read from this file (relative to the data directory,
  # mode 0600), never written here: two lines "access_key_id = …" and
  # "secret_access_key = …" (the AWS credentials file format).
  credentials_file: ""
  # age public keys (age1…) every bundle is encrypted to: the cloud key and
  # an offline escrow key at least. Nothing is built until one is set.
  recipients: []
  # Studies whose description contains one of these words go first.
  stat_keywords: [STAT, STROKE]
  # Upload bandwidth cap in kbit/s (0 = unlimited), so sync never starves
  # the readers; the timetable overrides it in its windows, e.g.
  #   timetable: [{{days: [mon, tue, wed, thu, fri], from: "08:00", to: "18:00", kbit_s: 2000}}]
  bandwidth_kbit_s: 0
  timetable: []
  # The audit trail is shipped in slices this many seconds apart.
  audit_interval_s: 3600
  # Multipart upload: part size (MiB) and parts sent at the same time.
  part_size_mb: 8
  parallel_parts: 1
  # A worker holds a bundle this long between heartbeats (a killed worker's
  # bundle is taken over after it), and a request to the target times out.
  lease_s: 120
  timeout_s: 20
  # Retries after a failure wait 5 s, 10 s, 20 s … (with jitter) up to retry_max_s.
  retry_min_s: 5
  retry_max_s: 600

reports:
  # The site PACS that signed reports are sent back to: an AE title listed in
  # dicom.known_aes (appliance ae add SITEPACS --host H --port P). Empty: no
  # PACS delivery; staff print reports from the report page.
  deliver_to: ""
  # What is sent: sr (DICOM Basic Text SR), pdf (DICOM Encapsulated PDF),
  # print (a printable page written under reports/print/ in the data directory).
  formats: [sr]
  # Minutes a critical finding may stay unacknowledged by site staff before
  # it is escalated through the workflow's ladder (and again after as long).
  critical_ack_minutes: 15
  # Failed deliveries are retried with doubling delays, at most this many seconds apart.
  retry_max_backoff_s: 300

auth:
  # Signed-in browsers are logged off after this many idle minutes
  # (background refreshes such as the worklist's do not count as activity).
  idle_timeout_min: 15
  # A session ends this many hours after sign-in, however active.
  session_max_hours: 12
  # Radiologists and neurologists must confirm sign-in with a TOTP code
  # (authenticator app); they enrol at their first sign-in.
  totp_required_for_readers: true
  # An account is locked after this many failed sign-ins in a row, until
  # lockout_min minutes have passed (appliance user reset-password unlocks).
  lockout_after_failures: 5
  lockout_min: 15
  # Sign-in attempts allowed per account, and failed attempts per address,
  # within attempt_window_min minutes; beyond that: "too many attempts".
  attempts_per_account: 10
  attempts_per_address: 30
  attempt_window_min: 10
  # A break-glass opening (a study outside the reader's pool or site, with a
  # typed reason) stays open for the reader this many hours.
  break_glass_hours: 8

consults:
  # Video consults run browser to browser; coturn (TURN) relays media for
  # browsers that cannot reach each other. Its UDP and TCP port, the address
  # it listens on, and the host name browsers are told ("" = the host name
  # they used to reach this web app).
  turn_port: 3478
  turn_bind: "0.0.0.0"
  turn_host: ""
  # UDP ports coturn relays media through (open them in a firewall).
  relay_min_port: 49160
  relay_max_port: 49359
  # TURN credentials handed to a participant last this many minutes.
  credential_minutes: 240
  # An invite link for a remote specialist expires after this many minutes.
  invite_minutes: 60
  # Below this send rate (kbit/s), or with heavy loss, for 5 s the call
  # drops to audio only; video comes back by itself when the link recovers.
  video_floor_kbit_s: 150
  # Streams `appliance media` may relay itself (aiortc re-encodes each one,
  # about a fifth of a core at 640x480); beyond this it refuses, with a message.
  relay_max_streams: 2
  # `appliance media` joins each consult that has someone in it as a synthetic
  # probe this often (seconds) to measure join time for the SLO dashboard;
  # 0 = off. Participants see the probe come and go in the roster.
  probe_interval_s: 0

turn:
  # coturn relays only to addresses on the internet: never to loopback,
  # link-local (169.254.x.x, cloud metadata), private (10.x, 172.16-31.x,
  # 192.168.x), CGNAT (100.64/10), IPv6 ULA/link-local, nor this appliance's
  # own addresses, so an invite link is no way into the hospital network.
  # List here the ranges the site's own browsers are on (e.g. the bedside
  # LAN "192.168.1.0/24"); this appliance's addresses stay refused even
  # inside them unless listed one by one.
  allowed_peer_ips: []
"""
