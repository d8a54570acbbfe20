"""The W&B and MLflow logger plugins (extras `wandb`, `mlflow`), in their offline modes: W&B with
WANDB_MODE=offline writing under the run folder, MLflow with a file: tracking URI in a temporary folder.
Without the package, selecting the plugin is one line naming the extra, exit 2; the logging tests are
skipped where the package is not installed (CI installs neither)."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import REPO, TINY

from arcfw.core.commands.cli import main
from arcfw.core.errors import Interrupted, MissingExtra
from arcfw.core.training.records import scalars
from arcfw.core.training.trainer import Trainer


def jsonl(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]


def test_scalars_of_a_record():
    rec = {"kind": "batch", "step": 3, "loss": 1.5, "reward": "nan", "grad_norms": {"qwen": 0.5}, "warnings": ["x"], "ok": True,
           "val/pass@2": 0.5}
    out = scalars(rec)
    assert out.keys() == {"batch/loss", "batch/reward", "batch/grad_norms/qwen", "val/pass@2"} and out["batch/loss"] == 1.5
    assert scalars({"kind": "epoch", "step": 9, "avg_loss": 2}) == {"epoch/avg_loss": 2.0}


@pytest.mark.parametrize("plugin,modules", [("wandb", ["wandb"]), ("mlflow", ["mlflow", "mlflow.tracking"])])
def test_a_missing_package_names_the_extra(plugin, modules, tiny_config, tmp_path, monkeypatch):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)  # import fails as if not installed
    with pytest.raises(MissingExtra, match=rf"plugin '{plugin}' needs the {plugin} package .*pip install 'arcfw\[{plugin}\]'"):
        Trainer(tiny_config({"plugins.extra": [{"name": plugin}], "max_batches": 1}), tmp_path / "run", quiet=True)
    res = CliRunner().invoke(main, ["run", str(REPO / "configs/default.yaml"), "--out", str(tmp_path / "cli"), *sets(TINY),
                                    "--set", f'plugins.extra=[{{"name": "{plugin}"}}]'])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1, res.output
    assert res.stderr.startswith(f"arcfw: missing dependency: plugin '{plugin}' needs the {plugin} package") and f"arcfw[{plugin}]" in res.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "cli").exists()


# --------------------------------------------------------------------------- W&B, offline


def wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then a leveldb-style log
    (32 KiB blocks; each chunk: crc32, length, type full/first/middle/last) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunk, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        length, kind = struct.unpack_from("<HB", data, pos + 4) if left >= 7 else (0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # the block's padding
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def wandb_run(run_dir: Path, index: int = -1):
    """(run record, history rows by step, exit code) of the W&B offline run number ``index`` under ``run_dir/wandb``."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    for _ in range(300):  # W&B's service process may still be writing the file when finish() returned (bounded wait)
        records = wandb_records(files[index])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    rows: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            rows.setdefault(int(row["_step"]), {}).update(row)
    exit_code = next((r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"), None)
    return run, rows, exit_code, len(files)


@pytest.fixture
def wandb_offline(monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)


def test_wandb_offline_logs_what_the_jsonl_log_holds_under_the_run_folder(wandb_offline, tiny_config, tmp_path):
    run_dir = tmp_path / "exp"
    Trainer(tiny_config({"plugins.extra": [{"name": "wandb", "project": "arc-test", "tags": ["tiny"]}], "max_batches": 3}),
            run_dir, quiet=True).fit()
    run, rows, exit_code, _ = wandb_run(run_dir)
    assert run.project == "arc-test" and run.display_name == "exp" and list(run.tags) == ["tiny"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["batch_size"] == 1 and config["plugins"]["extra"][0]["name"] == "wandb"  # the resolved config
    records = jsonl(run_dir)
    assert sorted(rows) == [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert rows[r["step"]]["batch/loss"] == pytest.approx(r["loss"]) and rows[r["step"]]["batch/cell_acc"] == pytest.approx(r["cell_acc"])
        assert rows[r["step"]]["batch/grad_norms/agent"] == pytest.approx(r["grad_norms"]["agent"])
    summary = json.loads((run_dir / "summary.json").read_text())[0]
    assert rows[3]["epoch/avg_loss"] == pytest.approx(summary["avg_loss"])  # the epoch record at its last step
    assert exit_code == 0  # on_train_end finished the W&B run
    assert (run_dir / "wandb" / "arcfw-run-id").read_text().strip() == run.run_id


def test_wandb_resumed_run_continues_the_same_wandb_run(wandb_offline, tiny_config, tmp_path):
    cfg = {"plugins.extra": [{"name": "wandb"}], "max_batches": 6, "checkpoint.every": 3}
    Trainer(tiny_config(cfg), tmp_path, quiet=True).fit()
    first, rows, _, _ = wandb_run(tmp_path)
    time.sleep(1.1)  # W&B names an offline run's folder by the second it started in: two runs in one second share it
    Trainer(tiny_config(cfg), tmp_path, quiet=True, resume=tmp_path / "checkpoints" / "step-00000003").fit()
    again, resumed_rows, exit_code, runs = wandb_run(tmp_path)
    assert runs == 2 and again.run_id == first.run_id and exit_code == 0
    assert sorted(resumed_rows) == [4, 5, 6]  # offline, W&B starts its step count afresh: the resumed steps are logged again
    batches = [r for r in jsonl(tmp_path) if r["kind"] == "batch"]
    assert [resumed_rows[s]["batch/loss"] for s in (4, 5, 6)] == pytest.approx([r["loss"] for r in batches[3:]])


# --------------------------------------------------------------------------- MLflow, file: store in tmp


@pytest.fixture
def mlflow_store(monkeypatch, tmp_path):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    uri = f"file:{tmp_path / 'mlruns'}"
    from mlflow.tracking import MlflowClient

    return uri, MlflowClient(tracking_uri=uri)


def history(client, run_id, key):
    """``{step: value}`` of a metric (a step logged twice keeps its later value)."""
    return dict(sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)))


def test_mlflow_file_store_holds_what_the_jsonl_log_holds(mlflow_store, tiny_config, tmp_path):
    uri, client = mlflow_store
    run_dir = tmp_path / "exp"
    plugin = {"name": "mlflow", "tracking_uri": uri, "experiment": "arc-test", "tags": {"who": "test"}}
    Trainer(tiny_config({"plugins.extra": [plugin], "max_batches": 3}), run_dir, quiet=True).fit()
    run_id = (run_dir / "mlflow-run-id").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "exp" and run.data.tags["who"] == "test"
    assert client.get_experiment(run.info.experiment_id).name == "arc-test"
    assert run.data.params["batch_size"] == "1" and run.data.params["plugins.extra"].startswith("[{'name': 'mlflow'")
    records = jsonl(run_dir)
    assert history(client, run_id, "batch/loss") == pytest.approx({r["step"]: r["loss"] for r in records})
    assert history(client, run_id, "batch/grad_norms/agent") == pytest.approx({r["step"]: r["grad_norms"]["agent"] for r in records})
    summary = json.loads((run_dir / "summary.json").read_text())[0]
    assert history(client, run_id, "epoch/avg_loss") == pytest.approx({3: summary["avg_loss"]})


def test_mlflow_resume_continues_the_run_and_a_stop_ends_it_killed(mlflow_store, tiny_config, tmp_path):
    uri, client = mlflow_store
    stop = {"name": "helper_plugins:SendSignal", "after_step": 4}
    cfg = {"plugins.extra": [{"name": "mlflow", "tracking_uri": uri}, stop], "max_batches": 6}
    with pytest.raises(Interrupted):
        Trainer(tiny_config(cfg), tmp_path, quiet=True).fit()
    run_id = (tmp_path / "mlflow-run-id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    assert list(history(client, run_id, "batch/loss")) == [1, 2, 3, 4]
    Trainer(tiny_config(cfg), tmp_path, quiet=True, resume=tmp_path).fit()
    assert (tmp_path / "mlflow-run-id").read_text().strip() == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert list(history(client, run_id, "batch/loss")) == [1, 2, 3, 4, 5, 6]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_mlflow_metric_names_follow_its_rules():
    from arcfw.plugins.mlflow_logger import flat_params, metric_name

    assert metric_name("val/pass@2") == "val/pass_at_2" and metric_name("batch/grad_norms/qwen") == "batch/grad_norms/qwen"
    assert metric_name("a#b") == "a_b"
    assert flat_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
