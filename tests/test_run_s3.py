"""`batchmask run` against a real S3 server (SeaweedFS) on a real 2-node Ray cluster."""

from __future__ import annotations

import csv
import io
import json

import pytest

from batchmask.batch.runner import RunError, run

pytestmark = pytest.mark.slow  # a 2-node Ray cluster and the S3 server


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", configure_logging=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_s3_in_and_out_with_actors_on_both_nodes(s3_server, two_nodes, demo_wider, tiny_model_dir, tmp_path,
                                                  monkeypatch):
    bucket = s3_server.new_bucket("run")
    fs = s3_server.fs()
    images = sorted(demo_wider.glob("images/*/*.jpg"))
    for p in images:
        fs.pipe_file(f"{bucket}/incoming/{p.parent.name}/{p.name}", p.read_bytes())
    fs.pipe_file(f"{bucket}/incoming/bad/zero.jpg", b"")
    # credentials from the standard environment, endpoint from AWS_ENDPOINT_URL_S3
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)
    # Each actor's first shard waits until the other actor is there too: both nodes work, whatever
    # the time either takes to load TensorFlow and the model.
    monkeypatch.setenv("BATCHMASK_TEST_RENDEZVOUS", f"2:{tmp_path / 'rendezvous'}")
    s = run(f"s3://{bucket}/incoming/", f"s3://{bucket}/masks/", str(tiny_model_dir), workers=2, batch_size=2,
            shard_size=2, quiet=True)
    n = len(images) + 1
    assert (s.total, s.ok, s.failed, s.exit_code) == (n, n - 1, 1, 3)
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{bucket}/masks/coverage.csv").decode())))
    assert sorted(r["image"] for r in rows) == sorted([f"{p.parent.name}/{p.name}" for p in images] + ["bad/zero.jpg"])
    masks = fs.find(f"{bucket}/masks/masks/")
    assert sorted(m.split("/masks/masks/", 1)[1] for m in masks) == sorted(
        r["mask"].split("masks/", 1)[1] for r in rows if r["status"] == "ok")
    assert not [p for p in fs.find(f"{bucket}/masks/_parts/") if p.endswith(".csv")]
    info = json.loads(fs.cat_file(f"{bucket}/masks/run.json"))
    assert info["ray"]["nodes"] == 2 and len(info["nodes_used"]) == 2, info["actors"]
    assert len(list((tmp_path / "rendezvous").iterdir())) == 2
    monkeypatch.delenv("BATCHMASK_TEST_RENDEZVOUS")
    text = json.dumps(info)
    assert s3_server.secret not in text and s3_server.key not in text
    # rerun: nothing left to do
    s2 = run(f"s3://{bucket}/incoming/", f"s3://{bucket}/masks/", str(tiny_model_dir), quiet=True)
    assert (s2.skipped, s2.ok, s2.failed) == (n, 0, 0)


def test_local_paths_on_multi_node_cluster_fail_early(two_nodes, demo_wider, tiny_model_dir, tmp_path):
    with pytest.raises(RunError, match="--shared-fs"):
        run(str(demo_wider / "images"), str(tmp_path / "out"), str(tiny_model_dir), quiet=True)
    assert not (tmp_path / "out" / "masks").exists()


def test_a_list_run_on_two_nodes_reads_urls_and_refuses_local_entries(s3_server, two_nodes, demo_wider,
                                                                      tiny_model_dir, tmp_path):
    """--input-list on a 2-node cluster: S3 entries are read by actors on both nodes; a local entry
    (which the other node cannot see) fails the run instead of becoming an error row."""
    fs = s3_server.fs()
    bucket = s3_server.new_bucket("lst2")
    files = sorted((demo_wider / "images").rglob("*.jpg"))[:4]
    for f in files:
        fs.put_file(str(f), f"{bucket}/in/{f.name}")
    urls = [f"s3://{bucket}/in/{f.name}" for f in files]
    fs.pipe_file(f"{bucket}/l.txt", "\n".join(urls).encode())
    kw = {"endpoint_url": s3_server.endpoint_url, "storage_options": s3_server.storage_options, "quiet": True,
          "workers": 2, "shard_size": 1, "in_process_max": 0}
    s = run(None, f"s3://{bucket}/out/", str(tiny_model_dir), input_list=f"s3://{bucket}/l.txt", **kw)
    assert (s.total, s.ok) == (4, 4)
    assert len(set(s.run_json["nodes_used"])) == 2

    fs.pipe_file(f"{bucket}/l.txt", "\n".join([*urls, str(files[0])]).encode())
    with pytest.raises(RunError, match="--shared-fs"):
        run(None, f"s3://{bucket}/out/", str(tiny_model_dir), input_list=f"s3://{bucket}/l.txt", **kw)
    fs.invalidate_cache()
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{bucket}/out/coverage.csv").decode())))
    assert str(files[0]) not in {r["image"] for r in rows}  # no error row: the next run (with --shared-fs) does it
