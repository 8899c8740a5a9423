"""Bundle format: round trip of a CT study, and the whole tamper list rejected (hypothesis)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import require_tool
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from test_sync_common import age_identity, store_study

from appliance.core import identity
from appliance.sync import bundle as bnd

AGE_CHUNK = 64 * 1024 + 16  # age v1 STREAM: 64 KiB of plaintext + a 16-byte tag


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    pub = age_identity(d / "cloud.key")
    other = age_identity(d / "other.key")
    return {"dir": d, "pub": pub, "ident": bnd.load_identity(d / "cloud.key"),
            "other_ident": bnd.load_identity(d / "other.key"), "other_pub": other,
            "sign": ed25519.Ed25519PrivateKey.generate()}


def _entries(d: Path, n: int = 3, size: int = 120_000, tag: str = "a") -> list[bnd.Entry]:
    out = []
    for i in range(n):
        data = hashlib.sha256(f"{tag}{i}".encode()).digest() * (size // 32)
        p = d / f"{tag}{i}.dcm"
        p.write_bytes(data)
        out.append(bnd.Entry(f"dicom/1.2.3/1.2.4/{tag}{i}.dcm", hashlib.sha256(data).hexdigest(),
                             len(data), source=p, meta={"sop_uid": f"1.2.5.{i}", "type": "dicom"}))
    out.append(bnd.Entry.record("records/note.json", {"tag": tag}, type="note"))
    return out


@pytest.fixture(scope="module")
def pair(keys, tmp_path_factory):
    """Two genuine bundles of one site (sequence numbers 1 and 2)."""
    d = tmp_path_factory.mktemp("bundles")
    a = d / "a.bundle"
    b = d / "b.bundle"
    bnd.build(a, bnd.new_bundle_id("site-x", 1), keys["sign"], [keys["pub"]], _entries(d, tag="a"))
    bnd.build(b, bnd.new_bundle_id("site-x", 2), keys["sign"], [keys["pub"]], _entries(d, tag="b"))
    return a.read_bytes(), b.read_bytes()


def _rejected(keys, data: bytes, tmp: Path, ledger: bnd.Ledger | None = None) -> str:
    """Open ``data``; it must raise BundleError and leave nothing behind. Returns the message."""
    work = tmp / f"t{os.urandom(4).hex()}"
    work.mkdir()
    path = work / "x.bundle"
    path.write_bytes(data)
    out = work / "out"
    with pytest.raises(bnd.BundleError) as err:
        bnd.open_bundle(path, keys["ident"], out, ledger)
    assert not out.exists(), "a rejected bundle wrote files"
    assert sorted(p.name for p in work.iterdir()) == ["x.bundle"], "staging left behind"
    shutil.rmtree(work)
    return str(err.value)


def test_genuine_bundles_open(keys, pair, tmp_path):
    for i, data in enumerate(pair):
        p = tmp_path / f"{i}.bundle"
        p.write_bytes(data)
        opened = bnd.open_bundle(p, keys["ident"], tmp_path / f"out{i}")
        assert len(opened.manifest["files"]) == 4
        assert opened.manifest["seq"] == i + 1


FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(data=hs.data())
def test_any_flipped_byte_is_rejected(keys, pair, tmp_path, data):
    blob = bytearray(pair[0])
    offset = data.draw(hs.integers(0, len(blob) - 1), label="offset")
    blob[offset] ^= data.draw(hs.integers(1, 255), label="xor")
    msg = _rejected(keys, bytes(blob), tmp_path)
    assert msg and "\n" not in msg


@FAST
@given(data=hs.data())
def test_truncation_at_any_offset_is_rejected(keys, pair, tmp_path, data):
    cut = data.draw(hs.integers(0, len(pair[0]) - 1), label="length")
    msg = _rejected(keys, pair[0][:cut], tmp_path)
    assert any(w in msg for w in ("truncated", "too short", "damaged", "bad magic")), msg


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=hs.data())
def test_reordered_chunks_are_rejected(keys, pair, tmp_path, data):
    blob = pair[0]
    start = blob.index(b"\n---", len(bnd.MAGIC)) + 1
    start = blob.index(b"\n", start) + 1  # first ciphertext chunk after the age header
    t_len = int.from_bytes(blob[-16:-8], "big")
    body_end = len(blob) - 16 - t_len
    chunks = [blob[i:min(i + AGE_CHUNK, body_end)] for i in range(start, body_end, AGE_CHUNK)]
    assert len(chunks) >= 4
    perm = data.draw(hs.permutations(range(len(chunks))).filter(
        lambda p: list(p) != sorted(p)), label="order")
    tampered = blob[:start] + b"".join(chunks[i] for i in perm) + blob[body_end:]
    _rejected(keys, tampered, tmp_path)


def _trailer(blob: bytes) -> tuple[dict, int]:
    n = int.from_bytes(blob[-16:-8], "big")
    return json.loads(blob[-16 - n:-16]), n


def _with_trailer(blob: bytes, t: dict, n: int) -> bytes:
    raw = json.dumps(t, sort_keys=True, separators=(",", ":")).encode()
    return blob[:-16 - n] + raw + len(raw).to_bytes(8, "big") + bnd.END_MAGIC


def test_outer_signature_swapped_between_bundles_is_rejected(keys, pair, tmp_path):
    (ta, na), (tb, _) = _trailer(pair[0]), _trailer(pair[1])
    ta2 = {**ta, "signature": tb["signature"]}
    assert "signature is invalid" in _rejected(keys, _with_trailer(pair[0], ta2, na), tmp_path)
    # The whole trailer of B on A's ciphertext: hash and signature do not match A.
    ta3 = {**tb}
    assert _rejected(keys, _with_trailer(pair[0], ta3, na), tmp_path)


def test_signature_by_an_untrusted_key_is_rejected(keys, pair, tmp_path):
    p = tmp_path / "a.bundle"
    p.write_bytes(pair[0])
    with pytest.raises(bnd.BundleError, match="not trusted"):
        bnd.verify(p, ["0123456789abcdef"])
    # A forger re-signs with their own key but keeps our key id: caught.
    forger = ed25519.Ed25519PrivateKey.generate()
    t, n = _trailer(pair[0])
    digest = bytes.fromhex(t["ciphertext_sha256"])
    import base64

    from cryptography.hazmat.primitives import serialization
    raw = forger.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    t2 = {**t, "public_key": base64.b64encode(raw).decode(),
          "signature": base64.b64encode(forger.sign(digest + t["bundle_id"].encode())).decode()}
    assert "key id does not match" in _rejected(keys, _with_trailer(pair[0], t2, n), tmp_path)


def _inner(blob: bytes, keys) -> list[tuple[str, bytes]]:
    """Decrypt a genuine bundle's tar (what someone holding the cloud key could do)."""
    import pyrage

    t, n = _trailer(blob)
    plain = pyrage.decrypt(blob[len(bnd.MAGIC):-16 - n], keys["ident"])
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _tar(members: list[tuple[str, bytes]]):
    for name, data in members:
        yield bnd._tar_header(name, len(data))
        yield data
        yield bnd._pad(len(data))
    yield b"\0" * 1024


def _resealed(keys, members, bundle_id: str, tmp: Path) -> bytes:
    """Re-encrypt altered contents and sign the outside with the genuine key: the inner
    checks alone must catch the swap (defence in depth against a builder bug)."""
    p = tmp / f"r{os.urandom(3).hex()}.bundle"
    bnd.seal(p, bundle_id, keys["sign"], [keys["pub"]], _tar(members))
    return p.read_bytes()


def test_manifest_or_its_signature_swapped_between_bundles_is_rejected(keys, pair, tmp_path):
    a, b = _inner(pair[0], keys), _inner(pair[1], keys)
    a_id = _trailer(pair[0])[0]["bundle_id"]
    b_manifest = [b[0], b[1], *a[2:]]
    msg = _rejected(keys, _resealed(keys, b_manifest, a_id, tmp_path), tmp_path)
    assert "manifest belongs to bundle" in msg
    b_sig = [a[0], b[1], *a[2:]]
    assert "manifest signature is invalid" in _rejected(
        keys, _resealed(keys, b_sig, a_id, tmp_path), tmp_path)
    swapped_file = [a[0], a[1], (a[2][0], b[2][1]), *a[3:]]  # B's bytes under A's name
    assert "SHA-256 differs from the manifest" in _rejected(
        keys, _resealed(keys, swapped_file, a_id, tmp_path), tmp_path)
    extra = [*a, ("dicom/evil.dcm", b"x")]
    assert "does not list" in _rejected(keys, _resealed(keys, extra, a_id, tmp_path), tmp_path)
    reordered = [a[0], a[1], a[3], a[2], *a[4:]]
    assert "out of order" in _rejected(keys, _resealed(keys, reordered, a_id, tmp_path),
                                       tmp_path)


def test_replayed_sequence_number_is_rejected(keys, pair, tmp_path):
    ledger = bnd.FileLedger(tmp_path / "ledger.json")
    p = tmp_path / "a.bundle"
    p.write_bytes(pair[0])
    bnd.open_bundle(p, keys["ident"], tmp_path / "first", ledger)
    assert "replayed sequence number 1" in _rejected(keys, pair[0], tmp_path, ledger)
    # The same sequence number under another bundle id (a re-signed copy) is refused too.
    a = _inner(pair[0], keys)
    site, seq = bnd.parse_bundle_id(_trailer(pair[0])[0]["bundle_id"])
    again = _resealed(keys, a, bnd.new_bundle_id(site, seq), tmp_path)
    assert "replayed" in _rejected(keys, again, tmp_path, ledger)


def test_wrong_identity_cannot_open_and_writes_nothing(keys, pair, tmp_path):
    p = tmp_path / "a.bundle"
    p.write_bytes(pair[0])
    with pytest.raises(bnd.BundleError, match="cannot decrypt"):
        bnd.open_bundle(p, keys["other_ident"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.bundle"]


def test_ct_study_round_trip_is_byte_identical_through_the_cli(site, tmp_path):
    pub = age_identity(tmp_path / "escrow.key")
    study_uid, _ = store_study(site, tmp_path, 24, rows=256, cols=256)
    out = tmp_path / "study.bundle"
    r = site.cli("bundle", "build", "--study-uid", study_uid, "--out", str(out),
                 "--recipient", pub)
    assert r.returncode == 0, r.stderr
    assert "24 instances" in r.stdout
    v = site.cli("bundle", "verify", str(out))
    assert v.returncode == 0 and "signature OK" in v.stdout, v.stderr
    signer = identity.key_id(identity.load_signing_key(site.data_dir / "keys").public_key())
    opened = tmp_path / "opened"
    o = site.cli("bundle", "open", str(out), "--identity", str(tmp_path / "escrow.key"),
                 "--out", str(opened), "--trust", signer)
    assert o.returncode == 0, o.stderr
    conn = site.db()
    rows = conn.execute("SELECT path, sha256 FROM instances WHERE study_uid=?",
                        (study_uid,)).fetchall()
    actions = [r[0] for r in conn.execute("SELECT action FROM audit ORDER BY id")]
    conn.close()
    assert len(rows) == 24
    for r in rows:
        original = (site.data_dir / "studies" / r["path"]).read_bytes()
        assert (opened / "dicom" / r["path"]).read_bytes() == original
    assert "bundle.export" in actions and "bundle.open" in actions  # patient data access
    modes = {oct(p.stat().st_mode & 0o777) for p in opened.rglob("*")}
    assert modes <= {"0o600", "0o700"}, modes  # opened patient data stays private
    # Opening it again is a replay; a flipped byte is refused with one line; nothing written.
    again = site.cli("bundle", "open", str(out), "--identity", str(tmp_path / "escrow.key"),
                     "--out", str(opened), "--trust", signer)
    assert again.returncode == 1 and "replayed" in again.stderr
    blob = bytearray(out.read_bytes())
    blob[len(blob) // 2] ^= 1
    out.write_bytes(bytes(blob))
    bad = site.cli("bundle", "verify", str(out))
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and \
        len(bad.stderr.strip().splitlines()) == 1
    fresh = tmp_path / "fresh"
    bad_open = site.cli("bundle", "open", str(out), "--identity", str(tmp_path / "escrow.key"),
                        "--out", str(fresh), "--trust", signer)
    assert bad_open.returncode == 1 and "nothing was written" in bad_open.stderr
    assert not fresh.exists()


def test_build_refuses_bad_recipients_and_unknown_study(site, tmp_path):
    study_uid, _ = store_study(site, tmp_path, 2)
    r = site.cli("bundle", "build", "--study-uid", study_uid, "--out", str(tmp_path / "x"),
                 "--recipient", "age1notakey")
    assert r.returncode == 1 and "not an age X25519 public key" in r.stderr
    r = site.cli("bundle", "build", "--study-uid", study_uid, "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "no recipients" in r.stderr
    r = site.cli("bundle", "build", "--study-uid", "1.2.3.999", "--out", str(tmp_path / "x"),
                 "--recipient", age_identity(tmp_path / "k"))
    assert r.returncode == 1 and "no study" in r.stderr
    assert not (tmp_path / "x").exists()


def test_build_refuses_a_file_changed_on_disk(keys, tmp_path):
    entries = _entries(tmp_path, n=1)
    entries[0].source.write_bytes(b"changed" + entries[0].source.read_bytes()[7:])
    with pytest.raises(bnd.BundleError, match="no longer matches the index"):
        bnd.build(tmp_path / "x.bundle", bnd.new_bundle_id("s", 1), keys["sign"],
                  [keys["pub"]], entries)
    assert not any(p.name.endswith((".bundle", ".part")) for p in tmp_path.iterdir())


BUILD_BIG = """
import hashlib, sys
from pathlib import Path
from cryptography.hazmat.primitives.asymmetric import ed25519
from appliance.sync import bundle as bnd
src = Path(sys.argv[1]); data_sha, size = sys.argv[2], int(sys.argv[3])
e = [bnd.Entry(f"dicom/1/2/{i}.dcm", data_sha, size, source=src) for i in range(6)]
bnd.build(Path(sys.argv[4]), bnd.new_bundle_id("s", 1), ed25519.Ed25519PrivateKey.generate(),
          [sys.argv[5]], e)
# VmHWM is this process image's own peak; ru_maxrss would carry the parent's
# (pytest's) peak across fork+exec on Linux.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(int(hwm.split()[1]) // 1024)
"""


def test_build_memory_is_bounded_whatever_the_study_size(tmp_path):
    """300 MB of files bundled in a process whose peak RSS stays far below that."""
    src = tmp_path / "big.dcm"
    block = os.urandom(1 << 20)
    with open(src, "wb") as f:
        for _ in range(50):
            f.write(block)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    pub = age_identity(tmp_path / "k")
    r = subprocess.run([sys.executable, "-c", BUILD_BIG, str(src), sha, str(50 << 20),
                        str(tmp_path / "big.bundle"), pub], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_mb = int(r.stdout.strip())
    assert (tmp_path / "big.bundle").stat().st_size > 300 << 20
    assert peak_mb < 150, f"peak RSS {peak_mb} MiB for a 300 MiB bundle"


def test_keygen_writes_a_private_identity_and_prints_the_recipient(tmp_path):
    from conftest import run_cli

    r = run_cli("bundle", "keygen", "--out", str(tmp_path / "escrow.key"))
    assert r.returncode == 0, r.stderr
    pub = r.stdout.strip()
    assert pub.startswith("age1") and len(pub) == 62
    assert oct((tmp_path / "escrow.key").stat().st_mode & 0o777) == "0o600"
    ident = bnd.load_identity(tmp_path / "escrow.key")
    assert str(ident[0].to_public()) == pub
    again = run_cli("bundle", "keygen", "--out", str(tmp_path / "escrow.key"))
    assert again.returncode == 1 and "refusing to overwrite" in again.stderr


def test_format_1_bundles_still_verify_and_open(keys, tmp_path):
    """Bundles written before format 2 (the ciphertext hashed on its own) still read."""
    d = tmp_path / "src"
    d.mkdir()
    entries = _entries(d, n=2, size=300_000, tag="old")
    p = tmp_path / "old.bundle"
    built = bnd.build(p, bnd.new_bundle_id("site-old", 1), keys["sign"], [keys["pub"]], entries,
                      fmt=1)
    blob = p.read_bytes()
    assert blob.startswith(bnd.MAGIC_V1) and _trailer(blob)[0]["format"] == 1
    t, n = _trailer(blob)
    assert t["ciphertext_sha256"] == hashlib.sha256(blob[len(bnd.MAGIC_V1):-16 - n]).hexdigest()
    info = bnd.verify(p)
    assert (info.format, info.file_sha256) == (1, hashlib.sha256(blob).hexdigest())
    assert info.file_sha256 == built.file_sha256
    opened = bnd.open_bundle(p, keys["ident"], tmp_path / "out")
    for e in entries[:-1]:
        assert (tmp_path / "out" / e.name).read_bytes() == e.source.read_bytes()
    # A format 1 trailer under the format 2 magic (or the reverse) is refused.
    assert "unsupported bundle format" in _rejected(keys, bnd.MAGIC + blob[len(bnd.MAGIC):],
                                                    tmp_path)
    assert opened.manifest["format"] == 1


def test_format_2_signs_magic_and_ciphertext_and_age_decrypts_it(keys, pair, tmp_path):
    blob = pair[0]
    assert blob.startswith(bnd.MAGIC)
    t, n = _trailer(blob)
    assert t["format"] == 2
    assert t["ciphertext_sha256"] == hashlib.sha256(blob[:-16 - n]).hexdigest()
    age = require_tool("age")
    ct = tmp_path / "ct.age"
    ct.write_bytes(blob[len(bnd.MAGIC):-16 - n])
    out = subprocess.run([age, "-d", "-i", str(keys["dir"] / "cloud.key"), str(ct)],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(out)) as tar:
        names = [m.name for m in tar.getmembers()]
    assert names[:2] == ["manifest.json", "manifest.sig"] and len(names) == 6
