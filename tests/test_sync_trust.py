"""Bundles trust only the keys a responder names: ``restore`` and ``bundle open`` need --trust.

A bundle carries the public key that signed it, so checking its signature
against that key proves only that it is self-consistent.  The attack here: an
outsider with write access to the bucket (moto_server, a real S3 API) builds a
bundle with a forged study, signs it with their own Ed25519 key, encrypts it to
the site's published recipient key and puts it under the site's prefix with the
next sequence number.  ``restore`` must refuse it and restore the genuine ones.
"""

from __future__ import annotations

import hashlib

import pydicom
from conftest import make_site
from cryptography.hazmat.primitives.asymmetric import ed25519
from dicom_data import write_series
from test_sync_common import BUCKET, age_identity, age_study, configure_sync, moto, store_study

from appliance.core import config, identity
from appliance.sync import bundle as bnd
from appliance.sync import outbox

__all__ = ["moto"]


def _forge_bundle(site, tmp_path, recipient: str, seq: int):
    """A self-consistent bundle with a forged study, signed by the attacker's own key."""
    cfg = config.load(site.data_dir)
    forged_uid, _series, paths = write_series(tmp_path / "forged", 2, patient_id="FORGED")
    entries = []
    for p in paths:
        data = p.read_bytes()
        entries.append(bnd.Entry(f"dicom/forged/{p.name}", hashlib.sha256(data).hexdigest(),
                                 len(data), source=p,
                                 meta={"sop_uid": str(pydicom.dcmread(p).SOPInstanceUID),
                                       "type": "dicom"}))
    bundle_id = bnd.new_bundle_id(cfg["site"]["id"], seq)
    out = tmp_path / "forged.bundle"
    attacker = ed25519.Ed25519PrivateKey.generate()
    bnd.build(out, bundle_id, attacker, [recipient], entries, bnd.PRIORITY_STAT, "study",
              forged_uid)
    key = outbox.object_key(cfg, {"site_id": cfg["site"]["id"], "seq": seq, "kind": "study",
                                  "bundle_id": bundle_id})
    return forged_uid, out, key, identity.key_id(attacker.public_key())


def _site_key_id(site) -> str:
    return identity.key_id(identity.load_signing_key(site.data_dir / "keys").public_key())


def test_restore_refuses_a_bundle_an_attacker_signed_with_their_own_key_and_put_in_the_bucket(
        site, moto, tmp_path, request):
    cloud_key = tmp_path / "cloud.key"
    recipient = age_identity(cloud_key)
    configure_sync(site, moto.url, [recipient])
    genuine_uid, _ = store_study(site, tmp_path, 3)
    age_study(site, genuine_uid)
    r = site.cli("sync", "now")
    assert r.returncode == 0, r.stdout + r.stderr
    forged_uid, forged, key, attacker_id = _forge_bundle(site, tmp_path, recipient, 1000)
    assert bnd.verify(forged).key_id == attacker_id  # self-consistent: it checks out alone
    moto.client().put_object(Bucket=BUCKET, Key=key, Body=forged.read_bytes())

    fresh = make_site(tmp_path / "replacement")
    request.addfinalizer(fresh.stop_all)
    args = ["restore", "--from", f"s3://{BUCKET}", "--endpoint-url", moto.url,
            "--credentials-file", str(site.data_dir / "keys" / "s3.credentials"),
            "--identity", str(cloud_key)]
    untrusted = fresh.cli(*args)  # no --trust: refused before anything is read
    assert untrusted.returncode == 1, untrusted.stdout + untrusted.stderr
    assert "--trust KEY_ID is required" in untrusted.stderr
    conn = fresh.db()
    assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    conn.close()

    trusted = fresh.cli(*args, "--trust", _site_key_id(site))
    assert trusted.returncode == 2, trusted.stdout + trusted.stderr  # a bundle was rejected
    assert f"signed by key {attacker_id}, which is not trusted here" in trusted.stdout
    assert "3 instances" in trusted.stdout and "1 rejected" in trusted.stdout
    conn = fresh.db()
    studies = {r[0] for r in conn.execute("SELECT study_uid FROM studies")}
    conn.close()
    assert studies == {genuine_uid} and forged_uid not in studies


def test_bundle_open_refuses_without_trust_and_refuses_the_attackers_key(site, tmp_path):
    escrow = tmp_path / "escrow.key"
    recipient = age_identity(escrow)
    _forged_uid, forged, _key, _attacker = _forge_bundle(site, tmp_path, recipient, 7)
    out = tmp_path / "opened"
    r = site.cli("bundle", "open", str(forged), "--identity", str(escrow), "--out", str(out))
    assert r.returncode == 1 and "--trust KEY_ID is required" in r.stderr
    assert "appliance bundle verify" in r.stderr  # where the key id is found
    r = site.cli("bundle", "open", str(forged), "--identity", str(escrow), "--out", str(out),
                 "--trust", _site_key_id(site))
    assert r.returncode == 1 and "not trusted here" in r.stderr and "nothing was written" \
        in r.stderr
    assert not out.exists()
    r = site.cli("bundle", "open", str(forged), "--identity", str(escrow), "--out", str(out),
                 "--trust", "not-a-key-id")
    assert r.returncode == 1 and "16 lowercase hex" in r.stderr and not out.exists()


def test_verify_prints_the_key_id_that_trust_takes(site, tmp_path):
    pub = age_identity(tmp_path / "escrow.key")
    study_uid, _ = store_study(site, tmp_path, 1)
    out = tmp_path / "one.bundle"
    assert site.cli("bundle", "build", "--study-uid", study_uid, "--out", str(out),
                    "--recipient", pub).returncode == 0
    v = site.cli("bundle", "verify", str(out))
    assert v.returncode == 0 and f"signed by key {_site_key_id(site)}" in v.stdout
    fresh = tmp_path / "other"
    r = site.cli("bundle", "open", str(out), "--identity", str(tmp_path / "escrow.key"),
                 "--out", str(fresh), "--trust", _site_key_id(site))
    assert r.returncode == 0, r.stderr
