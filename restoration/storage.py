"""Where data lives: `s3://bucket/prefix` or a local path, as a pyarrow filesystem plus a path on it.

S3 settings come from the standard variables — `AWS_ENDPOINT_URL` (MinIO, SeaweedFS, or unset for AWS),
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` — with retries on both clients
(pyarrow's AWS standard retry strategy; boto3's `standard` mode). Credentials never appear in anything this module
prints or raises: `redact()` scrubs them from text that leaves the process.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from restoration.errors import UserError

S3_RETRY_ATTEMPTS = 10  # ~1 min of exponential back-off: rides out a store restart, fails a dead one in bounded time


class StorageError(UserError):
    """A URI that cannot be used: bad form, missing object, unreachable store."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    access_key: str | None
    secret_key: str | None
    session_token: str | None
    region: str

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            access_key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )

    def __repr__(self) -> str:  # never show the secrets, even in a debugger or a traceback
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, credentials=***)"


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


class _RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, pickled with everything it was built from.

    pyarrow pickles an S3FileSystem without its retry strategy, so the copies Ray ships to its read and write tasks
    fell back to the SDK default (3 attempts within about a second) and a store restart failed the run. This one
    rebuilds itself from the same arguments, retry strategy included.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._kwargs = kwargs

    def __reduce__(self):
        return _rebuild_s3, (self._kwargs,)


def _rebuild_s3(kwargs: dict) -> _RetryingS3FileSystem:
    return _RetryingS3FileSystem(**kwargs)


def s3_filesystem(settings: S3Settings | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for `settings` (default: from the environment), with retries that survive pickling
    (Ray tasks get the same retries as the driver)."""
    s = settings or S3Settings.from_env()
    kwargs: dict = {
        "region": s.region,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
        "connect_timeout": 10,
        "request_timeout": 60,
    }
    if s.access_key and s.secret_key:
        kwargs.update(access_key=s.access_key, secret_key=s.secret_key, session_token=s.session_token)
    if s.endpoint_url:
        parsed = urlparse(s.endpoint_url)
        kwargs.update(endpoint_override=parsed.netloc or parsed.path, scheme=parsed.scheme or "https")
        # MinIO and SeaweedFS serve path-style URLs; AWS itself stays on virtual-hosted style.
        kwargs["force_virtual_addressing"] = False
    return _RetryingS3FileSystem(**kwargs)


def boto3_client(settings: S3Settings | None = None):
    """A boto3 S3 client for `settings` (default: from the environment), retries in `standard` mode."""
    import boto3
    from botocore.config import Config

    s = settings or S3Settings.from_env()
    return boto3.client(
        "s3",
        endpoint_url=s.endpoint_url,
        aws_access_key_id=s.access_key,
        aws_secret_access_key=s.secret_key,
        aws_session_token=s.session_token,
        region_name=s.region,
        config=Config(retries={"mode": "standard", "max_attempts": S3_RETRY_ATTEMPTS}),
    )


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Turn a URI into a filesystem and a path on it.

    Args:
        uri: `s3://bucket/prefix/...` or a local path (relative paths are made absolute).

    Returns:
        (filesystem, path): for S3 the path is `bucket/prefix/...`; for local files an absolute POSIX path.
    """
    text = str(uri)
    if is_s3(text):
        parsed = urlparse(text)
        if not parsed.netloc:
            raise StorageError(f"bad S3 URI {text!r}: expected s3://bucket/prefix")
        path = posixpath.normpath(f"{parsed.netloc}/{parsed.path.lstrip('/')}").rstrip("/")
        return s3_filesystem(), path
    if "://" in text:
        raise StorageError(f"unsupported URI {text!r}: expected s3://bucket/prefix or a local path")
    return pafs.LocalFileSystem(), Path(text).expanduser().resolve().as_posix()


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI (S3 or local) with '/'."""
    base = str(uri).rstrip("/")
    rest = "/".join(p.strip("/") for p in parts if p)
    return f"{base}/{rest}" if rest else base


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {_reason(e)}") from None


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write an object whole (S3 PUT is atomic: readers see the old object or the new one, never a part)."""
    fs, path = resolve(uri)
    if not is_s3(uri):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {_reason(e)}") from None


def file_info(uri: str | os.PathLike) -> pafs.FileInfo:
    """What is at `uri` (`.type` is NotFound when nothing is); a store that refuses or cannot be reached is a
    StorageError naming the URI, never a bare OSError."""
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"cannot access {uri}: {_reason(e)}") from None


def exists(uri: str | os.PathLike) -> bool:
    return file_info(uri).type != pafs.FileType.NotFound


def list_files(uri: str | os.PathLike, recursive: bool = True) -> Iterator[pafs.FileInfo]:
    """The files under a prefix, sorted by path (so listings are stable across runs and stores).

    Returns:
        FileInfo objects (`.path` on the filesystem of `resolve(uri)`, `.size` in bytes); none for a missing prefix.
    """
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {_reason(e)}") from None
    yield from sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an S3 URI if it does not exist (a no-op for local paths)."""
    if not is_s3(uri):
        return
    bucket = urlparse(uri).netloc
    fs = s3_filesystem()
    if file_info(f"s3://{bucket}").type == pafs.FileType.NotFound:
        try:
            fs.create_dir(bucket)
        except OSError as e:
            raise StorageError(f"cannot create bucket {bucket!r}: {_reason(e)}") from None


def _reason(error: OSError) -> str:
    """An OSError from the store as one redacted line, with a hint when the store refused the credentials."""
    text = redact(str(error)).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if any(code in text for code in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")):
        text += " (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    return text


def redact(text: str, settings: S3Settings | None = None) -> str:
    """Replace any credential of `settings` (default: the environment's) that occurs in `text` with ***."""
    s = settings or S3Settings.from_env()
    for secret in (s.secret_key, s.session_token, s.access_key):
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text
