"""CSV logger: every logged record as a row, for spreadsheets and pandas.

The JSONL log (``OUT/metrics.jsonl``) is always written by the trainer; this
plugin adds two CSV files next to it::

    plugins:
      extra:
        - name: csv          # writes OUT/metrics.csv (batches) and OUT/epochs.csv (epoch summaries)

One column per value, nested ones flattened (``grad_norms/qwen``); a value a
record lacks is an empty cell.  A key first seen after the header was written
adds a column (the file is rewritten once with the wider header).  Only rank 0
writes; rows are flushed as they come, and ``on_train_end`` closes the files.
A resumed run drops the rows the stopped run logged after its checkpoint, and a
fresh run starts the files anew.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import IO, Any

from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.errors import PluginError

FILES = {"batch": "metrics.csv", "epoch": "epochs.csv"}


def flatten(record: dict[str, Any]) -> dict[str, Any]:
    """``{"grad_norms": {"qwen": 1.0}}`` -> ``{"grad_norms/qwen": 1.0}``; ``kind`` is left out (one file per kind)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "kind":
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}/{sub}"] = v
        else:
            out[key] = value
    return out


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # nan, inf, -inf: as float() reads them back
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)  # an epoch's warnings
    return value


class _Table:
    """One CSV file whose header grows when a record brings a new key."""

    def __init__(self, path: Path, resumed_step: int | None):
        self.path = path
        self.columns: list[str] = []
        rows: list[dict[str, str]] = []
        if resumed_step is not None and path.is_file():  # keep what the checkpoint's run had logged
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) <= resumed_step]
        self.file: IO[str] | None = None
        self._rewrite(rows)

    def _rewrite(self, rows: list[dict[str, Any]]) -> None:
        if self.file is not None:
            self.file.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, restval="")
        if self.columns:
            self.writer.writeheader()
            self.writer.writerows(rows)
        self.file.flush()

    def add(self, row: dict[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            self.close()
            old: list[dict[str, str]] = []
            if self.columns and self.path.is_file():
                with self.path.open(newline="") as f:
                    old = list(csv.DictReader(f))
            self.columns += new
            self._rewrite(old)
        assert self.file is not None
        self.writer.writerow({k: _cell(v) for k, v in row.items()})
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class CsvLogger(Plugin):
    """Writes batch records to ``metrics.csv`` and epoch summaries to ``epochs.csv``.

    Parameters (YAML):

    - ``log_dir``: folder of the two files (default: the run folder ``OUT``).
    """

    name = "csv"
    role = "extra"
    description = "CSV logger: batch records to OUT/metrics.csv, epoch summaries to OUT/epochs.csv"

    def __init__(self, log_dir: str | None = None):
        self.log_dir = log_dir
        self.tables: dict[str, _Table] = {}

    @hookimpl
    def configure(self, ctx):
        if self.log_dir is None and ctx.out_dir is None:
            raise PluginError("plugin 'csv': no log_dir given and the run has no output folder")

    def _table(self, kind: str, ctx) -> _Table:
        if kind not in self.tables:  # opened at the first record: nothing is created before the run starts
            folder = Path(self.log_dir) if self.log_dir is not None else Path(ctx.out_dir)
            self.tables[kind] = _Table(folder / FILES.get(kind, f"{kind}.csv"), ctx.resumed_step)
        return self.tables[kind]

    @hookimpl
    def log_metrics(self, record, ctx):
        if ctx.rank != 0:
            return
        self._table(str(record.get("kind", "batch")), ctx).add(flatten(record))

    @hookimpl
    def on_train_end(self, status, ctx):
        for table in self.tables.values():
            table.close()
        self.tables = {}
