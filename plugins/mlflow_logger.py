"""MLflow logger: every logged record to an MLflow run (``pip install 'arcfw[mlflow]'``).

The JSONL log (``OUT/metrics.jsonl``) is always written by the trainer; this plugin
sends the same records to MLflow::

    plugins:
      extra:
        - name: mlflow
          tracking_uri: sqlite:///mlflow.db   # default: MLflow's own (MLFLOW_TRACKING_URI)
          experiment: arc

Batch records go under ``batch/<key>``, epoch summaries under ``epoch/<key>``, gradient
norms per group under ``batch/grad_norms/<group>``, validation metrics as they are
(``val/loss``), each at the optimizer step; a character MLflow does not allow in a
metric name becomes ``_`` (``val/pass@2`` is ``val/pass_at_2``).  Non-finite values are
left out.  The resolved config (``OUT/config.yaml``) is logged as the run's parameters
(dotted keys).  Only rank 0 logs; ``on_train_end`` ends the MLflow run as FINISHED,
KILLED (stopped) or FAILED.  A resumed run continues the same MLflow run (its id is kept
in ``OUT/mlflow-run-id``); MLflow keeps every value it is sent, so a step the stopped run
logged after its checkpoint has two values there.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.errors import MissingExtra, PluginError
from arcfw.core.training.records import finite, scalars

RUN_ID_FILE = "mlflow-run-id"
STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}
MAX_PARAM_VALUE = 6000  # MLflow's limit on a parameter's value


def _import_mlflow() -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise MissingExtra(f"plugin 'mlflow' needs the mlflow package ({exc}): pip install 'arcfw[mlflow]'") from None
    return MlflowClient


def metric_name(tag: str) -> str:
    """``tag`` as MLflow allows a metric name (alphanumerics, ``_ - . : /`` and spaces)."""
    return re.sub(r"[^\w\-. :/]", "_", tag.replace("@", "_at_"))


def flat_params(config: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as ``{"a.b": "value"}`` (lists as their YAML-like text), values cut to MLflow's limit."""
    out: dict[str, str] = {}
    if isinstance(config, dict):
        for k, v in config.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): str(config)[:MAX_PARAM_VALUE]}


class MlflowLogger(Plugin):
    """Sends every logged record to an MLflow run.

    Parameters (YAML):

    - ``tracking_uri``: where MLflow keeps runs (``sqlite:///mlflow.db``, ``http://host:5000``, ...; default: MLflow's own, which ``MLFLOW_TRACKING_URI`` sets).
    - ``experiment``: the MLflow experiment (created when missing).
    - ``run_name``: the MLflow run's name (default: the run folder's name).
    - ``tags``: tags of the MLflow run (``{key: value}``).
    - ``log_config``: log the resolved config as the run's parameters.
    """

    name = "mlflow"
    role = "extra"
    description = "MLflow logger (optional extra 'mlflow'): batch and epoch records as metrics, the resolved config as parameters"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "arcfw", run_name: str | None = None,
                 tags: dict[str, str] = {}, log_config: bool = True):  # noqa: B006 (copied, never mutated)
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.tags, self.log_config = {str(k): str(v) for k, v in tags.items()}, log_config
        self.client: Any = None
        self.run_id: str | None = None

    @hookimpl
    def configure(self, ctx):
        _import_mlflow()  # a missing package is said at start-up, not at the first record
        if ctx.out_dir is None:
            raise PluginError("plugin 'mlflow': the run has no output folder (the MLflow run id is kept there)")

    def _open(self, ctx) -> None:
        """The MLflow run, started at the first record (nothing is created before the run starts)."""
        import yaml

        client = _import_mlflow()(tracking_uri=self.tracking_uri)
        out = Path(ctx.out_dir)
        id_file = out / RUN_ID_FILE
        if ctx.resumed_step is not None and id_file.is_file():
            self.run_id = id_file.read_text().strip()
            client.update_run(self.run_id, status="RUNNING")
        else:
            exp = client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(self.experiment)
            run = client.create_run(exp_id, run_name=self.run_name or out.name, tags={"arcfw.out": str(out.resolve()), **self.tags})
            self.run_id = run.info.run_id
            id_file.write_text(f"{self.run_id}\n")
            config_file = out / "config.yaml"
            if self.log_config and config_file.is_file():
                from mlflow.entities import Param

                params = [Param(k, v) for k, v in flat_params(yaml.safe_load(config_file.read_text())).items()]
                for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                    client.log_batch(self.run_id, params=params[i : i + 100])
        self.client = client

    @hookimpl
    def log_metrics(self, record, ctx):
        if ctx.rank != 0:
            return
        if self.client is None:
            self._open(ctx)
        from mlflow.entities import Metric

        step, stamp = int(record.get("step", 0)), int(time.time() * 1000)
        metrics = [Metric(metric_name(k), v, stamp, step) for k, v in finite(scalars(record)).items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    @hookimpl
    def on_train_end(self, status, ctx):
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))
            self.client = None
