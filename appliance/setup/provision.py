"""Provisioning answers: what a responder decides when standing up a site, validated.

``appliance provision`` asks these questions (or reads them from a YAML
answers file, the same keys) and then builds the site on
:func:`appliance.site.init_data_dir`.  Every answer is checked before anything
is created, so a bad answer leaves no half-made site behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError

from appliance.accounts import users as accounts
from appliance.accounts.roles import READERS
from appliance.core import config

# DICOM modality defined terms (PS3.3 C.7.3.1.1.1) a site is likely to send.
MODALITIES = frozenset(
    "AR AU BDUS BI BMD CR CT DG DOC DX ECG EPS ES GM HC HD IO IVOCT IVUS KER KO LEN LS MG MR "
    "NM OAM OCT OP OPM OPT OPV OT PR PT PX REG RESP RF RG RTDOSE RTIMAGE RTPLAN RTRECORD "
    "RTSTRUCT SEG SM SMR SR SRF TG US VA XA XC".split()
)
READER_ROLES = READERS
CLOUD_TARGETS = ("none", "s3", "folder")
AGE_KEY_RE = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")  # bech32 alphabet
ANSWER_KEYS = ("site_name", "ae_title", "dicom_port", "web_port", "allowed_modalities", "cloud",
               "site_pacs", "readers")


class ProvisionError(Exception):
    """A provisioning answer is wrong; the message names the answer and what is expected."""


@dataclass
class Pacs:
    ae_title: str
    host: str
    port: int


@dataclass
class Reader:
    username: str
    role: str
    name: str = ""


@dataclass
class Answers:
    site_name: str
    ae_title: str = "FIELDAPP"
    dicom_port: int = 11112
    web_port: int = 8443
    allowed_modalities: list[str] = field(default_factory=list)
    cloud: dict[str, Any] = field(default_factory=lambda: {"target": "none"})
    site_pacs: Pacs | None = None
    readers: list[Reader] = field(default_factory=list)


def _port(value: Any, what: str) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ProvisionError(f"{what}: must be a port number between 1 and 65535 (got {value!r})")
    return value


def _text(value: Any, what: str, max_len: int = 64) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ProvisionError(f"{what}: required (a non-empty text)")
    value = value.strip()
    if len(value) > max_len or any(ord(c) < 32 for c in value):
        raise ProvisionError(f"{what}: at most {max_len} printable characters (got {value!r})")
    return value


def _ae_title(value: Any, what: str) -> str:
    value = _text(value, what, 16)
    msg = config._ae(value)
    if msg:
        raise ProvisionError(f"{what}: {msg} (got {value!r})")
    return value


def _modalities(value: Any) -> list[str]:
    if value in (None, "", []):
        return []
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ProvisionError("allowed_modalities: a list of modality codes such as [CT, MR, CR]")
    out = []
    for item in items:
        code = str(item).strip().upper()
        if code not in MODALITIES:
            raise ProvisionError(f"allowed_modalities: {item!r} is not a DICOM modality code "
                                 "(e.g. CT, MR, CR, DX, US, MG, PT, NM, XA)")
        if code not in out:
            out.append(code)
    return out


def _cloud(value: Any) -> dict[str, Any]:
    if value in (None, "", "none"):
        return {"target": "none"}
    if not isinstance(value, dict):
        raise ProvisionError("cloud: a mapping with target (none, s3 or folder) and its settings")
    unknown = set(value) - {"target", "url", "region", "bucket", "prefix", "folder",
                            "recipient_key"}
    if unknown:
        raise ProvisionError(f"cloud: unknown key(s) {', '.join(sorted(unknown))} (known: target,"
                             " url, region, bucket, prefix, folder, recipient_key)")
    target = value.get("target", "none")
    if target not in CLOUD_TARGETS:
        raise ProvisionError(f"cloud.target: must be one of {', '.join(CLOUD_TARGETS)} "
                             f"(got {target!r})")
    out: dict[str, Any] = {"target": target}
    if target == "none":
        return out
    if target == "s3":
        out["bucket"] = _text(value.get("bucket"), "cloud.bucket", 63)
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", out["bucket"]):
            raise ProvisionError(f"cloud.bucket: not a valid bucket name ({out['bucket']!r})")
        url = str(value.get("url") or "")
        if url and not re.match(r"^https?://[^\s/]+", url):
            raise ProvisionError(f"cloud.url: must start with http:// or https:// (got {url!r})")
        out.update(url=url, region=str(value.get("region") or "us-east-1"),
                   prefix=str(value.get("prefix") or ""))
    else:
        folder = _text(value.get("folder"), "cloud.folder", 4096)
        if not folder.startswith("/"):
            raise ProvisionError(f"cloud.folder: must be an absolute path (got {folder!r})")
        out["folder"] = folder
    key = str(value.get("recipient_key") or "").strip()
    if not AGE_KEY_RE.match(key):
        raise ProvisionError("cloud.recipient_key: the cloud's age public key (age1…, 62 "
                             f"characters) is required to encrypt bundles (got {key!r})")
    out["recipient_key"] = key
    return out


def _pacs(value: Any) -> Pacs | None:
    if value in (None, "", "none"):
        return None
    if isinstance(value, str):  # AE@host:port
        m = re.fullmatch(r"([^@]+)@([^:]+):(\d+)", value.strip())
        if not m:
            raise ProvisionError(f"site_pacs: expected AE@host:port (got {value!r})")
        value = {"ae_title": m.group(1), "host": m.group(2), "port": m.group(3)}
    if not isinstance(value, dict):
        raise ProvisionError("site_pacs: a mapping with ae_title, host and port, or AE@host:port")
    host = _text(value.get("host"), "site_pacs.host", 253)
    if not re.fullmatch(r"[A-Za-z0-9.:_-]+", host):
        raise ProvisionError(f"site_pacs.host: not a host name or address (got {host!r})")
    return Pacs(_ae_title(value.get("ae_title"), "site_pacs.ae_title"), host,
                _port(value.get("port"), "site_pacs.port"))


def _readers(value: Any) -> list[Reader]:
    if value in (None, "", []):
        return []
    if not isinstance(value, list):
        raise ProvisionError("readers: a list of {username, role, name}")
    out, seen = [], set()
    for i, item in enumerate(value):
        if isinstance(item, str):  # username:role[:Display name]
            parts = item.split(":", 2)
            item = {"username": parts[0], "role": parts[1] if len(parts) > 1 else "radiologist",
                    "name": parts[2] if len(parts) > 2 else ""}
        if not isinstance(item, dict):
            raise ProvisionError(f"readers[{i}]: expected username, role and name")
        username = _text(item.get("username"), f"readers[{i}].username", 64)
        if not re.fullmatch(r"[A-Za-z0-9._-]+", username) or username == "admin":
            raise ProvisionError(f"readers[{i}].username: letters, digits, '.', '-' or '_', "
                                 f"not 'admin' (got {username!r})")
        role = item.get("role", "radiologist")
        if role not in READER_ROLES:
            raise ProvisionError(f"readers[{i}].role: must be one of {', '.join(READER_ROLES)} "
                                 f"(got {role!r})")
        if username in seen:
            raise ProvisionError(f"readers[{i}].username: {username!r} is listed twice")
        seen.add(username)
        out.append(Reader(username, role, str(item.get("name") or "")))
    return out


def validate(raw: dict[str, Any]) -> Answers:
    """Check every answer; raise ProvisionError naming the first wrong one."""
    unknown = [k for k in raw if k not in ANSWER_KEYS]
    if unknown:
        raise ProvisionError(f"{unknown[0]}: unknown answer (known: {', '.join(ANSWER_KEYS)})")
    answers = Answers(
        site_name=_text(raw.get("site_name"), "site_name"),
        ae_title=_ae_title(raw.get("ae_title", "FIELDAPP"), "ae_title"),
        dicom_port=_port(raw.get("dicom_port", 11112), "dicom_port"),
        web_port=_port(raw.get("web_port", 8443), "web_port"),
        allowed_modalities=_modalities(raw.get("allowed_modalities")),
        cloud=_cloud(raw.get("cloud")),
        site_pacs=_pacs(raw.get("site_pacs")),
        readers=_readers(raw.get("readers")),
    )
    if answers.dicom_port == answers.web_port:
        raise ProvisionError("web_port: must differ from dicom_port")
    if answers.site_pacs and answers.site_pacs.ae_title == answers.ae_title:
        raise ProvisionError("site_pacs.ae_title: must differ from this appliance's ae_title")
    return answers


def load_answers(path: Path) -> dict[str, Any]:
    """Read an answers file; a YAML error names the file and line."""
    try:
        doc = YAML(typ="safe").load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProvisionError(f"{path}: no such answers file") from None
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ProvisionError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(doc, dict):
        raise ProvisionError(f"{path}: expected a mapping of answers (site_name: …)")
    return doc


def render_config(answers: Answers, data_dir: Path) -> str:
    """The site's appliance.yaml with the answers applied, comments kept, validated."""
    import io

    from appliance.setup.site import slug

    text = config.render_default(answers.site_name, slug(answers.site_name), answers.ae_title,
                                 answers.dicom_port, answers.web_port)
    y = config._yaml()
    doc = y.load(text)
    dicom = doc["dicom"]
    if "allowed_modalities" in config.SCHEMA["dicom"]:
        dicom["allowed_modalities"] = answers.allowed_modalities
    if answers.site_pacs:
        p = answers.site_pacs
        dicom["known_aes"].append(CommentedMap(
            name=p.ae_title, host=p.host, port=p.port, query=False, move_destination=True,
            description="site PACS (reports are delivered here)"))
        _set_section(doc, "reports", {"deliver_to": p.ae_title})
    cloud = answers.cloud
    if cloud["target"] != "none":
        values = {k: v for k, v in cloud.items() if k != "recipient_key"}
        values["recipients"] = [cloud["recipient_key"]]
        _set_section(doc, "sync", values)
    buf = io.StringIO()
    y.dump(doc, buf)
    out = buf.getvalue()
    config.parse(out, data_dir / config.CONFIG_NAME)
    return out


def _set_section(doc: CommentedMap, section: str, values: dict[str, Any]) -> None:
    if section not in config.SCHEMA:
        raise ProvisionError(f"this build has no '{section}' settings: leave that answer out")
    if doc.get(section) is None:
        doc[section] = CommentedMap()
    for key, value in values.items():
        doc[section][key] = value


def invite_readers(conn, readers: list[Reader]) -> list[tuple[Reader, str]]:
    """Create each reader with a one-time password (changed at first sign-in)."""
    out = []
    for reader in readers:
        password = accounts.generate_password()
        accounts.add_user(conn, reader.username, reader.role, password, reader.name,
                          must_change=True)
        out.append((reader, password))
    return out
