"""Real servers for the object stores besides S3 (tests/s3server.py): Google Cloud Storage, Azure
Blob Storage and plain HTTP, each on 127.0.0.1 with a free port, session-scoped.

* ``gcs_server``: ``gcp-storage-emulator`` (PyPI, the ``test`` extra), in memory. It honours
  ``prefix`` but returns every key in one page (no ``maxResults``/``pageToken``) and ignores
  ``ifGenerationMatch``: the GCS backend's paging and conditional writes meet a real answer only
  from Google's servers; here the output lock takes its settle protocol.
* ``azurite``: Microsoft's Azure Storage emulator from npm. ``.ci/run`` installs it into
  ``$BATCHMASK_AZURITE_DIR`` (default ``~/.cache/batchmask-azurite``); when it is missing there and
  npm is on the PATH, the fixture installs it itself (about 15 s, from the npm registry).
* ``http_server``: the standard library's threaded ``http.server`` over a temporary folder, plus
  two paths that misbehave: ``/hang/...`` never answers, ``/fail-once/...`` answers 503 the first
  time each path is asked for.

A missing tool skips with its reason, or fails under ``BATCHMASK_REQUIRE_ALL=1`` (:func:`need`).
"""

from __future__ import annotations

import base64
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import need
from ports import StartFailed, start_with_free_ports
from s3server import _stop  # the same process-group stop as the S3 server's

AZURITE_DIR = Path(os.environ.get("BATCHMASK_AZURITE_DIR", Path.home() / ".cache" / "batchmask-azurite"))
AZURITE_VERSION = "3"
#: The account Azurite is started with (``AZURITE_ACCOUNTS``), a test key that tests look for in
#: what runs write (it must never appear there).
AZ_ACCOUNT = "batchmask"
AZ_KEY = base64.b64encode(b"batchmask-azurite-test-key-0123456789").decode()


def _wait_port(port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise StartFailed(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise StartFailed(f"{what} did not listen on {port} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _spawn(args: list[str], log: Path, port: int, what: str, env: dict | None = None) -> subprocess.Popen:
    with open(log, "wb") as logf:
        proc = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=log.parent, env=env)
    try:
        _wait_port(port, proc, log, what)
    except BaseException:
        _stop(proc)
        raise
    return proc


# --------------------------------------------------------------------------- GCS
@dataclass
class GCSServer:
    endpoint: str
    buckets: list[str] = field(default_factory=list)

    def fs(self):
        from gcsfs.core import GCSFileSystem

        return GCSFileSystem(token="anon", endpoint_url=self.endpoint, skip_instance_cache=True)

    def new_bucket(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        self.buckets.append(name)
        return name


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """``gcp-storage-emulator`` on loopback; tests set ``STORAGE_EMULATOR_HOST`` to ``endpoint``."""
    exe = Path(sys.executable).parent / "gcp-storage-emulator"
    need(exe.exists() or shutil.which("gcp-storage-emulator"),
         "gcp-storage-emulator not installed (pip install -e '.[test]')")
    need(_importable("gcsfs"), "gcsfs not installed (pip install -e '.[test]')")
    d = tmp_path_factory.mktemp("gcs")

    def start(ports: list[int]):
        args = [str(exe) if exe.exists() else "gcp-storage-emulator", "start", "--host", "127.0.0.1",
                "--port", str(ports[0]), "--in-memory", "--quiet"]
        return _spawn(args, d / f"gcs-{ports[0]}.log", ports[0], "gcp-storage-emulator"), ports[0]

    proc, port = start_with_free_ports(start, 1)
    try:
        yield GCSServer(f"http://127.0.0.1:{port}")
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- Azure
@dataclass
class Azurite:
    port: int
    containers: list[str] = field(default_factory=list)

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={AZ_ACCOUNT};AccountKey={AZ_KEY};"
                f"BlobEndpoint=http://127.0.0.1:{self.port}/{AZ_ACCOUNT};")

    def fs(self):
        from adlfs import AzureBlobFileSystem

        return AzureBlobFileSystem(connection_string=self.connection_string, skip_instance_cache=True)

    def new_container(self, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.fs().mkdir(name)
        self.containers.append(name)
        return name


def azurite_bin(install: bool = True) -> Path | None:
    """``azurite-blob`` from :data:`AZURITE_DIR`, installed there with npm if missing (and npm exists)."""
    exe = AZURITE_DIR / "node_modules" / ".bin" / "azurite-blob"
    if not exe.exists() and install and shutil.which("npm") and shutil.which("node"):
        AZURITE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error",
                        f"azurite@{AZURITE_VERSION}"], cwd=AZURITE_DIR, check=False, timeout=300,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return exe if exe.exists() else None


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    """Azurite's Blob service on loopback, in memory."""
    need(_importable("adlfs"), "adlfs not installed (pip install -e '.[test]')")
    need(shutil.which("node"), "node not found (Azurite runs on Node.js)")
    exe = azurite_bin()
    need(exe, f"Azurite not installed in {AZURITE_DIR} and npm could not install it (npm install azurite)")
    d = tmp_path_factory.mktemp("azurite")

    def start(ports: list[int]):
        args = [str(exe), "--blobHost", "127.0.0.1", "--blobPort", str(ports[0]), "--inMemoryPersistence",
                "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"]
        env = dict(os.environ, AZURITE_ACCOUNTS=f"{AZ_ACCOUNT}:{AZ_KEY}")
        return _spawn(args, d / f"azurite-{ports[0]}.log", ports[0], "azurite-blob", env), ports[0]

    proc, port = start_with_free_ports(start, 1)
    try:
        yield Azurite(port)
    finally:
        _stop(proc)


# --------------------------------------------------------------------------- HTTP
class _Handler(http.server.SimpleHTTPRequestHandler):
    failed: set[str] = set()
    release = threading.Event()

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/hang/"):
            self.release.wait(120)  # never answers within any client timeout
            return
        if self.path.startswith("/fail-once/") and self.path not in self.failed:
            self.failed.add(self.path)
            self.send_error(503, "try again")
            return
        if self.path.startswith("/fail-once/"):
            self.path = self.path[len("/fail-once") :]
        super().do_GET()


@dataclass
class HTTPServer:
    url: str
    root: Path


@pytest.fixture(scope="session")
def http_server(tmp_path_factory):
    """A threaded ``http.server`` serving a temporary folder (``root``) at ``url``."""
    root = tmp_path_factory.mktemp("www")
    handler = functools.partial(_Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield HTTPServer(f"http://127.0.0.1:{server.server_address[1]}", root)
    finally:
        _Handler.release.set()
        server.shutdown()
        server.server_close()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
