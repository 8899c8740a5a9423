"""Where bundles go: one small interface, two implementations (S3-compatible, a folder).

The same shape as huey's storage backends: :class:`Target` says what sync needs
(an authenticated link check, a resumable upload that never overwrites, a
listing and a download for restore), and each implementation is short.

Resumption never trusts local bookkeeping alone: the S3 target asks the
store (``ListParts``) which parts it holds, so an acknowledged part is never
sent again, and a lost ``CompleteMultipartUpload`` reply is resolved with
``HeadObject`` against the SHA-256 we stored in the object's metadata.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DONE, YIELDED = "done", "yielded"


class TargetError(Exception):
    """The target cannot be reached or refused us; the message is safe to log (no secrets)."""


class BundleConflict(TargetError):
    """This bundle cannot go as it is (a different object under its name, a damaged part):
    retried later on its own, while the link stays up for the others."""


@dataclass
class UploadJob:
    """One bundle to send, and the callbacks that make its progress durable."""

    key: str
    path: Path
    size: int
    sha256: str
    upload_id: str | None
    part_size: int
    parallel: int = 1
    save_upload_id: Callable[[str | None], None] = lambda uid: None
    part_done: Callable[[int, str, int], None] = lambda n, etag, size: None
    should_yield: Callable[[], bool] = lambda: False  # a more urgent bundle is waiting
    pace: Callable[[int], None] = lambda n: None  # bandwidth cap (and lease renewal)


@dataclass
class RemoteObject:
    key: str
    size: int
    sha256: str


class Target:
    """What sync needs from a place that keeps bundles."""

    description = "target"

    def check(self) -> None:
        """Raise TargetError unless an authenticated request succeeds (the link is up)."""
        raise NotImplementedError

    def head(self, key: str) -> RemoteObject | None:
        raise NotImplementedError

    def upload(self, job: UploadJob) -> str:
        """Send (or resume) ``job``; return DONE or YIELDED (stopped at a part boundary)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[RemoteObject]:
        raise NotImplementedError

    def download(self, key: str, dest: Path) -> None:
        raise NotImplementedError


class _PacedReader(io.BytesIO):
    """A part's bytes, paced as they are read the first time (retries are not charged again)."""

    def __init__(self, data: bytes, pace: Callable[[int], None]):
        super().__init__(data)
        self._pace, self._high = pace, 0

    def read(self, n: int | None = -1) -> bytes:
        chunk = super().read(64 * 1024 if n is None or n < 0 or n > 64 * 1024 else n)
        end = self.tell()
        if end > self._high:
            self._pace(end - self._high)
            self._high = end
        return chunk


def read_part(path: Path, number: int, part_size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek((number - 1) * part_size)
        return f.read(part_size)


def part_count(size: int, part_size: int) -> int:
    return max(1, -(-size // part_size))


# -- S3-compatible --------------------------------------------------------------------------
def read_credentials(path: Path) -> tuple[str, str]:
    """``access_key_id = …`` / ``secret_access_key = …`` (the AWS credentials file format)."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise TargetError(f"cannot read credentials file {path}: {e.strerror}") from None
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            k, v = line.split("=", 1)
            values[k.strip().lower().removeprefix("aws_")] = v.strip()
    if not values.get("access_key_id") or not values.get("secret_access_key"):
        raise TargetError(f"{path}: needs access_key_id and secret_access_key lines")
    return values["access_key_id"], values["secret_access_key"]


class S3Target(Target):
    """Any S3-compatible store (AWS S3, MinIO, Ceph RGW, moto) through boto3."""

    def __init__(self, bucket: str, prefix: str = "", url: str = "", region: str = "us-east-1",
                 credentials: tuple[str, str] | None = None, timeout_s: float = 20):
        import boto3
        from botocore.config import Config as BotoConfig

        if not bucket:
            raise TargetError("sync.bucket is not set")
        self.bucket, self.prefix = bucket, prefix
        self.description = f"s3 {url or 'aws'} bucket {bucket}"
        kw: dict[str, Any] = {}
        if credentials:
            kw = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
        session = boto3.session.Session()

        def client(read_timeout: float, attempts: int):
            return session.client(
                "s3", endpoint_url=url or None, region_name=region,
                config=BotoConfig(connect_timeout=timeout_s, read_timeout=read_timeout,
                                  retries={"max_attempts": attempts, "mode": "standard"},
                                  request_checksum_calculation="when_required",
                                  response_checksum_validation="when_required",
                                  max_pool_connections=32),
                **kw,
            )

        self.client = client(timeout_s, 2)
        # Assembling a large object can take the store minutes; our own HeadObject check,
        # not a blind automatic retry racing the first request, settles a lost reply.
        self.complete_client = client(max(300.0, timeout_s), 1)

    def _errors(self):
        from botocore.exceptions import BotoCoreError, ClientError

        return (BotoCoreError, ClientError)

    def _call(self, what: str, fn, **kw):
        try:
            return fn(**kw)
        except self._errors() as e:
            raise TargetError(f"{what}: {_describe(e)}") from None

    def check(self) -> None:
        self._call("link check (HeadBucket)", self.client.head_bucket, Bucket=self.bucket)

    def head(self, key: str) -> RemoteObject | None:
        from botocore.exceptions import ClientError

        try:
            r = self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise TargetError(f"HeadObject: {_describe(e)}") from None
        except self._errors() as e:
            raise TargetError(f"HeadObject: {_describe(e)}") from None
        return RemoteObject(key, r["ContentLength"], r.get("Metadata", {}).get("sha256", ""))

    def _settled(self, job: UploadJob) -> bool:
        """Is the object there with our content? (resolves a lost final reply)."""
        obj = self.head(job.key)
        if obj is None:
            return False
        if obj.sha256 != job.sha256 or obj.size != job.size:
            raise BundleConflict(f"{job.key} exists with other content; bundles are never "
                              "overwritten")
        return True

    def upload(self, job: UploadJob) -> str:
        if job.upload_id is None and self._settled(job):
            return DONE
        if job.size <= job.part_size:
            return self._put_small(job)
        if job.upload_id is None:
            r = self._call("CreateMultipartUpload", self.client.create_multipart_upload,
                           Bucket=self.bucket, Key=job.key, ContentType="application/octet-stream",
                           Metadata={"sha256": job.sha256})
            job.upload_id = r["UploadId"]
            job.save_upload_id(job.upload_id)  # durable before the first part is sent
        held = self._held_parts(job)
        if held is None:  # the upload is gone: completed already, or aborted by the store
            if self._settled(job):
                return DONE
            job.upload_id = None
            job.save_upload_id(None)
            return self.upload(job)
        todo = [n for n in range(1, part_count(job.size, job.part_size) + 1) if n not in held]
        with ThreadPoolExecutor(max_workers=job.parallel) as pool:
            while todo:
                if job.should_yield():
                    return YIELDED
                wave, todo = todo[: job.parallel], todo[job.parallel:]
                for n, etag, size in pool.map(lambda n: self._send_part(job, n), wave):
                    held[n] = etag
                    job.part_done(n, etag, size)
        return self._complete(job, held)

    def _held_parts(self, job: UploadJob) -> dict[int, str] | None:
        from botocore.exceptions import ClientError

        held: dict[int, str] = {}
        kw = {"Bucket": self.bucket, "Key": job.key, "UploadId": job.upload_id}
        while True:
            try:
                r = self.client.list_parts(**kw)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchUpload", "404"):
                    return None
                raise TargetError(f"ListParts: {_describe(e)}") from None
            except self._errors() as e:
                raise TargetError(f"ListParts: {_describe(e)}") from None
            for p in r.get("Parts", []):
                n = p["PartNumber"]
                expect = min(job.part_size, job.size - (n - 1) * job.part_size)
                if p["Size"] == expect:  # a short part (never acknowledged whole) is re-sent
                    held[n] = p["ETag"]
            if not r.get("IsTruncated"):
                return held
            kw["PartNumberMarker"] = r["NextPartNumberMarker"]

    def _send_part(self, job: UploadJob, n: int) -> tuple[int, str, int]:
        data = read_part(job.path, n, job.part_size)
        md5 = hashlib.md5(data, usedforsecurity=False)
        r = self._call(f"UploadPart {n}", self.client.upload_part, Bucket=self.bucket, Key=job.key,
                       UploadId=job.upload_id, PartNumber=n, Body=_PacedReader(data, job.pace),
                       ContentMD5=base64.b64encode(md5.digest()).decode(),
                       ContentLength=len(data))
        if r["ETag"].strip('"') != md5.hexdigest():
            raise BundleConflict(f"part {n} arrived damaged (ETag differs from our MD5)")
        return n, r["ETag"], len(data)

    def _complete(self, job: UploadJob, held: dict[int, str]) -> str:
        from botocore.exceptions import ClientError

        parts = [{"PartNumber": n, "ETag": held[n]} for n in sorted(held)]
        try:
            self.complete_client.complete_multipart_upload(
                Bucket=self.bucket, Key=job.key, UploadId=job.upload_id,
                MultipartUpload={"Parts": parts}, IfNoneMatch="*")
        except self._errors() as e:
            # The reply may be lost after the store completed it, or the object exists:
            # either way HeadObject and our SHA-256 decide.
            if self._settled(job):
                return DONE
            code = e.response.get("Error", {}).get("Code") if isinstance(e, ClientError) else ""
            if code == "NoSuchUpload":
                job.upload_id = None
                job.save_upload_id(None)
            raise TargetError(f"CompleteMultipartUpload: {_describe(e)}") from None
        return DONE

    def _put_small(self, job: UploadJob) -> str:
        data = job.path.read_bytes()
        try:
            self.client.put_object(Bucket=self.bucket, Key=job.key, Body=_PacedReader(data, job.pace),
                                   ContentLength=len(data), Metadata={"sha256": job.sha256},
                                   IfNoneMatch="*")
        except self._errors() as e:
            if self._settled(job):
                return DONE
            raise TargetError(f"PutObject: {_describe(e)}") from None
        job.part_done(1, "", len(data))
        return DONE

    def list(self, prefix: str = "") -> list[RemoteObject]:
        out = []
        kw = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
        while True:
            r = self._call("ListObjectsV2", self.client.list_objects_v2, **kw)
            out += [RemoteObject(o["Key"], o["Size"], "") for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return out
            kw["ContinuationToken"] = r["NextContinuationToken"]

    def download(self, key: str, dest: Path) -> None:
        self._call(f"download {key}", self.client.download_file, Bucket=self.bucket, Key=key,
                   Filename=str(dest))


def _describe(e: Exception) -> str:
    """A one-line reason without request signatures or keys."""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict) and resp.get("Error"):
        err = resp["Error"]
        return f"{err.get('Code', '?')} {err.get('Message', '')}".strip()
    return type(e).__name__ + (f": {str(e)[:160]}" if str(e) else "")


# -- a folder (USB disk) ---------------------------------------------------------------------
class FolderTarget(Target):
    """Bundles copied to a folder, resumably, never overwritten (a disk carried out by hand)."""

    def __init__(self, root: Path, prefix: str = ""):
        self.root, self.prefix = Path(root), prefix
        self.description = f"folder {root}"
        self._lock = threading.Lock()

    def check(self) -> None:
        if not self.root.is_dir():
            raise TargetError(f"folder {self.root} is not there (disk not mounted?)")
        if not os.access(self.root, os.W_OK):
            raise TargetError(f"folder {self.root} is not writable")

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root.resolve() not in p.parents:
            raise TargetError(f"key {key!r} escapes the folder")
        return p

    def head(self, key: str) -> RemoteObject | None:
        p = self._path(key)
        if not p.is_file():
            return None
        sidecar = p.with_name(p.name + ".sha256")
        sha = sidecar.read_text().strip() if sidecar.is_file() else ""
        return RemoteObject(key, p.stat().st_size, sha)

    def upload(self, job: UploadJob) -> str:
        from appliance.core import durable

        self.check()
        final = self._path(job.key)
        obj = self.head(job.key)
        if obj is not None:
            if obj.sha256 == job.sha256 and obj.size == job.size:
                return DONE
            raise BundleConflict(f"{final} exists with other content; bundles are never overwritten")
        durable.ensure_dir(final.parent)
        partial = final.with_name(final.name + ".partial")
        done = partial.stat().st_size if partial.exists() else 0
        if done > job.size or (done and _sha_prefix(partial, done) != _sha_prefix(job.path, done)):
            done = 0  # not a prefix of ours: start again
            partial.unlink()
        with open(job.path, "rb") as src, open(partial, "ab" if done else "wb") as dst:
            src.seek(done)
            while chunk := src.read(job.part_size):
                if job.should_yield():
                    dst.flush()
                    os.fsync(dst.fileno())
                    return YIELDED
                job.pace(len(chunk))
                dst.write(chunk)
                done += len(chunk)
                job.part_done(-(-done // job.part_size), "", len(chunk))
            dst.flush()
            os.fsync(dst.fileno())
        if partial.stat().st_size != job.size or _sha_prefix(partial, job.size) != job.sha256:
            partial.unlink()
            raise BundleConflict(f"copy to {final} is damaged (SHA-256 differs); will retry")
        durable.atomic_write(final.with_name(final.name + ".sha256"), job.sha256.encode())
        os.link(partial, final)  # fails if final exists: never overwritten
        partial.unlink()
        durable.fsync_dir(final.parent)
        return DONE

    def list(self, prefix: str = "") -> list[RemoteObject]:
        base = self.root / (self.prefix + prefix)
        if not base.exists():
            return []
        return [RemoteObject(p.relative_to(self.root).as_posix(), p.stat().st_size, "")
                for p in sorted(base.rglob("*.bundle")) if p.is_file()]

    def download(self, key: str, dest: Path) -> None:
        shutil.copyfile(self._path(key), dest)


def _sha_prefix(path: Path, n: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n
        while left:
            chunk = f.read(min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def from_url(spec: str, *, url: str = "", region: str = "us-east-1",
             credentials_file: str = "", timeout_s: float = 20) -> Target:
    """``s3://bucket/prefix`` or a folder path (``appliance restore --from``)."""
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[5:].partition("/")
        creds = read_credentials(Path(credentials_file)) if credentials_file else None
        return S3Target(bucket, prefix, url, region, creds, timeout_s)
    return FolderTarget(Path(spec))
