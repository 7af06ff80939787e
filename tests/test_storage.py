"""Storage against a real S3 server (SeaweedFS on loopback) and the local filesystem."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from restoration import storage
from restoration.s3server import EmbeddedS3


def test_s3_round_trip_is_byte_identical(s3):
    payloads = {f"roundtrip/{i:02d}.bin": os.urandom(1000 * (i + 1)) for i in range(5)}
    payloads["roundtrip/nested/deeper/large.bin"] = os.urandom(6 * 2**20)  # above the filer's 4 MB chunk size
    for key, data in payloads.items():
        storage.write_bytes(s3.uri(key), data)
    listed = {info.path.removeprefix(f"{s3.bucket}/"): info.size for info in storage.list_files(s3.uri("roundtrip"))}
    assert listed == {k: len(v) for k, v in payloads.items()}
    for key, data in payloads.items():
        assert storage.read_bytes(s3.uri(key)) == data
    # The same objects through boto3 (the other client the project uses), to the byte.
    body = storage.boto3_client().get_object(Bucket=s3.bucket, Key="roundtrip/03.bin")["Body"].read()
    assert body == payloads["roundtrip/03.bin"]


def test_local_round_trip_and_resolve(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"xyz")
    assert storage.read_bytes(uri) == b"xyz"
    assert storage.exists(uri) and not storage.exists(str(tmp_path / "nope"))
    fs, path = storage.resolve("s3://bucket/some/prefix/")
    assert path == "bucket/some/prefix" and fs.type_name == "s3"


@pytest.mark.parametrize("uri", ["s3://", "gs://bucket/x", "http://example/x"])
def test_bad_uris_are_refused(uri):
    with pytest.raises(storage.StorageError, match="URI"):
        storage.resolve(uri)


def test_missing_object_is_a_clear_error(s3):
    with pytest.raises(storage.StorageError, match="not found: s3://"):
        storage.read_bytes(s3.uri("does/not/exist.png"))


@pytest.mark.parametrize("wrong", ["secret", "both"])
def test_wrong_credentials_are_denied_without_leaking_them(s3, monkeypatch, wrong):
    # An object this test wrote itself, readable with the right keys: what follows can only be refused for the keys.
    uri = s3.uri("credentials", f"{wrong}.bin")
    storage.write_bytes(uri, b"only for the right keys")
    assert storage.read_bytes(uri) == b"only for the right keys"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrongsecret456789")
    if wrong == "both":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrongkeyid123")
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(uri)
    message = str(err.value)
    assert message.startswith(f"cannot read {uri}: ") and "not found" not in message, message
    assert "ACCESS_DENIED" in message and message.endswith("(check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    assert "wrongsecret456789" not in message and "wrongkeyid123" not in message
    assert "wrongsecret456789" not in repr(storage.S3Settings.from_env())


def test_redact_scrubs_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    text = storage.redact("failed with AKIAEXAMPLEKEY / s3cr3t-value-xyz")
    assert text == "failed with *** / ***"
    assert "s3cr3t" not in repr(storage.S3Settings.from_env())


def test_redact_scrubs_the_session_token(monkeypatch):
    # Temporary credentials (STS) add AWS_SESSION_TOKEN; it is as secret as the key and must go the same way.
    token = "IQoJb3JpZ2luX2VjEXAMPLE-session-token/abc+def=="
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ASIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    settings = storage.S3Settings.from_env()
    assert settings.session_token == token  # read, so that both clients send it
    assert storage.redact(f"denied: x-amz-security-token={token}; key ASIAEXAMPLEKEY") == (
        "denied: x-amz-security-token=***; key ***"
    )
    assert token not in repr(settings) and "IQoJ" not in repr(settings)


@pytest.mark.slow  # starts S3 servers of its own
def test_two_servers_do_not_collide_and_restart_keeps_data(tmp_path):
    with EmbeddedS3() as a, EmbeddedS3(data_dir=tmp_path / "b") as b:
        assert a.port != b.port
        client = storage.boto3_client(storage.S3Settings.from_env(b.env))
        client.put_object(Bucket=b.bucket, Key="kept.txt", Body=b"still here")
        b.pause()  # stop, keep data folder and port
        b.start()
        assert client.get_object(Bucket=b.bucket, Key="kept.txt")["Body"].read() == b"still here"


class Output:
    """A process's stdout lines, read on a thread so that waiting for one has a deadline: a server that hangs or dies
    before printing it fails the test (and is stopped) instead of blocking it forever."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, queue.Queue()
        threading.Thread(target=lambda: [*map(self.lines.put, proc.stdout), self.lines.put(None)], daemon=True).start()

    def until(self, prefix: str, timeout: float = 120.0) -> list[str]:
        """The lines printed up to the first that starts with `prefix`."""
        seen, deadline = [], time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                pytest.fail(f"no line starting with {prefix!r} within {timeout:g} s; printed: {''.join(seen)!r}")
            if line is None:
                pytest.fail(f"exited ({self.proc.wait()}) before a line starting with {prefix!r}: {''.join(seen)!r}")
            seen.append(line)
            if line.startswith(prefix):
                return seen

    def stop(self) -> None:
        """Ctrl-C, which stops the S3 server it runs (in a session of its own, so a kill would orphan it); a kill only
        when that does not end it."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # starts S3 servers of its own
def test_s3_server_command_serves_on_the_given_port_and_stops_on_interrupt(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "restoration.cli", "s3-server", "--data-dir", str(tmp_path), "--port", str(port)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = Output(proc)
    try:
        lines = output.until("bucket:")
        exports = dict(
            line.removeprefix("export ").strip().split("=", 1) for line in lines if line.startswith("export ")
        )
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{port}"
        # The printed lines are all a client needs: a round trip on that port with them.
        client = storage.boto3_client(storage.S3Settings.from_env(exports))
        bucket = lines[-1].split()[1].removeprefix("s3://")
        client.put_object(Bucket=bucket, Key="hello.txt", Body=b"on the given port")
        assert client.get_object(Bucket=bucket, Key="hello.txt")["Body"].read() == b"on the given port"
    finally:
        proc.send_signal(signal.SIGINT)  # as Ctrl-C
    assert output.until("stopping", timeout=60)
    assert proc.wait(timeout=60) == 0
