"""``jobs crontab --format k8s`` as a cluster reads it: resources, /dev/shm, the image's entrypoint,
a locked output that does not fail the Job, AWS profiles from a Secret, colliding job files, and
the repository's jobs/ valid under ``kubernetes-validate --strict``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml
from click.testing import CliRunner
from conftest import REPO, VENV_BIN, need, output_lock_held

from batchmask.cli import main


def job_file(d: Path, name: str = "cam", **fields) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    base = {"name": name, "schedule": "*/15 * * * *", "input": "s3://b/in", "output": "s3://b/out"}
    p = d / f"{name}.toml"
    p.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in (base | fields).items()))
    return p


def render(*args: str) -> tuple[str, dict[str, dict]]:
    res = CliRunner().invoke(main, ["jobs", "crontab", "--format", "k8s", *args])
    assert res.exit_code == 0, res.output
    return res.output, {d["metadata"]["name"]: d for d in yaml.safe_load_all(res.output) if d}


def pod_of(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_resources_shm_and_the_images_entrypoint(tmp_path):
    job_file(tmp_path, "cpu", workers=3)
    job_file(tmp_path, "gpu", workers=3, gpus_per_worker=0.5)
    _, docs = render("--image", "reg/bm:1", "--gpu-image", "reg/bm:1-gpu", str(tmp_path))
    cpu, gpu = pod_of(docs["batchmask-cpu"]), pod_of(docs["batchmask-gpu"])
    (c,) = cpu["containers"]
    assert c["resources"] == {"requests": {"cpu": "3", "memory": f"{1024 + 3 * 1024}Mi"},
                              "limits": {"cpu": "3", "memory": f"{1024 + 3 * 1536}Mi"}}
    assert c["image"] == "reg/bm:1" and "nvidia.com/gpu" not in c["resources"]["limits"]
    (g,) = gpu["containers"]
    assert g["image"] == "reg/bm:1-gpu" and g["resources"]["limits"]["nvidia.com/gpu"] == 2  # 1.5 cards: 2
    # args, not command: Kubernetes' SIGTERM goes to the image's entrypoint, which passes it on
    assert "command" not in c and c["args"][:5] == ["batchmask", "jobs", "run", "--quiet", "--locked-ok"]
    shm = {v["name"]: v for v in cpu["volumes"]}["dshm"]
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    assert cpu["restartPolicy"] == "Never" and cpu["securityContext"] == {"runAsNonRoot": True}


def test_default_images_are_what_build_image_sh_tags(tmp_path):
    job_file(tmp_path, "cpu")
    job_file(tmp_path, "gpu", gpus_per_worker=1)
    _, docs = render(str(tmp_path))
    script = (REPO / "scripts" / "build_image.sh").read_text()
    assert "if ((gpu)); then tag=batchmask:latest-gpu; else tag=batchmask:latest; fi" in script
    assert pod_of(docs["batchmask-cpu"])["containers"][0]["image"] == "batchmask:latest"
    assert pod_of(docs["batchmask-gpu"])["containers"][0]["image"] == "batchmask:latest-gpu"


def test_profile_jobs_get_aws_files_from_a_secret(tmp_path):
    job_file(tmp_path, "prof", profile="batchmask", endpoint_url="http://s3.local:8333")
    job_file(tmp_path, "env")
    text, docs = render("--aws-secret", "my-aws", "--secret", "s3-env", str(tmp_path))
    (c,) = pod_of(docs["batchmask-prof"])["containers"]
    env = {e["name"]: e["value"] for e in c["env"]}
    mount = {m["name"]: m for m in c["volumeMounts"]}["aws"]
    assert env == {"AWS_CONFIG_FILE": f"{mount['mountPath']}/config",
                   "AWS_SHARED_CREDENTIALS_FILE": f"{mount['mountPath']}/credentials"}
    assert mount["readOnly"] is True
    assert {v["name"]: v for v in pod_of(docs["batchmask-prof"])["volumes"]}["aws"]["secret"] == {"secretName": "my-aws"}
    assert c["envFrom"] == [{"secretRef": {"name": "s3-env"}}]  # --secret still applies to every job
    (e,) = pod_of(docs["batchmask-env"])["containers"]
    assert "env" not in e and "aws" not in {m["name"] for m in e["volumeMounts"]}
    assert "kubectl create secret generic my-aws --from-file=config=" in text


def test_two_job_files_with_one_name_are_an_error(tmp_path):
    a = job_file(tmp_path / "a", "one")
    b = tmp_path / "b" / "one.toml"
    b.parent.mkdir()
    b.write_text(a.read_text().replace('"one"', '"two"'))
    res = CliRunner().invoke(main, ["jobs", "crontab", "--format", "k8s", str(a), str(b)])
    assert res.exit_code == 1, res.output
    assert str(a) in res.output and str(b) in res.output and "'one.toml'" in res.output


def test_jobs_run_locked_ok_exits_0_when_the_output_is_locked(tmp_path, tiny_model_dir):
    """What the CronJob runs: a run that finds its output held by another exits 0 with --locked-ok
    (the Job succeeds) and 4 without; the job's history says it was locked either way."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "in").mkdir()
    job = job_file(tmp_path, "cam", input=str(tmp_path / "in"), output=str(out), model=str(tiny_model_dir))
    with output_lock_held(out) as holder:
        args = ["jobs", "run", "--quiet", "--lock-dir", str(tmp_path / "locks"), str(job)]
        locked = CliRunner().invoke(main, args)
        ok = CliRunner().invoke(main, [*args[:2], "--locked-ok", *args[2:]])
    assert locked.exit_code == 4, locked.output
    assert ok.exit_code == 0 and "locked" in ok.output and f"pid {holder.pid}" in ok.output, ok.output


def test_repo_jobs_render_to_valid_kubernetes(tmp_path):
    """The rendering of jobs/ passes kubernetes-validate --strict (unknown fields are errors)."""
    exe = shutil.which("kubernetes-validate", path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    need(exe, "kubernetes-validate is not installed (pip install kubernetes-validate)")
    text, docs = render(str(REPO / "jobs"))
    assert set(docs) == {"batchmask-demo-wider", "batchmask-nightly-uploads", "batchmask-nightly-export"}
    (tmp_path / "cronjobs.yaml").write_text(text)
    r = subprocess.run([exe, "--strict", str(tmp_path / "cronjobs.yaml")], capture_output=True, text=True)
    print(text, r.stdout, r.stderr, sep="\n")
    assert r.returncode == 0 and r.stdout.count("INFO") == 3 and "ERROR" not in r.stdout + r.stderr, r.stdout + r.stderr
