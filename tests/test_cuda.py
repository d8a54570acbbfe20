"""CUDA paths: the same engine code on a GPU (bf16-mixed, fp16-mixed + GradScaler, nccl).

Skipped where no GPU is present (CI has none). On a machine with one, run
``python -m pytest -q tests/test_cuda.py`` - one short check of every CUDA path.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_engine(make_engine, **extra):
    return make_engine({"device": "cuda", **extra})


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "fp16-mixed"])
def test_precision_modes_train_on_cuda(make_engine, batches, precision):
    eng = cuda_engine(make_engine, precision=precision, **{"plugins.refine": None, "data.max_tasks": 1})
    assert eng.device.type == "cuda"
    assert all(p.dtype == torch.float32 and p.is_cuda for g in eng.groups for p in g.trainable())
    assert (eng.precision.scaler is not None) == (precision == "fp16-mixed")
    b = batches(1, max_tasks=1)[0].to("cuda")
    losses = [eng.train_step(b)["loss"] for _ in range(20)]
    assert all(math.isfinite(x) for x in losses), losses
    assert sum(losses[-5:]) < sum(losses[:5]), losses


def test_fp16_overflow_is_skipped_by_the_scaler_on_cuda(make_engine, batches):
    eng = cuda_engine(make_engine, precision="fp16-mixed", **{"plugins.loss.name": "faulty_plugins:OverflowLoss",
                                                               "plugins.loss.overflow_steps": [1]})
    for b in batches(3):
        eng.train_step(b.to("cuda"))
    assert eng.precision.scaler_skipped >= 1


def test_nccl_all_reduce_in_a_one_process_group():
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        assert t.sum().item() == 4
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_two_gpus_with_nccl(tmp_path):
    sets = [a for k, v in {**TINY, "device": "cuda", "max_batches": 4}.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "arcfw", "run",
           str(REPO / "configs/default.yaml"), "--out", str(tmp_path / "run"), "-q", *sets]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()
