"""Storage against a real S3 server (SeaweedFS on loopback) and the local filesystem."""

from __future__ import annotations

import os
import subprocess
import sys

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


def test_wrong_credentials_fail_without_leaking_them(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrongkeyid123")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrongsecret456789")
    with pytest.raises(storage.StorageError) as err:
        storage.read_bytes(s3.uri("roundtrip/00.bin"))
    assert "wrongsecret456789" not in str(err.value) and "wrongkeyid123" not in str(err.value)
    assert "wrongsecret456789" not in repr(storage.S3Settings.from_env())


def test_redact_scrubs_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    text = storage.redact("failed with AKIAEXAMPLEKEY / s3cr3t-value-xyz")
    assert text == "failed with *** / ***"
    assert "s3cr3t" not in repr(storage.S3Settings.from_env())


def test_two_servers_do_not_collide_and_restart_keeps_data(tmp_path):
    with EmbeddedS3() as a, EmbeddedS3(data_dir=tmp_path / "b") as b:
        assert a.port != b.port
        client = storage.boto3_client(storage.S3Settings.from_env(b.env))
        client.put_object(Bucket=b.bucket, Key="kept.txt", Body=b"still here")
        b.pause()  # stop, keep data folder and port
        b.start()
        assert client.get_object(Bucket=b.bucket, Key="kept.txt")["Body"].read() == b"still here"


def test_s3_server_command_prints_endpoint_and_stops_on_interrupt(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "restoration.cli", "s3-server", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("bucket:"):
            break
    proc.send_signal(2)  # SIGINT, as Ctrl-C
    assert proc.wait(timeout=60) == 0
    text = "".join(lines)
    assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in text
