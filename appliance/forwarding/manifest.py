"""The hand-back manifest: every study, series and SOP Instance UID handed back, its SHA-256,
where it went and how its delivery was proved, signed with the appliance's Ed25519 key.

The signature covers the canonical JSON of ``body`` (sorted keys, no spaces), so anyone
with the public key (``keys/identity.pub``) can check the file has not been edited, on any
machine; ``key_id`` names the key as the rest of the appliance does.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from appliance.core import durable, identity

FORMAT = "appliance-handback-manifest/1"


class ManifestError(Exception):
    """The manifest is unreadable, or its signature does not verify."""


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(body: dict[str, Any], keys_dir: Path) -> dict[str, Any]:
    key = identity.load_signing_key(keys_dir)
    return {"format": FORMAT, "key_id": identity.key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(canonical(body))).decode(), "body": body}


def write(path: Path, signed: dict[str, Any]) -> None:
    durable.ensure_dir(path.parent)
    durable.atomic_write(path, json.dumps(signed, indent=1).encode(), mode=0o600)


def load_verified(path: Path, public_key_pem: bytes) -> dict[str, Any]:
    """The manifest's body, once its signature verifies with this public key."""
    try:
        signed = json.loads(Path(path).read_text())
        sig = base64.b64decode(signed["signature"])
        body = signed["body"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ManifestError(f"{path}: not a hand-back manifest ({e})") from None
    key = serialization.load_pem_public_key(public_key_pem)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ManifestError("the public key is not an Ed25519 key")
    try:
        key.verify(sig, canonical(body))
    except InvalidSignature:
        raise ManifestError(f"{path}: the signature does not verify with key"
                            f" {identity.key_id(key)} (edited, or signed by another key)") from None
    return body
