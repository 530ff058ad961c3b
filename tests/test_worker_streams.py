"""A worker with 2 CPUs predicts in two ONNX Runtime streams (halves of a batch on one thread
each); its rows and masks are the same as one stream's, byte for byte, bad images included."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from batchmask.batch.plan import prepare_model_files
from batchmask.batch.storage import StorageSpec
from batchmask.batch.worker import MaskWorker, WorkerOptions, onnx_streams, prediction_chunks


def test_streams_are_two_on_two_cpus_and_one_on_a_gpu_or_one_cpu():
    assert [onnx_streams(t, False) for t in (1, 2, 3, 16)] == [1, 2, 2, 2]
    assert onnx_streams(4, True) == 1


def test_prediction_chunks_cover_the_shard_once_one_image_at_a_time_at_its_ends():
    assert prediction_chunks(20, 8, 1) == [(0, 8), (8, 16), (16, 20)]  # one stream: plain batches
    ones = [(i, i + 1) for i in range(22, 30)]
    assert prediction_chunks(30, 8, 2) == [(0, 1), (1, 2), (2, 6), (6, 10), (10, 14), (14, 18), (18, 22), *ones]
    assert prediction_chunks(0, 8, 2) == [] and prediction_chunks(1, 8, 2) == [(0, 1)]
    for n in range(0, 40):
        for bs in (1, 3, 8):
            c = prediction_chunks(n, bs, 2)
            assert [i for a, b in c for i in range(a, b)] == list(range(n))
            assert all(0 < b - a <= max(1, -(-bs // 2)) for a, b in c)
            assert all(b - a == 1 for a, b in c[:2] + c[-bs:])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_two_streams_write_what_one_stream_writes(tmp_path, bright_int8_model, precision):
    inp = tmp_path / "in"
    inp.mkdir()
    rng = np.random.default_rng(2)
    names = []
    for k in range(11):  # batch 4: sub-batches of 2, and a short one at the end
        w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(inp / f"{k:02d}.jpg", quality=90)
        names.append(f"{k:02d}.jpg")
    (inp / "05.jpg").write_bytes(b"not a jpeg")  # an error row between good images
    files, _ = prepare_model_files(bright_int8_model, "onnx", precision)
    items = [(n, f"masks/{n[:-4]}.png") for n in names]
    got = {}
    for threads in (1, 2):
        out = tmp_path / f"out{threads}"
        w = MaskWorker(files, StorageSpec(str(inp)), StorageSpec(str(out)),
                       WorkerOptions(run_id="r", batch_size=4, threads=threads, runtime="onnx", precision=precision))
        try:
            assert w.streams == threads and w.device()["streams"] == threads
            r = w.process(0, items)
        finally:
            w.pool.shutdown()
        assert (r["n"], r["failed"]) == (11, 1) and w.images == 11
        masks = {p.name: p.read_bytes() for p in sorted((out / "masks").iterdir())}
        got[threads] = ((out / "_parts" / "r-0000000.csv").read_bytes(), masks)
    assert len(got[2][1]) == 10
    assert got[2] == got[1]
