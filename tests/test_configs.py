"""Every shipped config validates, and the GPU config runs (on CPU, with a tiny saved Qwen2)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import REPO

from arcfw.core.config import load_config
from arcfw.core.engine.engine import Engine

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path, tmp_path):
    # the GPU config points at a model folder the test machine doesn't have: give it one that exists
    cfg = load_config(path, {"plugins.prompt.pretrained": str(tmp_path)} if "gpu" in path.name else {})
    assert cfg["plugins"]["prompt"]["name"] == "qwen"


def save_tiny_qwen(folder: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from arcfw.plugins.qwen import build_grid_tokenizer

    tok = build_grid_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_gpu_config_trains_a_pretrained_qwen_in_bf16(tmp_path, batches):
    save_tiny_qwen(tmp_path / "qwen")
    cfg = load_config(REPO / "configs/qwen2.5-0.5b-gpu.yaml", {
        "device": "cpu", "plugins.prompt.pretrained": str(tmp_path / "qwen"), "plugins.prompt.max_tokens": 1024,
        "plugins.predictor.dim": 8, "plugins.predictor.layers": 2, "plugins.refine.hidden": 16,
        "optimizer.lr.qwen": 1e-3,
    })
    eng = Engine.from_config(cfg)
    assert eng.precision.mode == "bf16-mixed" and eng.precision.scaler is None
    qwen = eng.plugins["qwen"].model
    assert all(p.dtype == torch.float32 for p in qwen.parameters())  # fp32 master weights
    before = qwen.layers[0].mlp.gate_proj.weight.detach().clone()
    for b in batches(2):
        m = eng.train_step(b)
        assert math.isfinite(m["loss"])
    assert not torch.equal(before, qwen.layers[0].mlp.gate_proj.weight)  # the pretrained model is being trained


def test_threads_sets_torch_cpu_threads(make_engine):
    before = torch.get_num_threads()
    try:
        make_engine({"threads": 1})
        assert torch.get_num_threads() == 1
        make_engine({"threads": 2})
        assert torch.get_num_threads() == 2
        torch.set_num_threads(before)
        make_engine()  # null: left as it is
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_set_plugin_name_switches_plugin_and_drops_the_old_parameters(monkeypatch):
    """--set plugins.ROLE.name=other starts a fresh section: the default config's rl_policy parameters
    (reward_scale, init_std) do not follow the switch, where they would be unknown parameters of the
    new plugin; --set options of that section, before or after the switch, go to the new plugin."""
    monkeypatch.syspath_prepend(str(REPO / "examples/histogram_refine"))
    cfg = load_config(REPO / "configs/default.yaml", [
        "plugins.refine.hidden=16",  # before the switch: still applies to the new plugin
        "plugins.refine.name=histogram_refine:HistogramRefine",
        "plugins.refine.lr=0.01",
    ])
    assert cfg["plugins"]["refine"] == {"name": "histogram_refine:HistogramRefine", "hidden": 16, "lr": 0.01}


def test_set_plugin_name_to_the_same_plugin_keeps_its_parameters():
    cfg = load_config(REPO / "configs/default.yaml", ["plugins.prompt.name=qwen", "plugins.prompt.num_layers=1"])
    prompt = cfg["plugins"]["prompt"]
    assert prompt["name"] == "qwen" and prompt["num_layers"] == 1 and prompt["hidden_size"] == 64
