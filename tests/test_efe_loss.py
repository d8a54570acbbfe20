"""Tests of the masked EFE loss: hand computations from the written formula, masking,
batch/example consistency, contracts, gradients and mixed precision."""

from __future__ import annotations

import math

import numpy as np
import pluggy
import pytest
import torch

from arcfw.core.data.batch import Example, Pair, collate
from arcfw.core.engine import hookspecs
from arcfw.core.engine.context import THRESHOLD_KEY, Context, LossOutput
from arcfw.core.errors import ContractError
from arcfw.plugins.efe_loss import MaskedEFELoss, efe_loss

EPS, W, S = 0.1, 0.1, 0.5


# --------------------------------------------------------------------------- reference


def hand_cell(logits: list[float], y: int, eps: float = EPS, w: float = W) -> tuple[float, float, float]:
    """(p_y, risk, ambiguity) of one cell, straight from the written formula, in float64 math."""
    m = max(logits)
    e = [math.exp(v - m) for v in logits]
    z = sum(e)
    p = [v / z for v in e]
    q = [(1 - eps) * (1.0 if k == y else 0.0) + eps / 10 for k in range(10)]
    risk = sum(p[k] * (math.log(p[k]) - math.log(q[k])) for k in range(10))
    ambiguity = -w * sum(p[k] * math.log(p[k]) for k in range(10))
    return p[y], risk, ambiguity


def hand_example(cells, threshold, eps=EPS, w=W, s=S, mode="wrong_or_unsure") -> tuple[float, dict]:
    """L_b for one example given a list of (logits, y, valid) cells."""
    n_valid = n_hard = 0
    total = 0.0
    for lg, y, valid in cells:
        if not valid:
            continue
        n_valid += 1
        p_y, risk, amb = hand_cell(lg, y, eps, w)
        wrong = any(lg[k] >= lg[y] for k in range(10) if k != y)  # the target is not the one most likely colour
        if p_y < threshold or (mode == "wrong_or_unsure" and wrong):
            n_hard += 1
            total += risk + amb
    ratio = n_hard / n_valid
    return total / max(n_hard, 1) * (s + (1 - s) * ratio), {"n_hard": n_hard, "ratio": ratio}


def onehotish(hot: int, big: float = 4.0, rest: float = 0.0) -> list[float]:
    v = [rest] * 10
    v[hot] = big
    return v


# --------------------------------------------------------------------------- hand computations


def test_hand_computation_one_by_two_one_hard_one_easy():
    # cell 0: target 0 but mass spread -> hard; cell 1: confident and right -> easy
    c0 = [0.3, 1.2, -0.7, 0.0, 0.5, -1.1, 0.9, 0.2, -0.4, 0.1]
    c1 = onehotish(3, big=6.0)
    logits = torch.tensor([[[c0, c1]]], dtype=torch.float32)  # [1,1,2,10]
    targets = torch.tensor([[[0, 3]]], dtype=torch.int64)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)

    p0, r0, a0 = hand_cell(c0, 0)
    p1, _, _ = hand_cell(c1, 3)
    assert p0 < 0.6 <= p1  # the case really has one hard and one easy cell
    expected = (r0 + a0) / 1 * (0.5 + 0.5 * 0.5)

    loss, per_ex, stats = efe_loss(logits, targets, mask, 0.6, EPS, W, S)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert per_ex.shape == (1,) and per_ex[0].item() == pytest.approx(expected, abs=1e-6)
    assert stats["hard_cells"] == 1.0
    assert stats["mask_ratio"] == pytest.approx(0.5)
    assert stats["risk"] == pytest.approx(r0, abs=1e-6)
    assert stats["ambiguity"] == pytest.approx(a0, abs=1e-6)
    assert stats["cell_acc"] == pytest.approx(0.5)  # argmax of c0 is 1, not 0


def test_hand_computation_two_by_two_with_masked_cell_and_other_params():
    eps, w, s, thr = 0.2, 0.3, 0.25, 0.9
    cells = [
        ([0.5, -0.2, 2.0, 0.1, 0.0, 0.0, -1.0, 0.3, 0.0, 0.7], 2, True),
        ([1.0, 1.0, 0.0, -2.0, 0.4, 0.0, 0.0, 0.0, 0.2, 0.0], 1, True),
        (onehotish(7, big=9.0), 7, True),  # easy: p_y ~ 0.99 > 0.9
        ([0.0] * 10, 5, False),  # would be hard, but it is padding
    ]
    logits = torch.tensor([[[cells[0][0], cells[1][0]], [cells[2][0], cells[3][0]]]], dtype=torch.float32)
    targets = torch.tensor([[[2, 1], [7, 5]]], dtype=torch.int64)
    mask = torch.tensor([[[True, True], [True, False]]])

    expected, info = hand_example(cells, thr, eps, w, s)
    assert info == {"n_hard": 2, "ratio": pytest.approx(2 / 3)}
    # written out once more for this case: mean EFE of the two hard cells times (s + (1-s)*2/3)
    efe = [sum(hand_cell(lg, y, eps, w)[1:]) for lg, y, _ in cells[:2]]
    assert expected == pytest.approx((efe[0] + efe[1]) / 2 * (s + (1 - s) * 2 / 3), abs=1e-12)

    loss, _, stats = efe_loss(logits, targets, mask, thr, eps, w, s)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["mask_ratio"] == pytest.approx(2 / 3, abs=1e-6)
    assert stats["hard_cells"] == 2.0
    assert stats["cell_acc"] == pytest.approx(2 / 3, abs=1e-6)  # cell 1 argmax is 0 (tie -> first), not 1


def test_label_smoothing_and_ambiguity_weight_enter_the_loss():
    c0 = [0.3, 1.2, -0.7, 0.0, 0.5, -1.1, 0.9, 0.2, -0.4, 0.1]
    logits = torch.tensor([[[c0]]])
    targets = torch.tensor([[[4]]])
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    for eps, w in [(0.0 + 0.05, 0.0), (0.5, 0.0), (0.1, 1.0), (0.3, 2.5)]:
        _, r, a = hand_cell(c0, 4, eps, w)
        loss, _, _ = efe_loss(logits, targets, mask, 1.0, eps, w, 0.5)
        assert loss.item() == pytest.approx((r + a) * 1.0, abs=1e-6)  # ratio 1 -> scale 1


# --------------------------------------------------------------------------- hard cells and scale


def test_hard_cell_rule_is_strict_at_the_threshold():
    c = [0.3, 1.2, -0.7, 0.0, 0.5, -1.1, 0.9, 0.2, -0.4, 0.1]
    logits = torch.tensor([[[c]]])
    targets = torch.tensor([[[1]]])
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    p_y = torch.softmax(logits.float(), -1)[0, 0, 0, 1]  # exactly the float32 value the loss compares
    at = float(p_y)
    above = float(torch.nextafter(p_y, torch.tensor(2.0)))
    below = float(torch.nextafter(p_y, torch.tensor(0.0)))

    for thr, hard in [(at, 0), (below, 0), (above, 1)]:
        loss, _, stats = efe_loss(logits, targets, mask, thr, EPS, W, S)
        assert stats["hard_cells"] == hard, thr
        assert (loss.item() > 0) == bool(hard)


def test_mask_ratio_and_scale():
    # 4 valid cells, k of them hard (identical hard cells so the mean EFE is constant)
    hard_c = [0.0] * 10  # p_y = 0.1
    easy_c = onehotish(0, big=10.0)  # p_y ~ 1
    _, r, a = hand_cell(hard_c, 0)
    for k in range(1, 5):
        row = [hard_c] * k + [easy_c] * (4 - k)
        logits = torch.tensor([[row]], dtype=torch.float32)  # [1,1,4,10]
        targets = torch.zeros(1, 1, 4, dtype=torch.int64)
        mask = torch.ones(1, 1, 4, dtype=torch.bool)
        for s in (0.5, 0.0, 1.0):
            loss, _, stats = efe_loss(logits, targets, mask, 0.5, EPS, W, s)
            ratio = k / 4
            assert stats["mask_ratio"] == pytest.approx(ratio)
            assert loss.item() == pytest.approx((r + a) * (s + (1 - s) * ratio), abs=1e-6)
        # default scale is 0.5 + 0.5 * ratio
        loss, _, _ = efe_loss(logits, targets, mask, 0.5, EPS, W, 0.5)
        assert loss.item() == pytest.approx((r + a) * (0.5 + 0.5 * k / 4), abs=1e-6)


def test_no_hard_cells_gives_zero_loss_and_backward_works():
    logits = torch.tensor([[[onehotish(2, big=8.0), onehotish(5, big=8.0)]]], requires_grad=True)
    targets = torch.tensor([[[2, 5]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    loss, per_ex, stats = efe_loss(logits, targets, mask, 0.6, EPS, W, S)
    assert loss.item() == 0.0 and stats["hard_cells"] == 0.0 and stats["mask_ratio"] == 0.0
    assert stats["risk"] == 0.0 and stats["ambiguity"] == 0.0 and stats["cell_acc"] == 1.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_gradient_flows_to_logits_of_hard_cells_only():
    logits = torch.tensor(
        [[[[0.1 * k for k in range(10)], onehotish(5, big=8.0)]]], requires_grad=True
    )
    targets = torch.tensor([[[3, 5]]])
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    loss, _, stats = efe_loss(logits, targets, mask, 0.6, EPS, W, S)
    assert stats["hard_cells"] == 1.0
    loss.backward()
    g = logits.grad
    assert torch.isfinite(g).all()
    assert g[0, 0, 0].abs().sum() > 1e-3  # hard cell gets gradient
    assert torch.equal(g[0, 0, 1], torch.zeros(10))  # easy cell does not
    # descending the gradient lowers the loss
    with torch.no_grad():
        stepped = logits - 0.1 * g
    loss2, _, _ = efe_loss(stepped, targets, mask, 0.6, EPS, W, S)
    assert loss2.item() < loss.item()


def test_gradient_matches_finite_differences():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 2, 10, requires_grad=True)
    targets = torch.tensor([[[1, 2], [3, 4]]])
    mask = torch.tensor([[[True, True], [True, False]]])
    # threshold 1.0: every valid cell is hard, so the hard set cannot move under the perturbation.
    # The loss computes in float32, so central differences in float64 of the hand formula instead.
    loss, _, _ = efe_loss(logits, targets, mask, 1.0, EPS, W, S)
    loss.backward()

    def hand(x: np.ndarray) -> float:
        cells = [(x[0, i, j].tolist(), int(targets[0, i, j]), bool(mask[0, i, j])) for i in range(2) for j in range(2)]
        return hand_example(cells, 1.0)[0]

    x0 = logits.detach().double().numpy()
    num = np.zeros_like(x0)
    h = 1e-6
    for idx in np.ndindex(*x0.shape):
        xp, xm = x0.copy(), x0.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (hand(xp) - hand(xm)) / (2 * h)
    np.testing.assert_allclose(logits.grad.numpy(), num, atol=1e-5)
    assert np.abs(num[0, 1, 1]).max() == 0.0  # the padded cell


# --------------------------------------------------------------------------- batches


def _example(task: str, out: np.ndarray) -> Example:
    inp = np.zeros_like(out)
    return Example(task_id=task, pair_index=0, demos=(), query=Pair(input=inp, output=out))


def test_batch_loss_is_mean_of_single_example_losses_with_padding():
    rng = np.random.default_rng(0)
    ex_a = _example("a", rng.integers(0, 10, size=(2, 3)))
    ex_b = _example("b", rng.integers(0, 10, size=(4, 2)))
    batch = collate([ex_a, ex_b])
    assert batch.canvas == (4, 3)
    assert not batch.target_mask[0].all() and not batch.target_mask[1].all()  # both are padded

    torch.manual_seed(1)
    big = torch.randn(2, 4, 3, 10) * 2.0
    big[:, :, :, 0] += 100.0 * (~batch.target_mask).float()  # wild values in padding must not matter
    big.requires_grad_(True)
    thr = 0.3
    loss, per_ex, stats = efe_loss(big, batch.targets, batch.target_mask, thr, EPS, W, S)
    assert 0 < stats["hard_cells"] < 18  # some hard cells, not all (otherwise the scale is trivial)
    loss.backward()

    singles = []
    grads = []
    for b, ex in enumerate((ex_a, ex_b)):
        one = collate([ex])
        h, w = one.canvas
        lg = big.detach()[b : b + 1, :h, :w].clone().requires_grad_(True)
        l1, _, _ = efe_loss(lg, one.targets, one.target_mask, thr, EPS, W, S)
        l1.backward()
        singles.append(l1.detach())
        grads.append(lg.grad)

    torch.testing.assert_close(loss.detach(), torch.stack(singles).mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(per_ex.detach(), torch.stack(singles), atol=1e-6, rtol=0)
    # d(mean)/d(logits_b) = (1/B) d(L_b)/d(logits_b); zero gradient on padding
    for b in range(2):
        h, w = grads[b].shape[1:3]
        torch.testing.assert_close(big.grad[b, :h, :w], grads[b][0] / 2, atol=1e-6, rtol=0)
        pad = ~batch.target_mask[b]
        assert torch.equal(big.grad[b][pad], torch.zeros_like(big.grad[b][pad]))
    # and every single-example loss also matches the hand reference
    for b, ex in enumerate((ex_a, ex_b)):
        out = ex.query.output
        cells = [
            (big.detach()[b, i, j].tolist(), int(out[i, j]), True)
            for i in range(out.shape[0])
            for j in range(out.shape[1])
        ]
        assert singles[b].item() == pytest.approx(hand_example(cells, thr)[0], abs=1e-6)


def test_batch_metrics_are_per_example_means_and_pooled_hard_cell_means():
    # example 0: 2 valid cells (1 hard, 1 right); example 1: 4 valid cells (3 hard, argmax right on 2)
    hard_a = [0.3, 1.2, -0.7, 0.0, 0.5, -1.1, 0.9, 0.2, -0.4, 0.1]  # y=0: argmax 1, wrong
    hard_b = [0.0, 0.8, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # y=1: argmax 1, right, p_y ~ 0.2
    easy = onehotish(2, big=9.0)  # y=2
    pad = [0.0] * 10
    logits = torch.tensor(
        [
            [[hard_a, easy], [pad, pad]],
            [[hard_a, hard_b], [hard_b, easy]],
        ]
    )
    targets = torch.tensor([[[0, 2], [0, 0]], [[0, 1], [1, 2]]])
    mask = torch.tensor([[[True, True], [False, False]], [[True, True], [True, True]]])
    _, _, stats = efe_loss(logits, targets, mask, 0.6, EPS, W, S)
    ra, rb = hand_cell(hard_a, 0), hand_cell(hard_b, 1)
    assert ra[0] < 0.6 and rb[0] < 0.6
    assert stats["hard_cells"] == 4.0
    assert stats["mask_ratio"] == pytest.approx((1 / 2 + 3 / 4) / 2, abs=1e-6)
    assert stats["cell_acc"] == pytest.approx((1 / 2 + 3 / 4) / 2, abs=1e-6)
    assert stats["risk"] == pytest.approx((2 * ra[1] + 2 * rb[1]) / 4, abs=1e-6)
    assert stats["ambiguity"] == pytest.approx((2 * ra[2] + 2 * rb[2]) / 4, abs=1e-6)


def test_example_without_valid_cells_is_an_error():
    logits = torch.zeros(2, 1, 2, 10)
    targets = torch.zeros(2, 1, 2, dtype=torch.int64)
    mask = torch.tensor([[[True, False]], [[False, False]]])
    with pytest.raises(ValueError, match=r"\[1\]"):
        efe_loss(logits, targets, mask, 0.6, EPS, W, S)


# --------------------------------------------------------------------------- contracts


def test_float_targets_are_a_contract_error():
    logits = torch.zeros(1, 2, 2, 10)
    with pytest.raises(ContractError) as info:
        efe_loss(logits, torch.zeros(1, 2, 2), torch.ones(1, 2, 2, dtype=torch.bool), 0.6, EPS, W, S)
    msg = str(info.value)
    assert info.value.plugin == "efe_loss" and info.value.hook == "compute_loss"
    assert "efe_loss" in msg and "int64" in msg and "torch.float32" in msg and "(1, 2, 2)" in msg


@pytest.mark.parametrize(
    "logits_shape, targets_shape",
    [((1, 2, 2, 9), (1, 2, 2)), ((1, 2, 3, 10), (1, 2, 2)), ((2, 2, 10), (2, 2))],
)
def test_shape_mismatch_is_a_contract_error(logits_shape, targets_shape):
    with pytest.raises(ContractError, match="efe_loss"):
        efe_loss(
            torch.zeros(logits_shape),
            torch.zeros(targets_shape, dtype=torch.int64),
            torch.ones(targets_shape, dtype=torch.bool),
            0.6,
            EPS,
            W,
            S,
        )


def test_parameter_validation():
    MaskedEFELoss()
    MaskedEFELoss(label_smoothing=1e-3, ambiguity_weight=0.0, min_scale=1.0)
    for kw in (
        {"label_smoothing": 1.0},
        {"label_smoothing": 0.0},
        {"label_smoothing": -0.1},
        {"ambiguity_weight": -1e-3},
        {"ambiguity_weight": float("nan")},
        {"min_scale": 1.5},
    ):
        with pytest.raises(ValueError):
            MaskedEFELoss(**kw)


# --------------------------------------------------------------------------- precision


def test_bf16_logits_under_cpu_autocast_give_finite_float32_loss():
    torch.manual_seed(2)
    ref = torch.randn(2, 3, 3, 10)
    targets = torch.randint(0, 10, (2, 3, 3))
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    logits = ref.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, per_ex, _ = efe_loss(logits, targets, mask, 0.6, EPS, W, S)
    assert loss.dtype == torch.float32 and per_ex.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()
    # computed in fp32 from the bf16 values: same as the fp32 computation on the upcast logits
    expected, _, _ = efe_loss(logits.detach().float(), targets, mask, 0.6, EPS, W, S)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


# --------------------------------------------------------------------------- the plugin


def test_plugin_hook_through_pluggy_and_single_sync(monkeypatch):
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    plugin = MaskedEFELoss(label_smoothing=0.2, ambiguity_weight=0.05, min_scale=0.3)
    pm.register(plugin, name="efe_loss")
    assert MaskedEFELoss.name == "efe_loss" and MaskedEFELoss.role == "loss" and MaskedEFELoss.description

    batch = collate([_example("a", np.array([[1, 2], [3, 4]])), _example("b", np.array([[5]]))])
    torch.manual_seed(3)
    logits = torch.randn(2, 2, 2, 10, requires_grad=True)
    ctx = Context(device=torch.device("cpu"), schedule={THRESHOLD_KEY: 0.4})

    calls = {"tolist": 0}
    orig_tolist = torch.Tensor.tolist

    def counting_tolist(self, *a, **k):
        calls["tolist"] += 1
        return orig_tolist(self, *a, **k)

    def no_item(self, *a, **k):
        raise AssertionError(".item() called inside compute_loss")

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    monkeypatch.setattr(torch.Tensor, "item", no_item)
    (out,) = pm.hook.compute_loss(logits=logits, batch=batch, ctx=ctx)
    monkeypatch.undo()
    assert calls["tolist"] == 1

    assert isinstance(out, LossOutput)
    assert set(out.metrics) == {"mask_ratio", "cell_acc", "hard_cells", "risk", "ambiguity"}
    assert all(type(v) is float for v in out.metrics.values())
    assert out.per_example is not None and out.per_example.shape == (2,) and not out.per_example.requires_grad
    assert out.loss.requires_grad
    ref, _, stats = efe_loss(logits, batch.targets, batch.target_mask, 0.4, 0.2, 0.05, 0.3)
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-7)
    assert out.metrics == stats


# --------------------------------------------------------------------------- which cells are hard: wrong_or_unsure vs threshold


def _cell(probs: dict[int, float]) -> list[float]:
    """Logits of one cell with the given probabilities (the rest share what is left)."""
    rest = (1.0 - sum(probs.values())) / (10 - len(probs))
    return [math.log(probs.get(k, rest)) for k in range(10)]


CASES = [  # (probs, target, threshold, hard under wrong_or_unsure, hard under threshold)
    ({0: 0.35, 1: 0.6}, 0, 0.3, True, False),  # wrong (argmax 1) but p_y above the threshold
    ({0: 0.48, 1: 0.48}, 0, 0.3, True, False),  # a 50/50 split: the target is not the single most likely colour
    ({0: 0.48, 1: 0.48}, 1, 0.3, True, False),  # ... whichever of the two is the target (a tie is not right)
    ({0: 0.35, 1: 0.6}, 0, 1e-6, True, False),  # wrong is hard whatever the threshold
    ({0: 0.45, 1: 0.4}, 0, 0.6, True, True),  # right but unsure: the threshold adds it
    ({0: 0.45, 1: 0.4}, 0, 0.3, False, False),  # right and p_y >= threshold
    ({3: 0.97}, 3, 0.6, False, False),  # right and sure
    ({3: 0.97}, 4, 0.6, True, True),  # wrong and sure of it
]


@pytest.mark.parametrize("probs, y, thr, hard_default, hard_threshold", CASES)
def test_a_wrong_cell_is_always_hard_and_the_threshold_adds_unsure_ones(probs, y, thr, hard_default, hard_threshold):
    logits = torch.tensor([[[_cell(probs)]]])
    targets = torch.tensor([[[y]]])
    mask = torch.ones(1, 1, 1, dtype=torch.bool)
    for mode, hard in (("wrong_or_unsure", hard_default), ("threshold", hard_threshold)):
        loss, _, stats = efe_loss(logits, targets, mask, thr, EPS, W, S, hard_cells=mode)
        assert stats["hard_cells"] == float(hard), mode
        assert (loss.item() > 0) == hard, mode
        expected, _ = hand_example([(logits[0, 0, 0].tolist(), y, True)], thr, mode=mode)
        assert loss.item() == pytest.approx(expected, abs=1e-6)
    _, _, default = efe_loss(logits, targets, mask, thr, EPS, W, S)
    assert default["hard_cells"] == float(hard_default)  # wrong_or_unsure is the default


def test_default_loss_never_stalls_on_a_coin_flip_cell():
    """Gradient descent on one cell split 50/50 between target and a rival at threshold 0.3: the strict
    rule gives it no loss, so it stays a coin flip; the default rule trains it until the target wins."""
    for mode, learns in (("wrong_or_unsure", True), ("threshold", False)):
        logits = torch.tensor([[[_cell({0: 0.45, 1: 0.45})]]], requires_grad=True)
        targets = torch.tensor([[[0]]])
        mask = torch.ones(1, 1, 1, dtype=torch.bool)
        opt = torch.optim.SGD([logits], lr=1.0)
        for _ in range(20):
            loss, _, _ = efe_loss(logits, targets, mask, 0.3, EPS, W, S, hard_cells=mode)
            opt.zero_grad()
            loss.backward()
            opt.step()
        p = torch.softmax(logits.detach()[0, 0, 0], -1)
        assert (p.argmax().item() == 0 and p[0] > p[1] + 0.1) == learns, (mode, p[:2])


def test_bad_hard_cells_value_names_the_choices():
    with pytest.raises(ValueError, match="hard_cells must be one of wrong_or_unsure, threshold, got 'wrong'"):
        MaskedEFELoss(hard_cells="wrong")
    with pytest.raises(ValueError, match="hard_cells"):
        efe_loss(torch.zeros(1, 1, 1, 10), torch.zeros(1, 1, 1, dtype=torch.int64), torch.ones(1, 1, 1, dtype=torch.bool), 0.6,
                 hard_cells="sometimes")


def test_plugin_passes_hard_cells_through():
    logits = torch.tensor([[[_cell({0: 0.35, 1: 0.6})]]])
    ex = Example(task_id="t", pair_index=0, demos=(), query=Pair(input=np.zeros((1, 1), dtype=np.int64), output=np.zeros((1, 1), dtype=np.int64)))
    batch = collate([ex])
    ctx = Context(device=torch.device("cpu"), schedule={THRESHOLD_KEY: 0.3})
    assert MaskedEFELoss().compute_loss(logits=logits, batch=batch, ctx=ctx).metrics["hard_cells"] == 1.0
    assert MaskedEFELoss(hard_cells="threshold").compute_loss(logits=logits, batch=batch, ctx=ctx).metrics["hard_cells"] == 0.0


def test_the_two_rules_coincide_above_one_half_and_differ_below():
    torch.manual_seed(3)
    logits = torch.randn(4, 5, 5, 10) * 1.5
    targets = torch.randint(0, 10, (4, 5, 5))
    mask = torch.ones(4, 5, 5, dtype=torch.bool)
    for thr in (0.51, 0.6, 0.9):
        a, _, sa = efe_loss(logits, targets, mask, thr, hard_cells="wrong_or_unsure")
        b, _, sb = efe_loss(logits, targets, mask, thr, hard_cells="threshold")
        assert sa["hard_cells"] == sb["hard_cells"] and a.item() == b.item()
    _, _, sa = efe_loss(logits, targets, mask, 0.05, hard_cells="wrong_or_unsure")
    _, _, sb = efe_loss(logits, targets, mask, 0.05, hard_cells="threshold")
    wrong = (logits.argmax(-1) != targets).sum().item()
    assert sa["hard_cells"] >= wrong > sb["hard_cells"]


# --------------------------------------------------------------------------- change_weight


def test_change_weight_weighs_the_changed_hard_cells_in_the_mean():
    """Two hard cells, the first one changed: L = (v·EFE_0 + EFE_1) / (v + 1) · scale (both hard: scale 1)."""
    c0 = [0.3, 1.2, -0.7, 0.0, 0.5, -1.1, 0.9, 0.2, -0.4, 0.1]
    c1 = [1.0, 0.2, 0.4, -0.3, 0.0, 0.8, -0.5, 0.6, 0.1, 0.0]
    logits = torch.tensor([[[c0, c1]]], dtype=torch.float32)
    targets = torch.tensor([[[0, 3]]], dtype=torch.int64)
    mask = torch.ones(1, 1, 2, dtype=torch.bool)
    changed = torch.tensor([[[True, False]]])
    (_, r0, a0), (_, r1, a1) = hand_cell(c0, 0), hand_cell(c1, 3)
    for v in (1.0, 3.0, 0.5):
        loss, _, stats = efe_loss(logits, targets, mask, 0.6, EPS, W, S, changed=changed, change_weight=v)
        assert stats["hard_cells"] == 2.0
        assert loss.item() == pytest.approx((v * (r0 + a0) + (r1 + a1)) / (v + 1), abs=1e-6)
    plain, _, _ = efe_loss(logits, targets, mask, 0.6, EPS, W, S)
    assert plain.item() == pytest.approx(((r0 + a0) + (r1 + a1)) / 2, abs=1e-6)


def test_the_plugin_weighs_the_cells_whose_target_differs_from_the_input():
    """The plugin's changed cells are those where the target is not the query input's colour at the same place."""
    x, y = np.array([[1, 2]]), np.array([[1, 5]])  # the second cell changes
    batch = collate([Example("t", 0, (), Pair(x, y))])
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 2, 10)
    ctx = Context(device=torch.device("cpu"), schedule={THRESHOLD_KEY: 1.0})  # every cell hard
    got = MaskedEFELoss(change_weight=4.0).compute_loss(logits=logits, batch=batch, ctx=ctx).loss
    want, _, _ = efe_loss(logits, batch.targets, batch.target_mask, 1.0, changed=torch.tensor([[[False, True]]]), change_weight=4.0)
    assert got.item() == pytest.approx(want.item(), abs=1e-7)
    assert got.item() != pytest.approx(MaskedEFELoss().compute_loss(logits=logits, batch=batch, ctx=ctx).loss.item(), abs=1e-4)


@pytest.mark.parametrize("bad", [0, -1.0, True, "3"])
def test_a_bad_change_weight_is_refused(bad):
    with pytest.raises(ValueError, match="change_weight must be a number > 0"):
        MaskedEFELoss(change_weight=bad)
