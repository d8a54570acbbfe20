"""Checkpoints: exact resume, atomic saves under SIGKILL, graceful SIGINT/SIGTERM, safe loading.

Bad checkpoint files and other bad inputs through the CLI are in test_bad_inputs.py.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core import io as fileio
from arcfw.core.commands.cli import main
from arcfw.core.config import load_config
from arcfw.core.engine.context import Context
from arcfw.core.errors import CheckpointError
from arcfw.core.training import checkpoint
from arcfw.core.training.trainer import Trainer

#: tiny data (3 tasks = 12 demonstration pairs, so an epoch is 12 batches), 4 epochs
RESUME = {**TINY, "epochs": 4, "checkpoint.every": None}
#: logs a draw of the global python, numpy and torch RNGs at every step
DRAWS = [{"name": "helper_plugins:RandomDraws"}]


def config(**overrides):
    return load_config(REPO / "configs" / "default.yaml", {**RESUME, **{k.replace("__", "."): v for k, v in overrides.items()}})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summaries(out: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "seconds"} for s in json.loads((out / "summary.json").read_text())]


def checkpoint_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / checkpoint.DIR).iterdir() if p.is_dir() and not p.name.startswith("."))


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every module weight, the RL policy's own weights and the main optimizer's moments."""
    eng = trainer.engine
    out = {f"{g.name}.{i}.{k}": v for g in eng.groups for i, m in enumerate(g.modules) for k, v in m.state_dict().items()}
    policy = eng.plugins["rl_policy"]
    out.update({f"policy.{k}": v for k, v in policy.mu.state_dict().items()})
    out["policy.log_std"] = policy.log_std.detach()
    for i, s in eng.optimizer.state_dict()["state"].items():
        out.update({f"adam.{i}.{k}": v for k, v in s.items()})
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run of 40 batches that also saves every 7 batches and keeps 2 checkpoints."""
    out = tmp_path_factory.mktemp("ref") / "run"
    trainer = Trainer(config(max_batches=40, checkpoint__every=7, checkpoint__keep=2, plugins__extra=DRAWS), out, quiet=True)
    trainer.fit()
    return out, trainer


# ----------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("split", [20, 24], ids=["mid-epoch", "epoch-boundary"])
def test_stopped_and_resumed_run_is_the_same_run(reference, tmp_path, split):
    ref_out, ref = reference
    out = tmp_path / "run"
    Trainer(config(max_batches=split, plugins__extra=DRAWS), out, quiet=True).fit()
    assert open(out / checkpoint.DIR / checkpoint.LATEST).read().strip() == f"step-{split:08d}"
    resumed = Trainer(config(max_batches=40, plugins__extra=DRAWS), out, quiet=True, resume=out)
    assert (resumed.start_epoch, resumed.start_batch) == divmod(split, 12)
    resumed.fit()

    got, want = records(out), records(ref_out)
    assert [r["step"] for r in got] == list(range(1, 41))  # nothing duplicated, nothing missing
    assert got[split:] == want[split:]  # batches split+1..40: every logged value identical
    assert got == want
    assert summaries(out) == summaries(ref_out)  # the epoch cut by the stop is summarised once, whole
    a, b = weights(resumed), weights(ref)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert resumed.engine.plugins["rl_policy"].baseline == ref.engine.plugins["rl_policy"].baseline
    # the health checks' memory (recent losses, streaks, warnings raised) continues too
    for part in ("health", "grad_watch", "guard"):
        assert getattr(resumed.engine, part).state_dict() == getattr(ref.engine, part).state_dict(), part
    assert len(resumed.engine.health.losses) == 40


def test_fp16_gradscaler_state_resumes(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "run"
    straight = Trainer(config(max_batches=10, precision="fp16-mixed"), ref, quiet=True)
    straight.fit()
    Trainer(config(max_batches=5, precision="fp16-mixed"), out, quiet=True).fit()
    resumed = Trainer(config(max_batches=10, precision="fp16-mixed"), out, quiet=True, resume=out)
    resumed.fit()
    scaler = straight.engine.precision.state_dict()
    assert scaler["scaler"]["scale"] < 65536.0 and scaler["scaler_skipped"] > 0  # the scale moved: restoring it matters
    assert resumed.engine.precision.state_dict() == scaler
    assert records(out) == records(ref)


def test_keep_the_last_n_checkpoints(reference):
    out, _ = reference
    # saves at 7, 12 (epoch end), 14, 21, 24, 28, 35, 36, 40 (max_batches): the last two stay
    assert checkpoint_dirs(out) == ["step-00000036", "step-00000040"]
    assert (out / checkpoint.DIR / checkpoint.LATEST).read_text().strip() == "step-00000040"
    ckpt = checkpoint.read(out / checkpoint.DIR / "step-00000040")
    assert (ckpt.meta["step"], ckpt.meta["epoch"], ckpt.meta["batch"]) == (40, 3, 4)
    assert ckpt.meta["plugins"] == {"qwen": "prompt", "rl_policy": "refine", "grid_transformer": "predictor", "efe_loss": "loss",
                                    "curriculum": "curriculum", "helper_plugins:RandomDraws": "extra"}


def test_third_party_plugin_state_and_loose_parameters_are_saved(tmp_path):
    extra = {"plugins.extra": [{"name": "helper_plugins:StepCounter"}]}
    out = tmp_path / "run"
    first = Trainer(config(max_batches=5, **extra), out, quiet=True)
    first.fit()
    bias = first.engine.plugins["helper_plugins:StepCounter"].bias.detach().clone()
    assert bias.item() != 0.0  # it trained
    resumed = Trainer(config(max_batches=8, **extra), out, quiet=True, resume=out)
    assert torch.equal(resumed.engine.plugins["helper_plugins:StepCounter"].bias.detach(), bias)
    resumed.fit()
    assert [r["counter"] for r in records(out)] == [float(i) for i in range(1, 9)]


def test_a_checkpoint_copied_out_of_its_run_loads_for_evaluation_but_does_not_resume(reference, tmp_path):
    out, ref = reference
    kept = tmp_path / "best"
    shutil.copytree(out / checkpoint.DIR / "step-00000040", kept)
    fresh = Trainer(config(max_batches=40, plugins__extra=DRAWS), tmp_path / "unused", quiet=True).engine
    checkpoint.load_weights(fresh, kept)
    a, b = (dict(g.modules[0].state_dict()) for g in (ref.engine.groups[0], fresh.groups[0]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(ref.engine.plugins["rl_policy"].log_std, fresh.plugins["rl_policy"].log_std)
    with pytest.raises(CheckpointError, match="must sit in RUN/checkpoints/"):
        checkpoint.run_folder(kept)


def test_learning_rates_may_change_on_resume(tmp_path):
    out = tmp_path / "run"
    Trainer(config(max_batches=3), out, quiet=True).fit()
    resumed = Trainer(config(max_batches=4, optimizer__lr__agent=0.05, plugins__refine__lr=0.02), out, quiet=True, resume=out)
    lrs = {g["name"]: g["lr"] for g in resumed.engine.optimizer.param_groups}
    assert lrs["agent"] == 0.05 and lrs["qwen"] == RESUME.get("optimizer.lr.qwen", 3e-4)
    assert resumed.engine.optimizer.state_dict()["state"]  # the moments were restored, not reset
    assert all(g["lr"] == 0.02 for g in resumed.engine.plugins["rl_policy"].optimizer.param_groups)


def test_a_state_that_cannot_be_loaded_safely_is_refused_before_training(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:
        Trainer(config(max_batches=2, plugins__extra=[{"name": "helper_plugins:NumpyState"}]), out, quiet=True)
    msg = str(err.value)
    assert "helper_plugins:NumpyState" in msg and "numpy.ndarray" in msg and "'table'" in msg
    assert not out.exists()


# ----------------------------------------------------------------------------- signals


def test_sigint_saves_a_checkpoint_exits_130_and_resumes(tmp_path):
    out = tmp_path / "run"
    send = ["--set", 'plugins.extra=[{"name": "helper_plugins:SendSignal", "after_step": 3}]']
    base = ["run", str(REPO / "configs/default.yaml"), "--out", str(out), *sets(RESUME), *send, "-q"]
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    res = CliRunner().invoke(main, [*base, "--max-batches", "10"])
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    assert res.exit_code == 130, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGINT" in lines[0] and "step 3" in lines[0] and f"--resume {out}" in lines[0], lines
    assert checkpoint_dirs(out) == ["step-00000003"] and [r["step"] for r in records(out)] == [1, 2, 3]
    # the printed command resumes as it stands: same config, same overrides (max_batches=10 among them)
    command = shlex.split(lines[0].split("Resume with: ", 1)[1])
    assert command[:3] == ["arcfw", "run", str(REPO / "configs/default.yaml")] and "max_batches=10" in command
    assert command[-2:] == ["--resume", str(out)] and "--out" not in command
    res = CliRunner().invoke(main, [*command[1:], "-q"])
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in records(out)] == list(range(1, 11))


def test_resume_command_under_torchrun_keeps_the_process_count(monkeypatch):
    from types import SimpleNamespace

    from arcfw.core.training.trainer import Trainer

    fake = SimpleNamespace(config=SimpleNamespace(source="my config.yaml"), overrides=["seed=3", "plugins.refine=null"],
                           out_dir=Path("runs/x"), dist=SimpleNamespace(world_size=4))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert Trainer.resume_command(fake) == (
        "torchrun --nproc-per-node 4 -m arcfw run 'my config.yaml' --set seed=3 --set plugins.refine=null --resume runs/x")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes of two
    assert Trainer.resume_command(fake).startswith("torchrun --nproc-per-node 2 [the run's --nnodes and rendezvous options] -m arcfw run")
    fake.dist.world_size = 1
    assert Trainer.resume_command(fake) == "arcfw run 'my config.yaml' --set seed=3 --set plugins.refine=null --resume runs/x"


def test_second_ctrl_c_aborts_at_once_without_saving(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(config(max_batches=10, checkpoint__every=1,
                             plugins__extra=[{"name": "helper_plugins:SendSignal", "after_step": 3, "times": 2}]), out, quiet=True)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is before
    assert checkpoint_dirs(out) == ["step-00000001", "step-00000002"]  # step 3 was abandoned, not half-saved
    assert not list((out / checkpoint.DIR).glob(".tmp-*"))


def sets(overrides: dict) -> list[str]:
    out = []
    for k, v in overrides.items():
        out += ["--set", f"{k}={json.dumps(v)}"]
    return out


def cli_command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "arcfw", "run", str(REPO / "configs/default.yaml"), "--out", str(out), "-q", *sets(RESUME), *extra]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.returncode} {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def test_sigterm_from_outside_saves_exits_143_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli_command(out, "--set", "epochs=1000"), stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("arcfw: interrupted: SIGTERM: stopped after step") and "--resume" in lines[0]
    steps = [r["step"] for r in records(out)]
    latest = checkpoint.read(checkpoint.locate(out))
    assert latest.step == steps[-1] and steps == list(range(1, steps[-1] + 1))  # the step in flight was finished and saved
    resumed = Trainer(config(max_batches=latest.step + 2, epochs=1000), out, quiet=True, resume=out)
    resumed.fit()
    assert [r["step"] for r in records(out)] == list(range(1, latest.step + 3))


# ----------------------------------------------------------------------------- atomic saves

#: Runs the CLI with arcfw.core.io.fsync_path replaced: at its N-th call on a path ending in SUFFIX it writes
#: a marker file and waits, so the test can SIGKILL the process at that exact point of a save.
BLOCKING_RUN = """
import os, sys, time
from arcfw.core import io
suffix, nth = os.environ["BLOCK_AT"].rsplit(":", 1)
real, seen = io.fsync_path, [0]
def fsync(path):
    if str(path).endswith(suffix):
        seen[0] += 1
        if seen[0] == int(nth):
            open(os.environ["MARKER"], "w").close()
            time.sleep(600)
    real(path)
io.fsync_path = fsync
from arcfw.core.commands.cli import main
sys.argv = ["arcfw", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize(
    "block_at, left_behind, temporary",
    [
        ("state.pt:2", ["step-00000001"], 1),  # second save: files half written in the temporary folder
        ("checkpoints:3", ["step-00000001", "step-00000002"], 0),  # second save renamed, `latest` not yet replaced
    ],
    ids=["while-writing-files", "before-latest-is-updated"],
)
def test_sigkill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, block_at, left_behind, temporary):
    out, marker = tmp_path / "run", tmp_path / "blocked"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLOCK_AT": block_at, "MARKER": str(marker)}
    cmd = cli_command(out, "--max-batches", "6", "--set", "checkpoint.every=1")
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_RUN, *cmd[3:]], stderr=subprocess.PIPE, text=True, env=env)
    wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    assert checkpoint_dirs(out) == left_behind
    assert len(list((out / checkpoint.DIR).glob(".tmp-step-00000002-*"))) == temporary
    folder = checkpoint.locate(out)
    assert folder.name == "step-00000001"
    assert checkpoint.read(folder).step == 1  # every file there and its checksum intact
    resumed = Trainer(config(max_batches=4), out, quiet=True, resume=out)
    resumed.fit()
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4]
    # the abandoned step 2 (if it got renamed) and the temporary folder are gone; 4 saved at max_batches
    assert checkpoint_dirs(out) == ["step-00000001", "step-00000004"] and not list((out / checkpoint.DIR).glob(".tmp-*"))


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = fileio.fsync_path, []

    def full(path: Path) -> None:
        if path.name == checkpoint.STATE:
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path)

    monkeypatch.setattr(fileio, "fsync_path", full)
    trainer = Trainer(config(max_batches=6, checkpoint__every=2), out, quiet=True)
    with pytest.raises(CheckpointError) as err:
        trainer.fit()
    msg = str(err.value)
    assert "step-00000004" in msg and "No space left on device" in msg and "step-00000002 is intact" in msg
    assert checkpoint_dirs(out) == ["step-00000002"] and not list((out / checkpoint.DIR).glob(".tmp-*"))
    assert checkpoint.read(checkpoint.locate(out)).step == 2


# ----------------------------------------------------------------------------- safe loading


def test_config_difference_is_named(tmp_path):
    out = tmp_path / "run"
    Trainer(config(max_batches=2), out, quiet=True).fit()
    with pytest.raises(CheckpointError) as err:
        Trainer(config(max_batches=4, plugins__prompt__hidden_size=64, seed=1), out, quiet=True, resume=out)
    msg = str(err.value)
    assert "plugins.prompt.hidden_size (checkpoint: 32, now: 64)" in msg and "seed (checkpoint: 0, now: 1)" in msg
    assert "max_batches (checkpoint" not in msg  # a changed max_batches is fine


def test_trust_remote_code_is_off_unless_the_config_turns_it_on(tmp_path, monkeypatch):
    import transformers

    from arcfw.plugins.qwen import QwenPrompt

    seen: list[tuple[str, object]] = []

    class Stop(Exception):
        pass

    def tokenizer(path, **kw):
        seen.append(("tokenizer", kw.get("trust_remote_code")))
        return object()

    def model(path, **kw):
        seen.append(("model", kw.get("trust_remote_code")))
        raise Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", model)
    default = load_config(REPO / "configs" / "default.yaml", {"plugins.prompt.pretrained": str(tmp_path)})
    for plugin, expected in ((default.plugins[0].build(), False), (QwenPrompt(pretrained=str(tmp_path), trust_remote_code=True), True)):
        seen.clear()
        with pytest.raises(Stop):
            plugin.configure(Context(device=torch.device("cpu")))
        assert seen == [("tokenizer", expected), ("model", expected)]
