"""Tests of the step curriculum for the hard-cell threshold."""

from __future__ import annotations

import pluggy
import pytest
import torch

from arcfw.core.engine import hookspecs
from arcfw.core.engine.context import Context
from arcfw.core.errors import CheckpointError
from arcfw.plugins.curriculum import StepCurriculum

CTX = Context(device=torch.device("cpu"))


def test_default_schedule():
    c = StepCurriculum()
    assert c.threshold == 0.6  # before the first call
    assert c.hard_cell_threshold(epoch=0, step=0, ctx=CTX) == 0.6
    assert c.hard_cell_threshold(epoch=0, step=17, ctx=CTX) == 0.6
    assert c.hard_cell_threshold(epoch=1, step=18, ctx=CTX) == 0.3
    assert c.hard_cell_threshold(epoch=5, step=99, ctx=CTX) == 0.3


def test_custom_schedule():
    c = StepCurriculum(schedule=[[0, 0.9], [2, 0.7], [5, 0.2], [6, 1]])
    got = [c.hard_cell_threshold(epoch=e, step=0, ctx=CTX) for e in range(9)]
    assert got == [0.9, 0.9, 0.7, 0.7, 0.7, 0.2, 1.0, 1.0, 1.0]
    assert all(type(v) is float for v in got)
    single = StepCurriculum(schedule=[[0, 0.45]])
    assert [single.hard_cell_threshold(epoch=e, step=0, ctx=CTX) for e in (0, 3, 100)] == [0.45] * 3


def test_schedule_argument_is_not_aliased():
    sched = [[0, 0.5], [3, 0.25]]
    c = StepCurriculum(schedule=sched)
    sched[1][1] = 0.99
    assert c.hard_cell_threshold(epoch=3, step=0, ctx=CTX) == 0.25


@pytest.mark.parametrize(
    "schedule, words",
    [
        ([], "non-empty"),
        (None, "non-empty"),
        ([[1, 0.5]], "epoch 0"),
        ([[0, 0.5], [2, 0.4], [2, 0.3]], "strictly increasing"),
        ([[0, 0.5], [3, 0.4], [1, 0.3]], "strictly increasing"),
        ([[0, 0.0]], r"\(0, 1\]"),
        ([[0, 1.2]], r"\(0, 1\]"),
        ([[0, -0.3]], r"\(0, 1\]"),
        ([[0, float("nan")]], r"\(0, 1\]"),
        ([[0, 0.5], [1]], "pair"),
        ([[0, 0.5, 3]], "pair"),
        ([0.5], "pair"),
        ([[0.5, 0.5]], "integer"),
        ([[0, "0.5"]], "number"),
        ([[0, True]], "number"),
    ],
)
def test_invalid_schedules_raise_value_error(schedule, words):
    with pytest.raises(ValueError, match=words):
        StepCurriculum(schedule=schedule)


def test_state_round_trip():
    a = StepCurriculum(schedule=[[0, 0.8], [2, 0.4]])
    for e in range(4):
        a.hard_cell_threshold(epoch=e, step=10 * e, ctx=CTX)
    state = a.state_dict(ctx=CTX)
    assert state["epoch"] == 3 and state["threshold"] == 0.4

    b = StepCurriculum(schedule=[[0, 0.8], [2, 0.4]])
    assert (b.epoch, b.threshold) == (0, 0.8)
    b.load_state_dict(state, ctx=CTX)
    assert (b.epoch, b.threshold) == (3, 0.4)
    assert b.state_dict(ctx=CTX) == state
    assert b.hard_cell_threshold(epoch=3, step=31, ctx=CTX) == 0.4
    # state is plain Python values (a checkpoint can carry it)
    torch.save(state, _buf := __import__("io").BytesIO())
    _buf.seek(0)
    c = StepCurriculum(schedule=[[0, 0.8], [2, 0.4]])
    c.load_state_dict(torch.load(_buf, weights_only=True), ctx=CTX)
    assert (c.epoch, c.threshold) == (3, 0.4)


@pytest.mark.parametrize("state", [{}, {"epoch": 1}, {"epoch": -1, "threshold": 0.5}, {"epoch": 1, "threshold": 2.0}])
def test_bad_state_is_a_checkpoint_error(state):
    with pytest.raises(CheckpointError):
        StepCurriculum().load_state_dict(state, ctx=CTX)


def test_hooks_register_and_first_result_reaches_the_engine():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    c = StepCurriculum()
    pm.register(c, name="curriculum")
    assert StepCurriculum.name == "curriculum" and StepCurriculum.role == "curriculum"
    assert pm.hook.hard_cell_threshold(epoch=0, step=0, ctx=CTX) == [0.6]
    assert pm.hook.hard_cell_threshold(epoch=2, step=0, ctx=CTX) == [0.3]
    assert pm.hook.state_dict(ctx=CTX) == [{"epoch": 2, "threshold": 0.3, "schedule": [[0, 0.6], [1, 0.3]]}]
