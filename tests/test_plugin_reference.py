"""docs/plugin-reference.md lists every field a plugin may read (issue 14 item 6): each table there is
equal to its dataclass, so a field added to the code and not to the page (or removed from the code and
not from the page) fails here."""

from __future__ import annotations

import dataclasses
import re

import pytest
from conftest import REPO

from arcfw.core.data.batch import Batch, Example, Pair
from arcfw.core.engine.context import Context, LossOutput, Metric, ParamGroup, StepResult, TaskEncoding, View
from arcfw.core.engine.metric_owners import ENGINE_KEYS
from arcfw.core.training.metrics import BATCH_KEYS

PAGE = REPO / "docs" / "plugin-reference.md"


def sections() -> dict[str, str]:
    """``## `Name` ...`` heading -> its text up to the next ``## `` heading (one heading may name several classes)."""
    text = PAGE.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {p.split("\n", 1)[0]: p.split("\n", 1)[1] for p in parts}


def table_names(text: str) -> list[list[str]]:
    """The first-column names (``| `name` |``) of each table in ``text``."""
    tables, current = [], []
    for line in text.splitlines():
        m = re.match(r"^\| `([\w.]+)` \|", line)
        if m:
            current.append(m.group(1))
        elif not line.startswith("|") and current:
            tables.append(current)
            current = []
    return tables + ([current] if current else [])


def properties(cls: type) -> set[str]:
    return {n for n, v in vars(cls).items() if isinstance(v, property)}


CLASSES = [Batch, Example, Pair, Context, StepResult, TaskEncoding, LossOutput, ParamGroup, View, Metric]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_field_is_documented_and_nothing_else(cls):
    found = [(head, names) for head, body in sections().items() if f"`{cls.__name__}`" in head for names in table_names(body)]
    fields = [f.name for f in dataclasses.fields(cls)]
    tables = [names for _, names in found if set(fields) & set(names)]
    assert len(tables) == 1, f"docs/plugin-reference.md: no table (or several) for {cls.__name__}: {found}"
    documented = tables[0]
    missing = [f for f in fields if f not in documented]
    assert not missing, f"docs/plugin-reference.md: {cls.__name__} fields not documented: {missing}"
    unknown = [n for n in documented if n not in fields and n not in properties(cls)]
    assert not unknown, f"docs/plugin-reference.md: {cls.__name__} has no field {unknown}"
    assert [n for n in documented if n in fields] == fields, "the page lists the fields in the dataclass's order"


def test_the_records_a_logger_receives_are_documented(tiny_config, tmp_path):
    """The fixed keys of a real run's batch and epoch records are the page's."""
    import json

    from arcfw.core.training.trainer import Trainer

    summaries = Trainer(tiny_config({"max_batches": 2}), tmp_path, quiet=True).fit()
    batch = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    records = next(body for head, body in sections().items() if head.startswith("The metrics records"))
    batch_table, epoch_table = table_names(records)
    assert set(BATCH_KEYS) <= set(batch_table) and set(batch_table) <= set(ENGINE_KEYS) | set(BATCH_KEYS)
    fixed = {k for k in batch if k in ENGINE_KEYS}
    assert fixed <= set(batch_table), fixed - set(batch_table)
    summary_fixed = {"kind", "epoch", "step", "batches", "seconds", "skipped_steps", "warnings"}
    assert summary_fixed <= summaries[0].keys() and set(epoch_table) == summary_fixed


def test_the_page_is_linked_where_plugin_authors_look():
    assert "docs/plugin-reference.md" in (REPO / "README.md").read_text()
    assert "(plugin-reference.md)" in (REPO / "docs" / "plugins.md").read_text()
