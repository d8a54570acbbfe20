"""Qwen2 prompt model: a transformers ``Qwen2Model`` reads an example's demonstrations and query input.

The prompt role.  The model is random (a :class:`~transformers.Qwen2Config` with the plugin's
sizes, initialised from the global torch RNG) or loaded with ``AutoModel.from_pretrained`` from a
local folder (float32 master weights; nothing is downloaded).  The query's output grid is never read.

**Encodings** (``encoding``):

- ``"cells"`` (default): one token per cell.  Every output cell of every demonstration pair
  carries its output colour, the colour of each view of the pair's input at that cell
  (:mod:`arcfw.core.data.views`), whether each view equals the output there, its position, segment
  and pair (:func:`cell_features`); then every query input cell (output unknown); then a summary
  token.  The token embeddings are the plugin's own (:class:`CellEmbedding`, the sum of the
  features' embeddings), fed to the model as ``inputs_embeds``; :class:`_CellEncoder` holds the
  embedding and the model.  The hook returns a :class:`TaskEncoding`: the prompt ``[B, D]`` (the
  summary token's final state, or the mean over the tokens) and every token's state ``[B, T, D]``,
  with each token's view colours and output colour in ``meta``.  An example longer than
  ``max_tokens`` loses whole demonstration pairs from the front (never the query), counted in the
  metric ``demos_dropped`` and warned about once.
- ``"text"``: each example as one token sequence::

      for every demo pair:  <in> rows <out> rows
      then the query:       <query> <in> rows <out>

  where a grid's rows are its colour digits each followed by a row end ``"\\n"``.  Without
  ``pretrained`` the vocabulary is the compact grid vocabulary of :func:`build_grid_tokenizer`
  (16 tokens); with it, the checkpoint's own tokenizer, every symbol (a colour, the row end, a
  marker) mapped to its token ids once, so an example's ids are a concatenation of per-symbol ids.
  Longer than ``max_tokens``: whole demo pairs are dropped from the front; a query alone still too
  long keeps its last ``max_tokens`` ids.  The ids run through :class:`_TextEncoder` and the hook returns the
  prompt ``[B, D]``: the final hidden state of the last token, or the masked mean.

**Prompt cache** (``cache_every``, default 10).  The cache is keyed *per example*
(``example.key``, checked against a digest of its grids), so one example's prompt is never reused
for another one.

- *Qwen trainable*: a training step reuses an example's prompt while it is younger than
  ``cache_every`` optimizer steps, then recomputes it (a *refresh*).  A reused prompt is stale and
  carries **no gradient**: Qwen learns only from the prompts recomputed in a step.  When every
  prompt of a batch comes from the cache, the plugin puts ``"qwen"`` in ``ctx.no_grad_groups``, so
  the first-step path check, the zero-gradient watch and the health monitor do not count that step
  against Qwen, and the optimizer leaves Qwen untouched (no gradient, so no update and no weight
  decay).  Staleness (steps since the prompt was computed) is at most ``cache_every - 1``.
- *Qwen frozen* (``optimizer.lr.qwen: 0``): a cached prompt is exact, so it is reused for as long
  as Qwen's weights stay the same (checked with the parameters' identities and version counters,
  so loading other weights invalidates it).
- ``cache_every: 1`` turns the cache off; evaluation (``ctx.training`` False) never uses it, and
  neither does a run of several processes (a rank that skipped Qwen's forward would leave the
  others waiting in DDP's or FSDP's collectives).  ``post_step_update`` reports ``prompt_cached``
  (share of the batch's prompts taken from the cache) and ``prompt_staleness`` (largest age of a
  reused stale prompt, in steps).  Young entries go into checkpoints, so a resumed run reuses the
  same prompts as the uninterrupted one.

A prompt is only reused when *the same example* comes back within ``cache_every`` steps.  Where
that happens, the figures and the design's history (the original script's cache, a KV-prefix cache
that was not built) are in ``benchmarks/README.md``.

**Batching** (``batching``): ``"padded"`` runs one forward over the right-padded batch with an
attention mask; ``"per_example"`` runs one unpadded forward per example (the same prompts: padding
is masked out either way).  ``"auto"`` (the default) picks ``"per_example"`` on CPU, where a
padded, masked batch is slower per example, and ``"padded"`` elsewhere.

**Last-layer shortcut** (encoding ``"text"``, ``last_layer_shortcut``, default on).  With
``pooling: "last"`` the prompt is the final layer's output at one position per example.
:class:`_TextEncoder`, the parameter group's module (the one DDP wraps and FSDP shards; its
parameters and ``state_dict`` are the model's), then runs the forward itself: the token embedding,
transformers' own causal mask (``masking_utils.create_causal_mask``), the rotary embeddings and
every decoder layer but the last, each called as ``Qwen2Model.forward`` calls it; the final layer
for the pooled positions only (:func:`_last_token_layer`: its keys and values for every token, its
attention, MLP and residuals for the pooled token alone); then the final norm.  No transformers
module is modified: ``self.model`` is transformers' model as loaded.  The prompt and its gradients
are the full forward's (to float rounding; tested padded, per example, with sdpa and eager
attention, and under bf16 autocast).  The full forward runs instead with ``pooling: "mean"``,
``gradient_checkpointing``, ``compile: true``, a model other than a plain ``Qwen2Model`` whose
layers are all ``Qwen2DecoderLayer``, sliding-window attention, attention dropout in the last layer, a
transformers without a mask helper this code can call, and under FSDP (each decoder layer is
sharded on its own and gathers its parameters only when called).  ``benchmarks/README.md`` has the
speed figures.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arcfw.core.data.batch import NUM_COLOURS, Batch, Example
from arcfw.core.data.tasks import MAX_SIDE
from arcfw.core.data.views import NO_CELL, NUM_VIEWS, grid_views
from arcfw.core.engine.context import Context, Metric, ParamGroup, TaskEncoding
from arcfw.core.engine.distributed import unwrap
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.errors import PluginError, first_line

#: marker texts of the serialisation (tokens of the compact vocabulary; plain text for other tokenizers)
IN_MARK = "<in>"
OUT_MARK = "<out>"
QUERY_MARK = "<query>"
ROW_END = "\n"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

POOLINGS = ("last", "mean")
ENCODINGS = ("cells", "text")
BATCHINGS = ("auto", "padded", "per_example")
#: name of this plugin's parameter group (the one put in ``ctx.no_grad_groups`` on fully cached steps)
GROUP = "qwen"
#: tokenizer_config.json classes that mean "load tokenizer.json as it is"
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def build_grid_tokenizer():
    """The compact grid vocabulary as a real Hugging Face tokenizer, built offline.

    Tokens: ``<pad>`` (0, the pad token), ``<unk>`` (1), the colours ``"0"``..``"9"``
    (2..11), the row end ``"\\n"`` (12), ``<in>`` (13), ``<out>`` (14), ``<query>`` (15).
    A WordLevel model over single characters; the markers are special tokens.
    Returns a ``PreTrainedTokenizerFast`` that ``save_pretrained`` / ``AutoTokenizer``
    round-trip.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD_TOKEN: 0, UNK_TOKEN: 1}
    for c in range(NUM_COLOURS):
        vocab[str(c)] = len(vocab)
    for sym in (ROW_END, IN_MARK, OUT_MARK, QUERY_MARK):
        vocab[sym] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[ \t\r]+"), behavior="removed"),
            pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated"),  # one piece per character
        ]
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        extra_special_tokens=[IN_MARK, OUT_MARK, QUERY_MARK],
    )

# --------------------------------------------------------------------------- the cell encoding
#
# One token per cell.  A token's embedding is the sum of the embeddings of its features (one
# table, an EmbeddingBag): the colour of every view of the pair's input at this cell
# (arcfw.core.data.views), the output colour, whether each view's colour equals the output colour,
# the position counted from each edge, the segment (demonstration, query, summary) and the pair.
#: output colour of a query token: not known (never shown)
UNKNOWN_OUT = NUM_COLOURS + 1
SEG_DEMO, SEG_QUERY, SEG_SUMMARY = 0, 1, 2
MAX_PAIRS = 16
_OFF_VIEW = 1  # index 0 is the EmbeddingBag's padding (an absent feature)
_OFF_OUT = _OFF_VIEW + NUM_VIEWS * (NO_CELL + 1)
_OFF_EQ = _OFF_OUT + NUM_COLOURS + 2
_OFF_POS = _OFF_EQ + NUM_VIEWS * 3
_OFF_SEG = _OFF_POS + 4 * MAX_SIDE
_OFF_PAIR = _OFF_SEG + 3
CELL_VOCAB = _OFF_PAIR + MAX_PAIRS
#: features per token: views, output colour, view == output, 4 positions, segment, pair
CELL_FEATURES = NUM_VIEWS + 1 + NUM_VIEWS + 4 + 1 + 1


def cell_features(inp: np.ndarray, out: np.ndarray | None, pair: int, segment: int) -> np.ndarray:
    """Feature indices ``[h*w, CELL_FEATURES]`` of the tokens of one grid pair, row-major.

    A demonstration pair (``out`` given) has one token per *output* cell, carrying every
    view of its input at that cell, the output colour and which views agree with it.  A
    query (``out`` None) has one token per *input* cell: its views onto itself, output unknown.
    """
    shape = out.shape if out is not None else inp.shape
    h, w = int(shape[0]), int(shape[1])
    views = grid_views(inp, (h, w)).reshape(NUM_VIEWS, -1).T  # [n, K]
    n = h * w
    k = np.arange(NUM_VIEWS)
    f = np.empty((n, CELL_FEATURES), dtype=np.int64)
    f[:, :NUM_VIEWS] = _OFF_VIEW + k * (NO_CELL + 1) + views
    if out is not None:
        o = np.asarray(out, dtype=np.int64).reshape(-1)
        f[:, NUM_VIEWS] = _OFF_OUT + o
        eq = (views == o[:, None]).astype(np.int64)
    else:
        f[:, NUM_VIEWS] = _OFF_OUT + UNKNOWN_OUT
        eq = np.full((n, NUM_VIEWS), 2, dtype=np.int64)
    f[:, NUM_VIEWS + 1: 2 * NUM_VIEWS + 1] = _OFF_EQ + k * 3 + eq
    r, c = np.divmod(np.arange(n), w)
    base = 2 * NUM_VIEWS + 1
    for j, pos in enumerate((r, c, h - 1 - r, w - 1 - c)):
        f[:, base + j] = _OFF_POS + j * MAX_SIDE + pos
    f[:, base + 4] = _OFF_SEG + segment
    f[:, base + 5] = _OFF_PAIR + min(pair, MAX_PAIRS - 1)
    return f


def summary_features(pair: int) -> np.ndarray:
    """The last token of an example (its state is the pooled prompt): segment and pair only."""
    f = np.zeros((1, CELL_FEATURES), dtype=np.int64)
    f[0, 0] = _OFF_SEG + SEG_SUMMARY
    f[0, 1] = _OFF_PAIR + min(pair, MAX_PAIRS - 1)
    return f


class CellEmbedding(nn.Module):
    """Token embeddings of the cell encoding: the sum of its features' embeddings, ``[n, D]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(CELL_VOCAB, dim, mode="sum", padding_idx=0)
        nn.init.normal_(self.bag.weight, std=0.02)
        with torch.no_grad():
            self.bag.weight[0].zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.bag(features)


@dataclass
class _CellSequence:
    """An example's cell tokens: feature indices ``[T, F]`` and how many demonstration pairs were dropped."""

    features: np.ndarray
    dropped: int
    views: np.ndarray | None = None  # [T, NUM_VIEWS] the view colours of every token (NO_CELL for none)
    outputs: np.ndarray | None = None  # [T] the output colour of every token (demonstrations only, else UNKNOWN_OUT)


@dataclass
class _CachedPrompt:
    """One example's prompt, kept for reuse (see the module docstring)."""

    fingerprint: int
    step: int  # ctx.step when it was computed
    weights: int | None  # stamp of a frozen Qwen's parameters when it was computed (None: Qwen trained, or restored)
    prompt: torch.Tensor  # [D], detached
    tokens: torch.Tensor | None = None  # [T, D], detached (cell encoding)


class _CellEncoder(nn.Module):
    """The cell embedding and the Qwen2 model as one module (one parameter group, one DDP wrapper).

    ``forward(features [B, T, F], attention_mask [B, T] or None)`` -> last hidden states ``[B, T, D]``.
    """

    def __init__(self, model: nn.Module, embed: CellEmbedding):
        super().__init__()
        self.model = model
        self.embed = embed

    def forward(self, features: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, F_ = features.shape
        x = self.embed(features.reshape(B * T, F_)).view(B, T, -1)
        return self.model(inputs_embeds=x, attention_mask=attention_mask, use_cache=False).last_hidden_state


# --------------------------------------------------------------------------- the text encoding


def _causal_mask_builder() -> Any:
    """transformers' own causal-mask helper (``masking_utils.create_causal_mask``, the one
    ``Qwen2Model.forward`` calls) as ``build(config, embeds, attention_mask, position_ids)``, with this
    transformers version's argument names; None when the installed version has no such helper or it
    asks for an argument this code does not know (the last-layer shortcut is then off)."""
    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError:
        return None
    params = inspect.signature(create_causal_mask).parameters
    embeds = next((n for n in ("inputs_embeds", "input_embeds") if n in params), None)
    cache = next((n for n in ("cache", "past_key_values") if n in params), None)
    known = {"config", embeds, "attention_mask", cache, "position_ids", "cache_position"}
    if embeds is None or cache is None or any(p.default is p.empty and n not in known for n, p in params.items()):
        return None

    def build(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> Any:
        kwargs: dict[str, Any] = {"config": config, embeds: hidden, "attention_mask": attention_mask, cache: None}
        if "position_ids" in params:
            kwargs["position_ids"] = position_ids
        if "cache_position" in params:  # transformers 4.x
            kwargs["cache_position"] = position_ids[0]
        return create_causal_mask(**kwargs)

    return build


def _last_token_layer(layer: nn.Module, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                      last: torch.Tensor) -> torch.Tensor:
    """A ``Qwen2DecoderLayer`` evaluated at position ``last[b]`` of each row only: ``[B, 1, D]``.

    Same arithmetic as the layer's own forward at that position: RMSNorm, q/k/v
    projections, rotary embedding, grouped-query attention over the positions up
    to ``last[b]`` (causal; right padding lies after it), output projection,
    residual, RMSNorm, MLP, residual.
    """
    from transformers.models.qwen2.modeling_qwen2 import repeat_kv, rotate_half

    attn = layer.self_attn
    B, L, _ = hidden.shape
    hd = attn.head_dim
    rows = torch.arange(B, device=hidden.device)
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[rows, last]).view(B, 1, -1, hd).transpose(1, 2)  # [B, H, 1, hd]
    k = attn.k_proj(x).view(B, L, -1, hd).transpose(1, 2)  # [B, H_kv, L, hd]
    v = attn.v_proj(x).view(B, L, -1, hd).transpose(1, 2)
    cos, sin = (t.expand(B, -1, -1) for t in position_embeddings)  # [B, L, hd]
    cos_q, sin_q = cos[rows, last][:, None, None], sin[rows, last][:, None, None]
    q = q * cos_q + rotate_half(q) * sin_q
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    k, v = repeat_kv(k, attn.num_key_value_groups), repeat_kv(v, attn.num_key_value_groups)
    visible = (torch.arange(L, device=hidden.device)[None, :] <= last[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=visible, scale=attn.scaling)
    h = hidden[rows, last].unsqueeze(1) + attn.o_proj(o.transpose(1, 2).reshape(B, 1, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


class _TextEncoder(nn.Module):
    """The Qwen2 model of the ``text`` encoding as the parameter group's module (the one DDP wraps
    and FSDP shards), with the last-layer shortcut.

    It registers the model's children (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``) under
    their own names, so its parameters, ``state_dict`` and checkpoints are exactly the model's; the
    model itself (``self.qwen``, not a child) stays transformers' module, unchanged.

    ``forward(input_ids, attention_mask, last=None)``:

    - without ``last``: transformers' forward, the final hidden states ``[B, L, D]``;
    - with ``last`` (``[B]``, the pooled position of each row): the final hidden state at those
      positions ``[B, D]``, computed as ``Qwen2Model.forward`` computes it for every layer but the
      last (token embedding, transformers' causal mask, rotary embeddings, each decoder layer called
      as the model calls it), the final layer at the pooled positions only
      (:func:`_last_token_layer`), then the final norm.  The caller passes ``last`` only where that
      is exact (:meth:`QwenPrompt._shortcut_applies`).
    """

    def __init__(self, model: nn.Module, mask_builder: Any = None):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "qwen", model)  # a plain reference: its modules are registered above
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP shards each decoder layer
        self._mask_builder = mask_builder

    def train(self, mode: bool = True) -> _TextEncoder:
        super().train(mode)
        self.qwen.train(mode)  # the model's own flag too (its children are already done)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                last: torch.Tensor | None = None) -> torch.Tensor:
        model = self.qwen
        if last is None:
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        hidden = model.embed_tokens(input_ids)
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = self._mask_builder(model.config, hidden, attention_mask, position_ids)
        position_embeddings = model.rotary_emb(hidden, position_ids)
        for layer in model.layers[:-1]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings)
        hidden = _last_token_layer(model.layers[-1], hidden, position_embeddings, last)  # [B, 1, D]
        return model.norm(hidden)[:, 0]


class QwenPrompt(Plugin):
    """Prompt embedding from a Qwen2 model reading the serialised demos and query input.

    Parameters (YAML ``params``):

    - ``pretrained``: local folder or hub name for ``from_pretrained`` (model and
      tokenizer).  When set, the size parameters below are ignored.
    - ``trust_remote_code``: passed to both ``from_pretrained`` calls.
    - ``hidden_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``,
      ``intermediate_size``: sizes of the randomly initialised model.
    - ``encoding``: ``"cells"`` (one token per cell, the default) or ``"text"`` (serialised grids); module docstring.
    - ``max_tokens``: longest token sequence per example.  Longer examples lose
      whole demo pairs from the front until they fit; if the query alone is
      still too long, only its last ``max_tokens`` ids are kept (the end of the
      query input and the final ``<out>`` marker).
    - ``pooling``: ``"last"`` (hidden state of the last real token; attention is
      causal, so it has seen the whole sequence) or ``"mean"`` (masked mean).
    - ``gradient_checkpointing``: recompute activations in the backward pass.
    - ``attn_implementation``: ``"sdpa"``, ``"eager"``, ... (as transformers names it).
    - ``cache_every``: reuse an example's prompt for fewer than this many steps
      (1: no cache); the gradient semantics are in the module docstring.
    - ``batching``: ``"auto"``, ``"padded"`` or ``"per_example"`` (module docstring).
    - ``last_layer_shortcut``: with ``encoding: "text"`` and ``pooling: "last"``, compute the final
      layer for the pooled token only (exact; module docstring).  ``false`` always runs the full forward.
    """

    name = "qwen"
    role = "prompt"
    description = "Qwen2 (transformers) over serialised demo pairs and query input; pooled hidden state as prompt"
    metrics = (
        Metric("qwen_grad", console=30, fmt=".4g", plot="Qwen gradient norm", grad_norm_of=(GROUP,)),
        Metric("demos_dropped", epoch="sum"),  # demonstration pairs the token budget left out (encoding "cells")
    )

    def __init__(
        self,
        pretrained: str | None = None,
        trust_remote_code: bool = False,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 128,
        max_tokens: int = 4608,
        encoding: str = "cells",
        pooling: str = "last",
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        cache_every: int = 10,
        batching: str = "auto",
        last_layer_shortcut: bool = True,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(repr(e) for e in ENCODINGS)}, got {encoding!r}")
        if encoding == "cells" and max_tokens < MAX_SIDE * MAX_SIDE + 1:
            raise ValueError(
                f"max_tokens must be at least {MAX_SIDE * MAX_SIDE + 1} with encoding 'cells' (a 30x30 query input "
                f"and the summary token), got {max_tokens}"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(repr(p) for p in POOLINGS)}, got {pooling!r}")
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(repr(b) for b in BATCHINGS)}, got {batching!r}")
        if cache_every < 1:
            raise ValueError(f"cache_every must be at least 1 (1 turns the prompt cache off), got {cache_every}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if pretrained is None:
            for key, value in (
                ("hidden_size", hidden_size),
                ("num_layers", num_layers),
                ("num_heads", num_heads),
                ("num_kv_heads", num_kv_heads),
                ("intermediate_size", intermediate_size),
            ):
                if value < 1:
                    raise ValueError(f"{key} must be at least 1, got {value}")
            if hidden_size % num_heads:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
            if num_heads % num_kv_heads:
                raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads ({num_kv_heads})")
            if (hidden_size // num_heads) % 2:
                raise ValueError(f"head size hidden_size/num_heads ({hidden_size // num_heads}) must be even (rotary)")
        if pretrained is not None:
            pretrained = os.path.expanduser(pretrained)
            if pretrained.startswith(("/", "./", "../")) and not os.path.isdir(pretrained):
                raise ValueError(f"pretrained model folder does not exist: {pretrained}")
        self.pretrained = pretrained
        self.trust_remote_code = trust_remote_code
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.intermediate_size = intermediate_size
        self.max_tokens = max_tokens
        self.encoding = encoding
        self.pooling = pooling
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.cache_every = cache_every
        self.batching = batching
        self._per_example = batching == "per_example"  # "auto" is resolved in configure
        self.last_layer_shortcut = bool(last_layer_shortcut)
        self._shortcut_layer: nn.Module | None = None  # the final decoder layer, when the shortcut applies
        self._shortcut_ran = False  # whether the last text-encoding forward took the shortcut

        self.model: nn.Module | None = None
        self.encoder: _CellEncoder | None = None  # encoding "cells": the cell embedding and the model, one module
        self.text_encoder: _TextEncoder | None = None  # encoding "text": the model's forward with the shortcut
        self._dropped_warned = False
        self._last_dropped: int | None = None  # demonstration pairs the token budget dropped, last step
        self.tokenizer: Any = None
        self.pad_id: int = 0
        self._colour_ids: list[list[int]] = []
        self._row_end_ids: list[int] = []
        self._in_ids: list[int] = []
        self._out_ids: list[int] = []
        self._query_ids: list[int] = []
        self._lut: np.ndarray | None = None  # colour -> id when every colour and the row end are one token
        self._row_end_id: int | None = None
        #: example.key -> (fingerprint of the grids, ids)
        self._cache: dict[str, tuple[int, list[int]]] = {}
        #: example.key -> its prompt, for reuse (cache_every > 1)
        self._prompts: dict[str, _CachedPrompt] = {}
        self._prompts_weights: int | None = None  # weights stamp at the last eviction
        self._last_use: tuple[int, int, int] | None = None  # (reused, batch size, staleness) of the last step

    # ------------------------------------------------------------------ setup

    @hookimpl
    def configure(self, ctx: Context) -> None:
        from transformers import AutoModel, Qwen2Config, Qwen2Model

        if self.pretrained is not None:
            try:
                self.tokenizer = self._load_tokenizer()
                model = AutoModel.from_pretrained(
                    self.pretrained,
                    trust_remote_code=self.trust_remote_code,
                    dtype=torch.float32,
                    attn_implementation=self.attn_implementation,
                )
            except (OSError, ValueError) as exc:  # not found, no network, not a model folder
                raise PluginError(
                    f"qwen: cannot load pretrained model '{self.pretrained}' (plugins.prompt.pretrained): {first_line(exc)}. "
                    "arcfw never downloads at run time: point it to a local folder saved with save_pretrained"
                ) from None
        else:
            self.tokenizer = build_grid_tokenizer()
            config = Qwen2Config(
                vocab_size=len(self.tokenizer) if self.encoding == "text" else 1,  # cells: embeddings are ours
                hidden_size=self.hidden_size,
                intermediate_size=self.intermediate_size,
                num_hidden_layers=self.num_layers,
                num_attention_heads=self.num_heads,
                num_key_value_heads=self.num_kv_heads,
                max_position_embeddings=self.max_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                use_cache=False,
                attn_implementation=self.attn_implementation,
            )
            model = Qwen2Model(config)  # initialised from the global torch RNG
        model = model.to(device=ctx.device, dtype=torch.float32)
        if self.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:  # transformers < 5.x
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        self.model = model
        if self.batching == "auto":
            self._per_example = ctx.device.type == "cpu"
        if self.encoding == "cells":
            # the model reads our cell embeddings (inputs_embeds); its token table is never used
            model.get_input_embeddings().weight.requires_grad_(False)
            self.encoder = _CellEncoder(model, CellEmbedding(int(model.config.hidden_size))).to(ctx.device)
            self.encoder.train()
            self._cache.clear()
            self._prompts.clear()
        else:
            self._build_symbol_ids()
            self._shortcut_layer = self._shortcut_layer_of(model)
            self.text_encoder = _TextEncoder(model, _causal_mask_builder() if self._shortcut_layer is not None else None)
        ctx.prompt_dim = int(model.config.hidden_size)
        ctx.token_dim = int(model.config.hidden_size) if self.encoding == "cells" else 0  # text: a bare prompt

    def _load_tokenizer(self) -> Any:
        """``AutoTokenizer.from_pretrained``, except for a local folder whose tokenizer_config.json
        declares the generic class (``TokenizersBackend`` / ``PreTrainedTokenizerFast``, as the compact
        grid tokenizer does): its tokenizer.json is then loaded as saved.  transformers 5 would
        otherwise rebuild the tokenizer of a ``qwen2`` checkpoint as a byte-level ``Qwen2Tokenizer``,
        which drops the compact vocabulary's row end."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        path = self.pretrained
        config_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(config_file) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            with open(config_file, encoding="utf-8") as f:
                declared = json.load(f).get("tokenizer_class")
            if declared in GENERIC_TOKENIZER_CLASSES:
                return PreTrainedTokenizerFast.from_pretrained(path)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust_remote_code)

    def _build_symbol_ids(self) -> None:
        """Map every symbol to its token ids, once."""
        tok = self.tokenizer

        def enc(text: str) -> list[int]:
            ids = [int(i) for i in tok.encode(text, add_special_tokens=False)]
            if not ids or tok.decode(ids) != text:
                raise ValueError(
                    f"tokenizer {type(tok).__name__} of {self.pretrained!r} cannot represent {text!r} "
                    f"(ids {ids} decode to {tok.decode(ids)!r})"
                )
            return ids

        self._colour_ids = [enc(str(c)) for c in range(NUM_COLOURS)]
        self._row_end_ids = enc(ROW_END)
        self._in_ids = enc(IN_MARK)
        self._out_ids = enc(OUT_MARK)
        self._query_ids = enc(QUERY_MARK)
        pad = tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0  # masked out: its value never matters

        if all(len(c) == 1 for c in self._colour_ids) and len(self._row_end_ids) == 1:
            self._lut = np.array([c[0] for c in self._colour_ids], dtype=np.int64)
            self._row_end_id = self._row_end_ids[0]
        else:
            self._lut, self._row_end_id = None, None

        used = [*(i for c in self._colour_ids for i in c), *self._row_end_ids, *self._in_ids, *self._out_ids,
                *self._query_ids, self.pad_id]
        n_embed = self.model.get_input_embeddings().num_embeddings
        if max(used) >= n_embed:
            raise ValueError(
                f"tokenizer id {max(used)} is outside the model's embedding table ({n_embed} rows): "
                "tokenizer and model do not belong together"
            )
        self._cache.clear()
        self._prompts.clear()

    @hookimpl
    def parameter_groups(self, ctx: Context) -> list[ParamGroup]:
        if self.encoder is not None:
            params = [p for p in self.encoder.parameters() if p.requires_grad]
            return [ParamGroup(name=GROUP, params=params, lr=3e-4, modules=[self.encoder], module_attr="encoder")]
        return [ParamGroup(name=GROUP, params=list(self.text_encoder.parameters()), lr=3e-4, modules=[self.text_encoder],
                           module_attr="text_encoder")]

    # ------------------------------------------------------------------ serialisation

    def _grid_ids(self, grid: np.ndarray) -> list[int]:
        g = np.asarray(grid)
        if g.ndim != 2:
            raise ValueError(f"a grid must be 2-D, got shape {g.shape}")
        h, w = g.shape
        if self._lut is not None:
            out = np.empty((h, w + 1), dtype=np.int64)
            out[:, :w] = self._lut[g]
            out[:, w] = self._row_end_id
            return out.ravel().tolist()
        ids: list[int] = []
        colour_ids, row_end = self._colour_ids, self._row_end_ids
        for row in g.tolist():
            for v in row:
                ids.extend(colour_ids[v])
            ids.extend(row_end)
        return ids

    def _serialise(self, example: Example) -> list[int]:
        demos = [self._in_ids + self._grid_ids(p.input) + self._out_ids + self._grid_ids(p.output)
                 for p in example.demos if p.output is not None]
        query = self._query_ids + self._in_ids + self._grid_ids(example.query.input) + self._out_ids
        budget = self.max_tokens
        if len(query) >= budget:
            return query[-budget:]
        total = len(query) + sum(len(d) for d in demos)
        start = 0
        while total > budget:  # drop whole demo pairs from the front
            total -= len(demos[start])
            start += 1
        ids: list[int] = []
        for d in demos[start:]:
            ids.extend(d)
        ids.extend(query)
        return ids

    @staticmethod
    def _fingerprint(example: Example) -> int:
        """A digest of the grids the prompt reads, stable across processes (it goes into checkpoints)."""
        grids: list[Any] = [example.query.input]
        for p in example.demos:
            grids.extend((p.input, p.output))
        h = hashlib.blake2b(digest_size=8)
        for g in grids:
            if g is None:
                h.update(b"-")
            else:
                h.update(repr(np.shape(g)).encode())
                h.update(np.ascontiguousarray(g, dtype=np.int64).tobytes())
        return int.from_bytes(h.digest(), "little")

    def token_ids(self, example: Example) -> list[int]:
        """The example's token ids (demos then query input; never the query output), cached per ``example.key``.

        The cache entry is checked against a fingerprint of the grids, so an
        example that comes back changed under the same key (augmentation) is
        serialised again.
        """
        fp = self._fingerprint(example)
        hit = self._cache.get(example.key)
        if hit is not None and hit[0] == fp:
            return hit[1]
        ids = self._serialise(example)
        self._cache[example.key] = (fp, ids)
        return ids

    def cell_sequence(self, example: Example) -> _CellSequence:
        """The example's cell tokens (encoding ``"cells"``): every demonstration pair that fits in
        ``max_tokens`` (whole pairs dropped from the front otherwise), the query input, the summary
        token; cached per ``example.key`` and checked against a fingerprint of the grids."""
        fp = self._fingerprint(example)
        hit = self._cache.get(example.key)
        if hit is not None and hit[0] == fp:
            return hit[1]
        demos = [p for p in example.demos if p.output is not None]
        parts = [cell_features(p.input, p.output, i, SEG_DEMO) for i, p in enumerate(demos)]
        query = cell_features(example.query.input, None, len(demos), SEG_QUERY)
        total = len(query) + 1 + sum(len(f) for f in parts)
        start = 0
        while total > self.max_tokens:  # whole demonstration pairs, from the front; never the query
            total -= len(parts[start])
            start += 1
        seq = _CellSequence(np.concatenate([*parts[start:], query, summary_features(len(demos))]), start)
        views = seq.features[:, :NUM_VIEWS] - _OFF_VIEW - np.arange(NUM_VIEWS) * (NO_CELL + 1)
        views[-1] = NO_CELL  # the summary token has no cell
        seq.views = views
        seq.outputs = seq.features[:, NUM_VIEWS] - _OFF_OUT  # output colour; UNKNOWN_OUT for query cells
        seq.outputs[-1] = UNKNOWN_OUT
        self._cache[example.key] = (fp, seq)
        return seq

    def encode_batch(self, examples: Sequence[Example], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` ``[B, L]`` (int64) on ``device``."""
        seqs = [self.token_ids(ex) for ex in examples]
        L = max(len(s) for s in seqs)
        ids = np.full((len(seqs), L), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), L), dtype=np.int64)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
            mask[b, : len(s)] = 1
        return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)

    # ------------------------------------------------------------------ the step

    @hookimpl
    def generate_prompt(self, batch: Batch, ctx: Context) -> torch.Tensor | TaskEncoding:
        if self.model is None:
            raise RuntimeError("QwenPrompt.generate_prompt called before configure")
        self._note_dropped(batch.examples, ctx)
        if self.cache_every == 1 or not ctx.training or ctx.world_size > 1:
            self._last_use = None
            return self._assemble(*self._encode(batch.examples, ctx.device), batch.examples)
        return self._reuse_or_encode(batch.examples, ctx)

    def _note_dropped(self, examples: Sequence[Example], ctx: Context) -> None:
        """Count the demonstration pairs the token budget dropped (metric ``demos_dropped``); warn once."""
        if self.encoding != "cells":
            self._last_dropped = None
            return
        dropped = [(ex, self.cell_sequence(ex).dropped) for ex in examples]
        self._last_dropped = sum(d for _, d in dropped)
        if self._last_dropped and not self._dropped_warned and ctx.rank == 0:
            self._dropped_warned = True
            ex, n = next((ex, d) for ex, d in dropped if d)
            import sys

            from tqdm import tqdm

            tqdm.write(
                f"warning: qwen: task {ex.task_id} needs more than max_tokens={self.max_tokens} tokens; {n} of its "
                f"demonstration pairs were left out of the prompt (whole pairs, never the query). The metric "
                "demos_dropped counts them; raise plugins.prompt.max_tokens to keep them (said once)", file=sys.stderr,
            )

    def _assemble(self, prompts: torch.Tensor, tokens: list[torch.Tensor] | None,
                  examples: Sequence[Example] = ()) -> torch.Tensor | TaskEncoding:
        """The hook's result: the prompt alone (encoding "text"), or a TaskEncoding with the token states padded."""
        if tokens is None:
            return prompts
        T = max(len(x) for x in tokens)
        if all(len(x) == T for x in tokens):
            states = torch.stack(tokens)
        else:
            states = torch.stack([F.pad(x, (0, 0, 0, T - len(x))) for x in tokens])
        mask = torch.zeros(len(tokens), T, dtype=torch.bool, device=prompts.device)
        views = np.full((len(tokens), T, NUM_VIEWS), NO_CELL, dtype=np.int64)
        outputs = np.full((len(tokens), T), UNKNOWN_OUT, dtype=np.int64)
        for b, (x, ex) in enumerate(zip(tokens, examples)):
            mask[b, : len(x)] = True
            seq = self.cell_sequence(ex)
            views[b, : len(x)] = seq.views
            outputs[b, : len(x)] = seq.outputs
        # meta: the colour of every view at every token and the demonstration output colours (UNKNOWN_OUT
        # elsewhere), for a predictor that matches cells by colour (grid_transformer)
        dev = prompts.device
        return TaskEncoding(prompt=prompts, tokens=states, token_mask=mask,
                            meta={"views": torch.from_numpy(views).to(dev), "outputs": torch.from_numpy(outputs).to(dev)})

    def _reuse_or_encode(self, examples: Sequence[Example], ctx: Context) -> torch.Tensor | TaskEncoding:
        """Prompts (and token states): cached ones where still usable, the others from Qwen (with gradient)."""
        trainable = any(p.requires_grad for p in self.model.parameters())
        weights = None if trainable else self._weights_stamp()
        self._evict(ctx.step, weights, trainable)
        fingerprints = [self._fingerprint(ex) for ex in examples]
        rows: list[_CachedPrompt | None] = []
        staleness = 0
        for ex, fp in zip(examples, fingerprints):
            hit = self._prompts.get(ex.key)
            if hit is not None and hit.fingerprint == fp:
                rows.append(hit)
                if trainable:
                    staleness = max(staleness, ctx.step - hit.step)
            else:
                rows.append(None)
        misses = [b for b, row in enumerate(rows) if row is None]
        self._last_use = (len(examples) - len(misses), len(examples), staleness)
        if not misses:
            if trainable:
                ctx.no_grad_groups.add(GROUP)  # expected: no gradient for Qwen this step
            return self._assemble(torch.stack([r.prompt for r in rows]),
                                  None if self.encoder is None else [r.tokens for r in rows], examples)
        fresh, fresh_tokens = self._encode([examples[b] for b in misses], ctx.device)
        prompts: list[torch.Tensor] = [r.prompt if r is not None else fresh[0] for r in rows]
        tokens: list[torch.Tensor] | None = None if fresh_tokens is None else [
            r.tokens if r is not None else fresh_tokens[0] for r in rows]
        for i, b in enumerate(misses):
            prompts[b] = fresh[i]
            if tokens is not None:
                tokens[b] = fresh_tokens[i]
            self._prompts[examples[b].key] = _CachedPrompt(
                fingerprints[b], ctx.step, weights, fresh[i].detach(),
                None if fresh_tokens is None else fresh_tokens[i].detach())
        if len(misses) == len(examples):
            return self._assemble(fresh, fresh_tokens, examples)
        return self._assemble(torch.stack(prompts), tokens, examples)

    def _weights_stamp(self) -> int:
        """Changes when a parameter of a frozen Qwen is replaced or changed in place (a checkpoint load).

        Only used while Qwen is frozen: fused optimizer kernels update parameters without
        bumping their version counters, so a training Qwen is judged by age alone.
        """
        params = self.encoder.parameters() if self.encoder is not None else self.model.parameters()
        return hash(tuple((id(p), p._version) for p in params))

    def _evict(self, step: int, weights: int | None, trainable: bool) -> None:
        """Drop the prompts that may not be reused at ``step``: if Qwen trains, those computed
        ``cache_every`` or more steps ago; if it is frozen, those computed with other weights."""
        if not trainable and weights == self._prompts_weights:
            return  # frozen and unchanged: every entry is still exact
        self._prompts_weights = weights
        self._prompts = {
            k: c for k, c in self._prompts.items()
            if (step - c.step < self.cache_every if trainable else c.weights == weights)
        }

    def _encode(self, examples: Sequence[Example], device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Prompts ``[n, D]`` of ``examples`` from Qwen, with gradient to its parameters, and (encoding
        "cells") each example's token states ``[T_i, D]``."""
        if self.encoder is not None:
            seqs = [torch.from_numpy(self.cell_sequence(ex).features).to(device) for ex in examples]
            if self._per_example:
                states = [self.encoder(s[None])[0] for s in seqs]
            else:
                T = max(len(s) for s in seqs)
                feats = torch.zeros(len(seqs), T, CELL_FEATURES, dtype=torch.long, device=device)
                mask = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
                for b, s in enumerate(seqs):
                    feats[b, : len(s)] = s
                    mask[b, : len(s)] = 1
                padded = self.encoder(feats, mask)
                states = [padded[b, : len(s)] for b, s in enumerate(seqs)]
            states = [s.float() for s in states]
            pooled = torch.stack([s[-1] if self.pooling == "last" else s.mean(0) for s in states])
            return pooled, states
        if self._per_example:
            return torch.cat([self._forward(*self.encode_batch([ex], device)) for ex in examples]), None
        return self._forward(*self.encode_batch(examples, device)), None

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Prompts ``[B, D]`` of a right-padded batch (encoding "text")."""
        self._shortcut_ran = False
        last = attention_mask.sum(dim=1) - 1  # right padding: index of the last real token
        if self._shortcut_applies():
            self._shortcut_ran = True
            return self.text_encoder(input_ids, attention_mask, last).float()
        hidden = self.text_encoder(input_ids, attention_mask)  # [B, L, D]
        if self.pooling == "last":
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
        return pooled.float()

    # ------------------------------------------------------------------ last-layer shortcut

    def _shortcut_layer_of(self, model: nn.Module) -> nn.Module | None:
        """The final decoder layer when the last-layer shortcut is exact for this model and these
        settings (module docstring), else None."""
        if not self.last_layer_shortcut or self.pooling != "last" or self.gradient_checkpointing:
            return None
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model

        if type(model) is not Qwen2Model or not len(model.layers):
            return None  # another architecture (AutoModel may load one): its forward may differ
        if any(type(layer) is not Qwen2DecoderLayer or getattr(layer.self_attn, "sliding_window", None) is not None
               for layer in model.layers):
            return None
        if any(t != "full_attention" for t in getattr(model.config, "layer_types", None) or ()):
            return None
        if float(getattr(model.layers[-1].self_attn, "attention_dropout", 0.0) or 0.0) > 0:
            return None
        if _causal_mask_builder() is None:
            return None  # a transformers version without a causal-mask helper this code can call
        return model.layers[-1]

    def _shortcut_applies(self) -> bool:
        """Whether this forward may take the shortcut: it applies to the model (``_shortcut_layer``),
        nothing is compiled (``compile: true`` compiles the text encoder; a compiled module runs
        transformers' full forward), and the final layer is still a plain ``Qwen2DecoderLayer``
        (FSDP shards each decoder layer on its own, which makes it an ``FSDPQwen2DecoderLayer``
        whose parameters are gathered only when the layer itself is called: the full forward)."""
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

        if self._shortcut_layer is None or self.text_encoder is None:
            return False
        encoder = unwrap(self.text_encoder)
        if any(getattr(m, "_compiled_call_impl", None) is not None for m in (self.text_encoder, encoder, self.model)):
            return False
        return type(encoder.layers[-1]) is Qwen2DecoderLayer

    @hookimpl
    def post_step_update(self, result: Any, ctx: Context) -> dict[str, float] | None:
        """Report this step's use of the prompt cache and the demonstration pairs the budget dropped."""
        out: dict[str, float] = {}
        if self._last_use is not None:
            reused, n, staleness = self._last_use
            out.update(prompt_cached=reused / n, prompt_staleness=float(staleness))
        if getattr(self, "_last_dropped", None) is not None:
            out["demos_dropped"] = float(self._last_dropped)
        return out or None

    # ------------------------------------------------------------------ state

    @hookimpl
    def state_dict(self, ctx: Context) -> dict[str, Any]:
        """The prompts a resumed run may still reuse (younger than ``cache_every`` steps)."""
        young = {k: c for k, c in self._prompts.items() if ctx.step - c.step < self.cache_every}
        return {"prompt_cache": {k: {"fingerprint": c.fingerprint, "step": c.step, "prompt": c.prompt, "tokens": c.tokens}
                                 for k, c in young.items()}}

    @hookimpl
    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self._prompts = {
            k: _CachedPrompt(int(e["fingerprint"]), int(e["step"]), None, e["prompt"].to(ctx.device),
                             e["tokens"].to(ctx.device) if e.get("tokens") is not None else None)
            for k, e in state.get("prompt_cache", {}).items()
        }
        self._prompts_weights = None

    # ------------------------------------------------------------------ helpers

    def save_pretrained(self, path: str) -> None:
        """Save model and tokenizer to ``path`` (loadable again with ``pretrained=path``)."""
        if self.model is None:
            raise RuntimeError("QwenPrompt.save_pretrained called before configure")
        unwrap(self.model).save_pretrained(path)
        self.tokenizer.save_pretrained(path)
