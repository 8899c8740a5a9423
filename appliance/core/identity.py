"""The appliance's identity: an Ed25519 signing key and a local CA with a server certificate.

The Ed25519 key signs bundle manifests (the sync issue); the CA lets a site
trust this appliance's HTTPS certificate once (install ``tls/ca.crt``) even
when its address changes.  Every private key is written 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.core.durable import atomic_write

PRIVATE = 0o600
PUBLIC = 0o644


def _pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_signing_key(keys_dir: Path) -> str:
    """Write ``identity.key`` (Ed25519, 0600) and ``identity.pub``; return the key id."""
    key = ed25519.Ed25519PrivateKey.generate()
    atomic_write(keys_dir / "identity.key", _pem_private(key), mode=PRIVATE)
    pub = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    atomic_write(keys_dir / "identity.pub", pub, mode=PUBLIC)
    return key_id(key.public_key())


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(raw)
    return digest.finalize().hex()[:16]


def load_signing_key(keys_dir: Path) -> ed25519.Ed25519PrivateKey:
    key = serialization.load_pem_private_key((keys_dir / "identity.key").read_bytes(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key


def _names(site_name: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    host = socket.gethostname()
    if host and host != "localhost":
        names.append(x509.DNSName(host))
    return names


def create_tls(tls_dir: Path, site_name: str, days: int = 825) -> None:
    """A local CA (10 years) and a server certificate signed by it (ECDSA P-256)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{site_name[:40]} appliance CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, socket.gethostname()[:64]
                                                    or "appliance")]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_names(site_name)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    atomic_write(tls_dir / "ca.key", _pem_private(ca_key), mode=PRIVATE)
    atomic_write(tls_dir / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC)
    atomic_write(tls_dir / "server.key", _pem_private(key), mode=PRIVATE)
    atomic_write(tls_dir / "server.crt", cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC)


def certificate_expiry(cert_path: Path) -> dt.datetime:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc
