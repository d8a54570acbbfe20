"""What a run does when the disk fills, when a second process wants its folder, and when there is
nothing to resume (docs/checkpoints.md: "Disk full", "One run per folder", "Resuming").

A full disk is simulated in-process at the level of the OS (the low-level write of
arcfw.core.io raises ENOSPC part-way through, as the kernel does; safetensors' writer raises the
error it raises on a full disk), and for real in a small tmpfs mounted in a user namespace where
the machine allows one.  The lock is tested against a real second process.
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
from click.testing import CliRunner, Result
from conftest import REPO, TESTS, TINY
from safetensors import SafetensorError

from arcfw.core import io as fileio
from arcfw.core.commands.cli import main
from arcfw.core.training import checkpoint
from arcfw.core.training.runlock import LOCK

DEFAULT = str(REPO / "configs" / "default.yaml")
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
#: what safetensors' Rust writer raises when the disk fills (seen on a full tmpfs, safetensors 0.8)
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def run_args(out: Path, *extra: str, **overrides) -> list[str]:
    cfg = {**TINY, "checkpoint.every": 2, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return ["run", DEFAULT, "--out", str(out), "-q", *sets(cfg), *extra]


def arcfw(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def one_line(res: Result, code: int = 2) -> str:
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def resume_from_message(line: str) -> Result:
    """Run the command the message says to resume with (the disk has room again)."""
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "arcfw"
    return arcfw(*command[1:], "-q")


def checkpoint_dirs(out: Path) -> list[str]:
    return sorted(p.name for p in (out / checkpoint.DIR).iterdir() if p.is_dir())


def fail_after(real, nth: int, keep: int = 16):
    """``real`` (a write function taking (target, data)) that, at its ``nth`` call, writes the first
    ``keep`` bytes and then raises ENOSPC, as a write into a disk that fills part-way does."""
    calls = [0]

    def write(target, data):
        calls[0] += 1
        if calls[0] == nth:
            real(target, bytes(data[:keep]))
            raise ENOSPC
        real(target, data)

    return write


class FillingFile:
    """A file whose writes fail with ENOSPC after ``room`` bytes (the disk fills while it is written)."""

    def __init__(self, path: Path, room: int):
        self.f, self.room = open(path, "wb"), room  # noqa: SIM115 - closed in close()

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[: self.room])
            self.room = 0
            raise ENOSPC
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


# ----------------------------------------------------------------------------- a full disk


@pytest.mark.parametrize("file", ["modules", "state.pt", "meta.json", "latest"])
def test_disk_full_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, file):
    """The second save (step 4) meets a full disk while writing one of its files: one line naming the
    checkpoint, the file and "disk full"; the step-2 checkpoint stays `latest` and loads; the command
    the line gives resumes the run once there is room."""
    out = tmp_path / "run"
    if file == "modules":  # safetensors writes in Rust: its own error type, the OS error in its text
        real, calls = checkpoint.save_model, [0]

        def save_model(module, filename, *args, **kw):
            calls[0] += 1
            if calls[0] == 3:  # the second save's first module file (2 modules a save)
                Path(filename).write_bytes(b"\0" * 16)
                raise SafetensorError(SAFETENSORS_FULL)
            return real(module, filename, *args, **kw)

        monkeypatch.setattr(checkpoint, "save_model", save_model)
    elif file == "state.pt":  # torch.save's zip writer: a RuntimeError raised while handling the OSError
        real_create, saves = fileio.create, [0]

        def create(path):
            if Path(path).name == checkpoint.STATE:
                saves[0] += 1
                if saves[0] == 2:
                    return FillingFile(path, room=1000)
            return real_create(path)

        monkeypatch.setattr(fileio, "create", create)
    else:
        name = {"meta.json": checkpoint.META, "latest": checkpoint.LATEST + ".tmp"}[file]
        real_write, seen = fileio.write_bytes, [0]

        def write_bytes(path, data):
            if Path(path).name == name:
                seen[0] += 1
                if seen[0] == 2:
                    real_write(path, data[:5])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write(path, data)

        monkeypatch.setattr(fileio, "write_bytes", write_bytes)

    line = one_line(arcfw(*run_args(out, "--max-batches", "6")))
    named = {"modules": "modules/0-", "state.pt": "(state.pt)", "meta.json": "(meta.json)", "latest": "latest"}[file]
    assert line.startswith("arcfw: checkpoint error: cannot write checkpoint") or line.startswith("arcfw: write error: cannot write"), line
    assert named in line and "disk full (No space left on device)" in line, line
    assert "step-00000002 is intact" in line and "resume with: arcfw run" in line, line
    assert checkpoint_dirs(out) == ["step-00000002"]  # nothing of the failed save is left
    assert not list((out / checkpoint.DIR).glob("latest.tmp"))
    assert checkpoint.read(checkpoint.locate(out)).step == 2  # every file there, every checksum right
    monkeypatch.undo()
    res = resume_from_message(line)
    assert res.exit_code == 0, res.output
    assert steps(out) == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_appending_a_metrics_record(tmp_path, monkeypatch):
    """The record of step 5 is torn by a full disk: one line naming metrics.jsonl, the step, "disk full"
    and the checkpoint to resume from; the resumed run drops the torn line and logs every step once."""
    out = tmp_path / "run"
    real, records = fileio.append, [0]

    def append(fd, data):
        records[0] += 1
        if records[0] == 5:
            real(fd, data[:20])  # the kernel wrote part of it, then the disk was full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, data)

    monkeypatch.setattr(fileio, "append", append)
    line = one_line(arcfw(*run_args(out, "--max-batches", "6")))
    assert line.startswith(f"arcfw: write error: cannot write {out / 'metrics.jsonl'} (the record of step 5): "
                           "disk full (No space left on device)"), line
    assert "the last checkpoint step-00000004 is intact" in line and "resume with:" in line, line
    monkeypatch.undo()
    res = resume_from_message(line)
    assert res.exit_code == 0, res.output
    assert steps(out) == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_writing_the_summary_keeps_the_previous_one(tmp_path, monkeypatch):
    """Epoch 1's summary cannot be written: summary.json still holds epoch 0's, whole; no temporary file."""
    out = tmp_path / "run"
    real, seen = fileio.write_bytes, [0]

    def write_bytes(path, data):
        if Path(path).name == "summary.json.tmp":
            seen[0] += 1
            if seen[0] == 2:
                real(path, data[:10])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(fileio, "write_bytes", write_bytes)
    line = one_line(arcfw(*run_args(out, epochs=2, checkpoint__every=None, data__max_tasks=1)))
    assert f"cannot write {out / 'summary.json'} (the summary of epoch 1): disk full" in line, line
    assert "the previous version of the file is unchanged" in line and "resume with:" in line, line
    assert [s["epoch"] for s in json.loads((out / "summary.json").read_text())] == [0]
    assert not (out / "summary.json.tmp").exists()


def test_disk_full_while_writing_eval_results(tmp_path, monkeypatch):
    run, results = tmp_path / "run", tmp_path / "eval"
    assert arcfw(*run_args(run, "--max-batches", "1")).exit_code == 0
    monkeypatch.setattr(fileio, "write_bytes", fail_after(fileio.write_bytes, 1, keep=3))
    line = one_line(arcfw("eval", DEFAULT, "--checkpoint", str(run), "--max-tasks", "1", "--no-prompt-ablation",
                          "--out", str(results), "-q", *sets(TINY)))
    assert line.startswith(f"arcfw: write error: cannot write {results}/"), line
    assert "disk full (No space left on device)" in line
    assert not list(results.glob("*.tmp"))


def _user_namespaces() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    return probe.returncode == 0


#: Runs in a user and mount namespace: mounts a small tmpfs, trains into it while a plugin fills it,
#: then frees the space and resumes with the command the error line gives; writes what it saw as JSON.
FULL_DISK_RUN = r"""
import json, os, shlex, subprocess, sys
mnt, report, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", mnt], check=True)
arcfw = [sys.executable, "-m", "arcfw"]
run = os.path.join(mnt, "run")
first = subprocess.run(arcfw + args + ["--out", run], capture_output=True, text=True)
from arcfw.core.training import checkpoint
try:
    intact = checkpoint.read(checkpoint.locate(run)).step
except Exception as exc:
    intact = repr(exc)
leftovers = sorted(p for p in os.listdir(os.path.join(run, "checkpoints")) if p.startswith(".tmp") or p.endswith(".tmp"))
os.remove(os.path.join(mnt, "filler"))
line = first.stderr.strip().splitlines()[-1] if first.stderr.strip() else ""
second = None
if "resume with: " in line:
    command = shlex.split(line.split("resume with: ", 1)[1])
    second = subprocess.run(arcfw + command[1:] + ["-q"], capture_output=True, text=True)
steps = [json.loads(x)["step"] for x in open(os.path.join(run, "metrics.jsonl")).read().splitlines() if x.strip()]
json.dump({"rc": first.returncode, "stderr": first.stderr, "intact": intact, "leftovers": leftovers,
           "resumed_rc": None if second is None else second.returncode,
           "resumed_stderr": None if second is None else second.stderr, "steps": steps}, open(report, "w"))
"""


@pytest.mark.skipif(not _user_namespaces(), reason="needs unprivileged user namespaces (unshare -Urm) for a real tmpfs")
def test_a_real_full_disk_stops_the_run_with_one_line_and_it_resumes(tmp_path):
    """A real ENOSPC: the run trains in a 5 MiB tmpfs that a plugin fills after step 3 (checkpoints
    every 2 steps).  One line with "disk full", exit code 2; the step-2 checkpoint loads; once the
    filler is removed, the printed command resumes the run to its end."""
    mnt, report = tmp_path / "mnt", tmp_path / "report.json"
    mnt.mkdir()
    filler = [{"name": "durability_plugins:FillDisk", "at_step": 3, "path": str(mnt / "filler")}]
    args = ["run", DEFAULT, "-q", "--max-batches", "6", *sets({**TINY, "checkpoint.every": 2, "checkpoint.keep": 1,
                                                               "plugins.extra": filler})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", FULL_DISK_RUN,
                    str(mnt), str(report), json.dumps(args)], env=env, check=True, timeout=300)
    r = json.loads(report.read_text())
    lines = r["stderr"].strip().splitlines()
    assert r["rc"] == 2 and len(lines) == 1, r["stderr"]
    assert "disk full (No space left on device)" in lines[0] and str(mnt / "run") in lines[0], lines[0]
    assert "step-00000002 is intact" in lines[0] and "resume with:" in lines[0], lines[0]
    assert r["intact"] == 2 and r["leftovers"] == []
    assert r["resumed_rc"] == 0, r["resumed_stderr"]
    assert r["steps"] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------- one run per folder


def _start_paused(out: Path, marker: Path, release: Path, *extra: str, every: int | None = 1) -> subprocess.Popen:
    pause = [{"name": "durability_plugins:Pause", "at_step": 2, "marker": str(marker), "release": str(release)}]
    cmd = [sys.executable, "-m", "arcfw", *run_args(out, *extra, checkpoint__every=every, plugins__extra=pause)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)


def _wait(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.returncode} {proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.mark.parametrize("every", [1, None], ids=["with-a-checkpoint", "before-its-first-checkpoint"])
def test_a_live_run_folder_refuses_a_second_run_and_a_second_resume(tmp_path, every):
    """A real process trains in OUT (paused after step 2; a checkpoint of step 1 written, or none yet):
    a second run there (--overwrite) and a --resume of it are refused with one line naming the folder
    and the PID; the folder is left as it was; the first run then finishes normally."""
    out, marker, release = tmp_path / "run", tmp_path / "paused", tmp_path / "go-on"
    proc = _start_paused(out, marker, release, "--max-batches", "3", every=every)
    try:
        _wait(marker, proc)
        before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
        for args in (run_args(out, "--overwrite", "--max-batches", "2"),
                     ["run", str(out / "config.yaml"), "--resume", str(out), "-q"]):
            line = one_line(arcfw(*args))
            assert line.startswith(f"arcfw: run folder in use: run folder {out} is in use by process {proc.pid}"), line
            assert str(out / LOCK) in line
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
        release.touch()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    finally:
        proc.kill()
    assert steps(out) == [1, 2, 3]
    assert (out / LOCK).read_text() == ""  # released cleanly: nothing stale for the next run


def test_the_stale_lock_of_a_killed_run_is_taken_over_saying_so(tmp_path):
    out, marker, release = tmp_path / "run", tmp_path / "paused", tmp_path / "go-on"
    proc = _start_paused(out, marker, release, "--max-batches", "3")
    try:
        _wait(marker, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    release.touch()  # the resumed run passes the pausing step again: let it through
    assert f"pid={proc.pid}" in (out / LOCK).read_text()  # the file still names the dead holder
    res = CliRunner().invoke(main, ["run", str(out / "config.yaml"), "--resume", str(out), "--max-batches", "3"])
    assert res.exit_code == 0, res.output
    assert f"warning: took over the stale lock of run folder {out}: process {proc.pid}" in res.stderr
    assert steps(out) == [1, 2, 3]


def test_the_lock_is_held_for_the_run_and_released_after_it(tmp_path):
    """In one process: while fit() runs the folder is refused to another Trainer; after it ends (even
    by an error) it is free again."""
    from arcfw.core.config import load_config
    from arcfw.core.training.runlock import RunLock, RunLocked
    from arcfw.core.training.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_config(DEFAULT, {**TINY, "max_batches": 2, "checkpoint.every": None})
    trainer = Trainer(cfg, out, quiet=True)
    seen = []
    step = trainer.engine.train_step

    def probing_step(batch):
        with pytest.raises(RunLocked, match=f"in use by process {os.getpid()}"):
            RunLock(out).check()
        seen.append(1)
        return step(batch)

    trainer.engine.train_step = probing_step
    trainer.fit()
    assert seen == [1, 1]
    RunLock(out).check()  # free again
    assert RunLock(out).acquire() is None  # released cleanly: no stale-lock note


# ----------------------------------------------------------------------------- nothing to resume


def test_resume_of_a_run_that_stopped_before_its_first_checkpoint(tmp_path):
    """A run that crashed in step 3 with no checkpoint yet: --resume says there is nothing to resume
    and how to start again, and the fresh-run check says the same of that folder."""
    out = tmp_path / "run"
    crash = [{"name": "durability_plugins:Crash", "at_step": 3}]
    line = one_line(arcfw(*run_args(out, "--max-batches", "6", checkpoint__every=None, plugins__extra=crash)))
    assert "crashed on purpose" in line and steps(out) == [1, 2] and not (out / checkpoint.DIR / "latest").exists()

    line = one_line(arcfw("run", str(out / "config.yaml"), "--resume", str(out)))
    assert line == (f"arcfw: checkpoint error: {out}: no checkpoint here (checkpoints/latest is missing); the run in this "
                    f"folder stopped before its first checkpoint, so there is nothing to resume: start it again with "
                    f"--out {out} --overwrite")
    line = one_line(arcfw(*run_args(out, "--max-batches", "2")))
    assert line == (f"arcfw: config error: --out: out: {out} already holds a run that stopped before its first checkpoint "
                    "(nothing to resume); pass --overwrite to replace it or use another --out")
    res = arcfw(*run_args(out, "--max-batches", "2", "--overwrite"))  # what both messages advise
    assert res.exit_code == 0, res.output
    assert steps(out) == [1, 2]


def test_resume_of_a_folder_that_is_no_run(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line(arcfw("run", DEFAULT, "--resume", str(empty)))
    assert line == (f"arcfw: checkpoint error: {empty}: no checkpoint here (checkpoints/latest is missing); is this an "
                    f"arcfw run folder? (a fresh run there: arcfw run CONFIG --out {empty})")
