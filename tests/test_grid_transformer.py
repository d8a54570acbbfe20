"""The cell encoding (qwen, encoding: cells), the views of a grid, and the grid_transformer predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arcfw.core.data.batch import Example, Pair, collate
from arcfw.core.data.views import NO_CELL, VIEW_NAMES, grid_views
from arcfw.core.engine.context import Context, TaskEncoding
from arcfw.plugins.grid_transformer import GridTransformer
from arcfw.plugins.qwen import QwenPrompt


def _grid(h, w, seed):
    return np.random.default_rng(seed).integers(0, 10, (h, w))


def _gravity_down(g):
    out = np.zeros_like(g)
    for c in range(g.shape[1]):
        nz = g[:, c][g[:, c] != 0]
        out[g.shape[0] - len(nz):, c] = nz
    return out


@pytest.mark.parametrize(
    "name, reference",
    [
        ("identity", lambda g: g),
        ("flip_h", np.fliplr),
        ("flip_v", np.flipud),
        ("rot180", lambda g: np.rot90(g, 2)),
        ("transpose", lambda g: g.T),
        ("anti_transpose", lambda g: np.rot90(g, 2).T),
        ("rot90", lambda g: np.rot90(g, -1)),
        ("rot270", lambda g: np.rot90(g, 1)),
        ("scale", lambda g: np.kron(g, np.ones((2, 3), dtype=g.dtype))),
        ("tile", lambda g: np.tile(g, (3, 2))),
        ("gravity_down", _gravity_down),
        ("gravity_up", lambda g: np.flipud(_gravity_down(np.flipud(g)))),
        ("gravity_right", lambda g: _gravity_down(g.T).T),
        ("gravity_left", lambda g: np.fliplr(_gravity_down(np.fliplr(g).T).T)),
    ],
)
def test_each_view_is_the_transformation_it_names(name, reference):
    g = _grid(4, 5, 0) * (_grid(4, 5, 1) > 4)  # zeros among the colours, for gravity
    want = reference(g)
    got = grid_views(g, want.shape)[VIEW_NAMES.index(name)]
    np.testing.assert_array_equal(got, want)


def test_crop_view_reads_from_the_objects_corner_and_no_cell_outside():
    g = np.zeros((6, 6), dtype=np.int64)
    g[2:4, 3:5] = [[1, 2], [3, 4]]
    views = grid_views(g, (2, 2))
    np.testing.assert_array_equal(views[VIEW_NAMES.index("crop")], [[1, 2], [3, 4]])
    big = grid_views(np.ones((2, 2), dtype=np.int64), (3, 3))
    assert big[VIEW_NAMES.index("identity")][2, 2] == NO_CELL  # outside the input: no cell


def _example(seed, demos=2, h=3, w=4):
    pairs = tuple(Pair(_grid(h, w, seed + i), _grid(w, h, seed + 10 + i)) for i in range(demos))
    return Example(task_id=f"t{seed}", pair_index=0, demos=pairs, query=Pair(_grid(h, w, seed + 99), _grid(w, h, seed + 98)))


def _qwen(**kw):
    torch.manual_seed(0)
    plugin = QwenPrompt(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32, cache_every=1, **kw)
    ctx = Context(device=torch.device("cpu"))
    plugin.configure(ctx)
    return plugin, ctx


def test_cell_encoding_has_a_token_per_demo_output_cell_and_query_input_cell():
    plugin, ctx = _qwen()
    ex = _example(0, demos=2, h=3, w=4)
    enc = plugin.generate_prompt(collate([ex]), ctx)
    assert isinstance(enc, TaskEncoding)
    assert enc.tokens.shape == (1, 2 * 4 * 3 + 3 * 4 + 1, 16)  # demo outputs are 4x3, the query input 3x4, summary
    assert torch.equal(enc.prompt[0], enc.tokens[0, -1])  # the prompt is the summary token's state
    assert enc.tokens.requires_grad and enc.prompt.requires_grad


def test_the_query_output_never_reaches_the_encoding():
    plugin, ctx = _qwen()
    ex = _example(0)
    other = Example(ex.task_id, ex.pair_index, ex.demos, Pair(ex.query.input, (ex.query.output + 1) % 10))
    a = plugin.generate_prompt(collate([ex]), ctx).tokens
    b = plugin.generate_prompt(collate([other]), ctx).tokens
    assert torch.equal(a, b)


def test_whole_demo_pairs_are_dropped_to_fit_counted_and_warned_once(capsys):
    plugin, ctx = _qwen(max_tokens=901 + 12)  # room for the query (3x4), the summary and 900 more
    ex = _example(0, demos=3, h=30, w=30)  # each demo has 900 output cells; the query 900 input cells
    small = Example("s", 0, ex.demos, Pair(_grid(3, 4, 5), None))
    enc = plugin.generate_prompt(collate([small]), ctx)
    assert enc.tokens.shape[1] == 900 + 12 + 1  # one whole demo pair kept, two dropped
    assert plugin.post_step_update(None, ctx)["demos_dropped"] == 2
    plugin.generate_prompt(collate([small]), ctx)
    err = capsys.readouterr().err
    assert err.count("demonstration pairs were left out") == 1 and "task s" in err
    with pytest.raises(ValueError, match="max_tokens must be at least 901"):
        QwenPrompt(max_tokens=900)


def _predictor(dim=16):
    torch.manual_seed(0)
    plugin = GridTransformer(dim=dim, layers=2, heads=2)
    ctx = Context(device=torch.device("cpu"), prompt_dim=16)
    plugin.configure(ctx)
    return plugin, ctx


def test_padding_never_changes_an_examples_logits():
    qwen, ctx = _qwen()
    pred, _ = _predictor()
    exs = [_example(0, demos=2, h=3, w=4), _example(1, demos=1, h=5, w=2), _example(2, demos=3, h=2, w=2)]
    with torch.no_grad():
        batch = collate(exs)
        enc = qwen.generate_prompt(batch, ctx)
        together = pred.predict(enc.prompt, batch, ctx, enc)
        for i, ex in enumerate(exs):
            single = collate([ex])
            e1 = qwen.generate_prompt(single, ctx)
            alone = pred.predict(e1.prompt, single, ctx, e1)[0]
            h, w = ex.query.output.shape
            assert torch.allclose(together[i, :h, :w], alone[:h, :w], atol=1e-5)


def test_gradient_reaches_the_prompt_and_every_token_state():
    qwen, ctx = _qwen()
    pred, _ = _predictor()
    batch = collate([_example(0)])
    enc = qwen.generate_prompt(batch, ctx)
    prompt = enc.prompt.detach().requires_grad_(True)
    tokens = enc.tokens.detach().requires_grad_(True)
    logits = pred.predict(prompt, batch, ctx, TaskEncoding(prompt, tokens, enc.token_mask))
    logits[batch.target_mask].logsumexp(-1).sum().backward()
    assert prompt.grad.abs().sum() > 0
    assert (tokens.grad.abs().sum(-1) > 0).all()  # every demonstration and query cell is read


def test_the_demonstrations_change_the_answer():
    qwen, ctx = _qwen()
    pred, _ = _predictor()
    a, b = _example(0), _example(50)
    swapped = Example(a.task_id, 0, b.demos, a.query)
    with torch.no_grad():
        logits = []
        for ex in (a, swapped):
            batch = collate([ex])
            enc = qwen.generate_prompt(batch, ctx)
            logits.append(pred.predict(enc.prompt, batch, ctx, enc))
    assert not torch.allclose(*logits)


def _copy_logits(copy_bias):
    qwen, ctx = _qwen()
    torch.manual_seed(0)
    pred = GridTransformer(dim=16, layers=1, heads=2, copy_bias=copy_bias)
    pred.configure(Context(device=torch.device("cpu"), prompt_dim=16))
    ex = _example(3, h=4, w=4)
    ex = Example(ex.task_id, 0, ex.demos, Pair(ex.query.input, ex.query.input.copy()))  # output size = input size
    batch = collate([ex])
    with torch.no_grad():
        enc = qwen.generate_prompt(batch, ctx)
        logits = pred.predict(enc.prompt, batch, ctx, enc)[0, :4, :4]
    return logits, torch.from_numpy(ex.query.input)


def test_copy_bias_adds_to_the_input_cells_colour_only():
    """The pointer's identity-view bias: exactly ``copy_bias`` more logit on each cell's input colour."""
    plain, inp = _copy_logits(0.0)
    biased, _ = _copy_logits(3.0)
    own = torch.nn.functional.one_hot(inp, 10).bool()
    assert torch.allclose((biased - plain)[own], torch.full((16,), 3.0), atol=1e-4)
    assert torch.allclose((biased - plain)[~own], torch.zeros(16 * 9), atol=1e-4)
    assert (biased.argmax(-1) == inp).float().mean() > (plain.argmax(-1) == inp).float().mean()


def test_no_cross_attention_without_token_states_and_every_tensor_trains():
    """A prompt plugin that makes no token states (ctx.token_dim = 0, qwen's text encoding): the predictor
    leaves out its cross-attention and lookup, and every tensor it has gets a gradient."""
    torch.manual_seed(0)
    pred = GridTransformer(dim=16, layers=2, heads=2)
    pred.configure(Context(device=torch.device("cpu"), prompt_dim=16, token_dim=0))
    names = [n for n, _ in pred.net.named_parameters()]
    assert not any("cross" in n or "mem_" in n or "lookup" in n for n in names)
    batch = collate([_example(4)])
    prompt = torch.randn(1, 16, requires_grad=True)
    logits = pred.predict(prompt, batch, Context(device=torch.device("cpu"), prompt_dim=16), None)
    logits[batch.target_mask].logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in pred.net.parameters())
    with pytest.raises(ValueError, match="token_dim = 0"):
        qwen, ctx = _qwen()
        pred.predict(prompt, batch, ctx, qwen.generate_prompt(batch, ctx))
    full = GridTransformer(dim=16, layers=2, heads=2)
    full.configure(Context(device=torch.device("cpu"), prompt_dim=16))  # token_dim not said: as before
    assert any("cross" in n for n, _ in full.net.named_parameters())
