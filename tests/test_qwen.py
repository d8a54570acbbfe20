"""Tests of the Qwen2 prompt plugin (tiny models on CPU, nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arcfw.core.data.batch import Example, Pair, collate
from arcfw.core.engine.context import Context
from arcfw.plugins.qwen import QwenPrompt, build_grid_tokenizer

CPU = torch.device("cpu")
TINY = dict(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=64, cache_every=1, encoding="text")


def grid(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 10, size=(h, w), dtype=np.int64)


def pair(rng: np.random.Generator, hi: int, wi: int, ho: int, wo: int) -> Pair:
    return Pair(grid(rng, hi, wi), grid(rng, ho, wo))


def example(task: str, demos: list[Pair], query: Pair, index: int = 0) -> Example:
    return Example(task_id=task, pair_index=index, demos=tuple(demos), query=query)


def grid_text(g: np.ndarray) -> str:
    return "".join("".join(str(int(v)) for v in row) + "\n" for row in g)


def configured(seed: int = 0, **kw) -> tuple[QwenPrompt, Context]:
    plugin = QwenPrompt(**{**TINY, **kw})
    ctx = Context(device=CPU)
    torch.manual_seed(seed)
    plugin.configure(ctx)
    return plugin, ctx


def mixed_examples() -> list[Example]:
    rng = np.random.default_rng(1)
    return [
        example("t0", [pair(rng, 2, 3, 3, 2), pair(rng, 4, 4, 1, 5)], pair(rng, 3, 3, 2, 2)),
        example("t1", [pair(rng, 1, 1, 1, 1)], pair(rng, 2, 2, 2, 2)),
        example("t2", [pair(rng, 5, 6, 6, 5), pair(rng, 2, 7, 3, 3), pair(rng, 3, 1, 1, 3)], pair(rng, 6, 4, 4, 6)),
        example("t3", [], pair(rng, 1, 4, 4, 1)),
    ]


# ------------------------------------------------------------------ construction


def test_bad_pooling_is_a_value_error():
    with pytest.raises(ValueError, match="pooling"):
        QwenPrompt(pooling="max")


def test_train_mode_prompt_dim_and_param_group():
    plugin, ctx = configured(hidden_size=48, num_heads=4, num_kv_heads=2)
    assert ctx.prompt_dim == 48
    assert plugin.model.training and all(m.training for m in plugin.model.modules())
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in plugin.model.parameters())
    assert plugin.model.config.max_position_embeddings >= plugin.max_tokens
    assert plugin.model.config.vocab_size == len(build_grid_tokenizer())
    (group,) = plugin.parameter_groups(ctx)
    # the group's module is the text encoder (DDP wraps it): the model's own parameters and state_dict
    assert group.name == "qwen" and group.lr == 3e-4 and group.modules == [plugin.text_encoder]
    assert group.module_attr == "text_encoder" and getattr(plugin, group.module_attr) is group.modules[0]
    assert [id(p) for p in group.params] == [id(p) for p in plugin.model.parameters()] and group.params
    assert plugin.text_encoder.state_dict().keys() == plugin.model.state_dict().keys()
    plugin.text_encoder.eval()  # what the engine does to evaluate: the model follows
    assert not plugin.model.training and not any(m.training for m in plugin.model.modules())


def test_init_follows_global_seed():
    a, _ = configured(seed=3)
    b, _ = configured(seed=3)
    c, _ = configured(seed=4)
    wa, wb, wc = (p.model.get_input_embeddings().weight for p in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


# ------------------------------------------------------------------ serialisation


def test_serialisation_format():
    rng = np.random.default_rng(0)
    d0, d1, q = pair(rng, 2, 3, 1, 2), pair(rng, 3, 1, 2, 2), pair(rng, 2, 2, 3, 3)
    plugin, _ = configured()
    ids = plugin.token_ids(example("fmt", [d0, d1], q))
    text = "".join(f"<in>{grid_text(d.input)}<out>{grid_text(d.output)}" for d in (d0, d1))
    text += f"<query><in>{grid_text(q.input)}<out>"
    assert ids == plugin.tokenizer.encode(text, add_special_tokens=False)
    # markers + h * (w + 1) per grid; the query's 3x3 output adds nothing
    assert len(ids) == (2 + 2 * 4 + 1 * 3) + (2 + 3 * 2 + 2 * 3) + (3 + 2 * 3)


def test_query_output_never_serialised():
    rng = np.random.default_rng(2)
    demos = [pair(rng, 3, 3, 3, 3), pair(rng, 2, 4, 4, 2)]
    q_in = grid(rng, 3, 5)
    a = example("a", demos, Pair(q_in, grid(rng, 3, 5)))
    b = example("b", demos, Pair(q_in, grid(rng, 7, 2)))  # other query output, other size
    plugin, ctx = configured()
    assert plugin.token_ids(a) == plugin.token_ids(b)
    assert plugin._serialise(a) == plugin._serialise(b)  # not a cache effect
    pa, pb = plugin.generate_prompt(collate([a]), ctx), plugin.generate_prompt(collate([b]), ctx)
    torch.testing.assert_close(pa, pb, rtol=0, atol=0)

    # a changed demo changes the ids and the prompt, also under the same key (the cache notices)
    changed = list(demos)
    changed[0] = Pair(demos[0].input, (demos[0].output + 1) % 10)
    c = example("a", changed, a.query)
    assert plugin.token_ids(c) != plugin.token_ids(a)
    pc = plugin.generate_prompt(collate([c]), ctx)
    assert not torch.allclose(pa, pc)


def test_truncation_drops_demos_from_the_front():
    rng = np.random.default_rng(3)
    demos = [pair(rng, 4, 4, 4, 4), pair(rng, 3, 3, 3, 3), pair(rng, 2, 2, 2, 2)]
    q = pair(rng, 2, 3, 2, 3)
    ex = example("trunc", demos, q)
    full, _ = configured()
    seg = [len(full.token_ids(example(f"d{i}", [d], q))) for i, d in enumerate(demos)]
    q_len = len(full.token_ids(example("q", [], q)))
    seg = [s - q_len for s in seg]  # each demo's own tokens
    assert len(full.token_ids(ex)) == sum(seg) + q_len

    budget = seg[2] + q_len + seg[1] - 1  # room for the last demo only
    small, _ = configured(max_tokens=budget)
    ids = small.token_ids(ex)
    assert len(ids) <= budget
    assert ids == full.token_ids(example("last", demos[2:], q))
    query_ids = full.token_ids(example("q", [], q))
    assert ids[-q_len:] == query_ids

    # the query alone is too long: keep its last max_tokens ids (the end of the query input and <out>)
    tiny, ctx = configured(max_tokens=q_len - 3)
    ids = tiny.token_ids(ex)
    assert ids == query_ids[-(q_len - 3):]
    assert ids[-1] == tiny.tokenizer.convert_tokens_to_ids("<out>")
    assert tiny.generate_prompt(collate([ex]), ctx).shape == (1, 32)


# ------------------------------------------------------------------ the model


def test_prompt_carries_gradient_to_every_parameter():
    plugin, ctx = configured(num_layers=2)
    batch = collate(mixed_examples())
    prompt = plugin.generate_prompt(batch, ctx)
    assert prompt.shape == (batch.size, ctx.prompt_dim) and prompt.dtype == torch.float32
    assert prompt.requires_grad
    (prompt * torch.randn_like(prompt)).sum().backward()
    for name, p in plugin.model.named_parameters():
        assert p.grad is not None, name
    assert plugin.model.get_input_embeddings().weight.grad.abs().sum() > 0
    last = plugin.model.layers[-1]
    for name, p in last.named_parameters():
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("batching", ["padded", "per_example"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_batch_equals_single_calls(pooling, batching):
    plugin, ctx = configured(pooling=pooling, num_layers=2, batching=batching)
    exs = mixed_examples()
    lengths = {len(plugin.token_ids(e)) for e in exs}
    assert len(lengths) == len(exs)  # really different sizes: padding is exercised
    batched = plugin.generate_prompt(collate(exs), ctx)
    single = torch.cat([plugin.generate_prompt(collate([e]), ctx) for e in exs])
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)
    # and in another order
    rev = plugin.generate_prompt(collate(exs[::-1]), ctx)
    torch.testing.assert_close(rev.flip(0), single, rtol=0, atol=1e-5)


def test_gradient_checkpointing_same_prompt_and_grads():
    exs = mixed_examples()
    out = []
    for gc in (False, True):
        plugin, ctx = configured(seed=5, gradient_checkpointing=gc, last_layer_shortcut=False)  # both full forwards
        prompt = plugin.generate_prompt(collate(exs), ctx)
        prompt.square().sum().backward()
        out.append((prompt.detach(), plugin.model.get_input_embeddings().weight.grad.clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)


def test_from_pretrained_round_trip(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_grid_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(11)
    lm = Qwen2ForCausalLM(cfg).eval()
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    torch.manual_seed(0)  # different from the saved weights' seed: loading must not re-initialise
    plugin = QwenPrompt(pretrained=str(tmp_path), hidden_size=8, num_layers=5, encoding="text")  # sizes ignored
    ctx = Context(device=CPU)
    plugin.configure(ctx)
    assert ctx.prompt_dim == 32 and len(plugin.model.layers) == 2
    assert plugin.model.training
    assert all(p.dtype == torch.float32 for p in plugin.model.parameters())
    assert plugin.tokenizer.pad_token_id == tok.pad_token_id and len(plugin.tokenizer) == len(tok)
    assert torch.equal(plugin.model.get_input_embeddings().weight, lm.model.embed_tokens.weight)
    assert torch.equal(plugin.model.layers[-1].mlp.down_proj.weight, lm.model.layers[-1].mlp.down_proj.weight)

    exs = mixed_examples()
    compact, _ = configured()
    for e in exs:  # the saved compact tokenizer came back as it was (row ends included)
        assert plugin.token_ids(e) == compact.token_ids(e)
    prompt = plugin.generate_prompt(collate(exs), ctx)
    ids, mask = plugin.encode_batch(exs, CPU)
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = hidden[torch.arange(len(exs)), mask.sum(1) - 1]
    torch.testing.assert_close(prompt.detach(), ref, rtol=0, atol=1e-5)

    # and the plugin's own save_pretrained round-trips too
    out = tmp_path / "again"
    plugin.save_pretrained(str(out))
    again = QwenPrompt(pretrained=str(out), encoding="text")
    again.configure(Context(device=CPU))
    torch.testing.assert_close(again.generate_prompt(collate(exs), ctx), prompt, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ last-layer shortcut


@pytest.mark.parametrize("batching,attn", [("padded", "sdpa"), ("per_example", "sdpa"), ("padded", "eager")])
def test_last_layer_shortcut_same_prompt_and_grads_as_full_forward(batching, attn):
    """The shortcut (final layer at the pooled token only) against transformers' full forward,
    on a padded batch of different lengths: same prompts, same gradients for every parameter
    (eager attention takes another mask format from transformers' mask helper)."""
    exs = mixed_examples()
    out = []
    for shortcut in (False, True):
        plugin, ctx = configured(seed=3, num_layers=3, batching=batching, last_layer_shortcut=shortcut,
                                 attn_implementation=attn)
        assert (plugin._shortcut_layer is not None) == shortcut
        prompt = plugin.generate_prompt(collate(exs), ctx)
        assert plugin._shortcut_ran == shortcut  # the shortcut really ran (or really did not)
        (prompt * torch.linspace(-1, 1, prompt.shape[1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in plugin.model.named_parameters() if p.grad is not None}
        out.append((prompt.detach(), grads))
    (full, full_grads), (short, short_grads) = out
    torch.testing.assert_close(short, full, rtol=0, atol=1e-5)
    assert short_grads.keys() == full_grads.keys()
    for name, g in full_grads.items():
        torch.testing.assert_close(short_grads[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_last_layer_shortcut_under_bf16_autocast():
    """Under bf16 autocast (precision: bf16-mixed) the shortcut's prompt is float32 and as close to
    the fp32 prompt as the full forward's is, with gradients to the last layer."""
    exs = mixed_examples()
    prompts = {}
    for shortcut, precision in ((False, "fp32"), (False, "bf16"), (True, "bf16")):
        plugin, ctx = configured(seed=3, num_layers=2, batching="padded", last_layer_shortcut=shortcut)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            prompt = plugin.generate_prompt(collate(exs), ctx)
        assert plugin._shortcut_ran == shortcut and prompt.dtype == torch.float32
        prompt.square().sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in plugin.model.layers[-1].parameters())
        prompts[shortcut, precision] = prompt.detach()
    ref = prompts[False, "fp32"]
    full_err = (prompts[False, "bf16"] - ref).abs().max()
    short_err = (prompts[True, "bf16"] - ref).abs().max()
    assert 0 < full_err < 0.1 and short_err < 2 * full_err


def test_last_layer_shortcut_leaves_the_model_itself_unchanged():
    """Outside the plugin's own forward the model is transformers' model as it was: full output,
    same state_dict keys, no module's forward replaced (also after a forward with the shortcut)."""
    from transformers import Qwen2Model
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

    plugin, ctx = configured(num_layers=2)
    plain, _ = configured(num_layers=2, last_layer_shortcut=False)
    assert plugin._shortcut_layer is not None
    plugin.generate_prompt(collate(mixed_examples()), ctx)
    assert plugin._shortcut_ran
    assert type(plugin.model) is Qwen2Model
    assert all(type(layer) is Qwen2DecoderLayer for layer in plugin.model.layers)
    for name, m in plugin.model.named_modules():
        assert "forward" not in vars(m), f"{name or 'the model'} has an instance attribute 'forward'"
    assert plugin.model.state_dict().keys() == plain.model.state_dict().keys()
    ids, mask = plugin.encode_batch(mixed_examples(), CPU)
    with torch.no_grad():
        a = plugin.model(input_ids=ids, attention_mask=mask).last_hidden_state
        b = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert a.shape == b.shape == (*ids.shape, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(pooling="mean"), dict(gradient_checkpointing=True), dict(last_layer_shortcut=False)])
def test_last_layer_shortcut_off_where_it_does_not_apply(kw):
    plugin, ctx = configured(**kw)
    assert plugin._shortcut_layer is None
    plugin.generate_prompt(collate(mixed_examples()), ctx)
    assert not plugin._shortcut_ran


def test_last_layer_shortcut_not_used_when_compiled():
    plugin, ctx = configured()
    assert plugin._shortcut_applies()
    (group,) = plugin.parameter_groups(ctx)
    group.modules[0].compile()  # what compile: true does; nothing is compiled until a call
    assert not plugin._shortcut_applies()
