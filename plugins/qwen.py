"""Qwen2 prompt model: serialise an example's grids into tokens and pool a Qwen2 hidden state.

The prompt role.  Each example is written as one token sequence::

    for every demo pair:  <in> rows <out> rows
    then the query:       <query> <in> rows <out>

where a grid's rows are its colour digits each followed by a row end ``"\\n"``.
The query's output grid is never serialised (it is the target).  The sequence
runs through a ``transformers`` :class:`~transformers.Qwen2Model` (random,
from :class:`~transformers.Qwen2Config` with the plugin's sizes, or loaded with
``AutoModel.from_pretrained``) and the hidden state of the last token (or the
masked mean over the tokens) is the prompt embedding ``[B, hidden_size]``.

Without ``pretrained`` the vocabulary is the compact grid vocabulary of
:func:`build_grid_tokenizer` (16 tokens).  With ``pretrained`` the checkpoint's
own tokenizer is used; every symbol (a colour, the row end, a marker) is
mapped to its token ids once, so the ids of an example are a concatenation of
per-symbol ids, never a tokenisation of the whole text.

**Prompt cache** (``cache_every``, default 10 as in the original script, which
cached Qwen's prompt "every 10 batches").  The cache is keyed *per example*
(``example.key``, checked against a digest of its grids): every pair has its own
task and query, so one example's prompt is never reused for another one (the
original reused one prompt for the next batches, whatever their task).

- *Qwen trainable*: a training step reuses an example's prompt while it is
  younger than ``cache_every`` optimizer steps, then recomputes it (a
  *refresh*).  A reused prompt is stale (Qwen has moved on since) and carries
  **no gradient**: Qwen learns only from the prompts recomputed in a step.  When
  every prompt of a batch comes from the cache, the plugin puts ``"qwen"`` in
  ``ctx.no_grad_groups``, so the first-step path check, the zero-gradient watch
  and the health monitor do not count that step against Qwen, and the optimizer
  leaves Qwen untouched (no gradient, so no update and no weight decay).
  Staleness (steps since the prompt was computed) is at most ``cache_every - 1``.
- *Qwen frozen* (``optimizer.lr.qwen: 0``): a cached prompt is exact, so it is
  reused for as long as Qwen's weights stay the same (checked with the
  parameters' identities and version counters, so loading other weights
  invalidates it).
- ``cache_every: 1`` turns the cache off; evaluation (``ctx.training`` False)
  never uses it, and neither does a run of several processes (a rank that
  skipped Qwen's forward would leave the others waiting in DDP's or FSDP's
  collectives).  ``post_step_update`` reports ``prompt_cached`` (share of the
  batch's prompts taken from the cache) and ``prompt_staleness`` (largest age of
  a reused stale prompt, in steps).  Young entries go into checkpoints, so a
  resumed run reuses the same prompts as the uninterrupted one.

A prompt is only reused when *the same example* comes back within
``cache_every`` steps: small task sets (test-time training on one task, a few
``data.max_tasks``) or, with Qwen frozen, every epoch after the first.  One
shuffled pass over a large set (the default config: 3232 examples, each seen
once) never hits the cache.  Caching only the demonstrations' encoding (a KV
prefix) so that the query keeps its gradient was considered and left out: it has
the same hit rate, saves less per hit (the query is a third of the tokens on
average and still attends over the whole prefix) and trains Qwen on a partial
gradient that skips the demonstrations.  ``benchmarks/README.md`` has the figures.

**Batching** (``batching``): ``"padded"`` runs one forward over the
right-padded batch with an attention mask; ``"per_example"`` runs one unpadded
forward per example (the same prompts: padding is masked out either way).  On
CPU a padded, masked batch is slower per example than separate forwards (the
masked attention kernel computes the full square instead of the causal
triangle, over the longest sequence of the batch), so ``"auto"`` (the default)
picks ``"per_example"`` on CPU and ``"padded"`` elsewhere.

**Last-layer shortcut** (``last_layer_shortcut``, default on).  With
``pooling: "last"`` the prompt is the final layer's output at one position per
example, and nothing else of the final layer is used.  So the final decoder
layer is computed for that position only: its keys and values for every token
(needed by the one query), its attention, MLP and residuals for the pooled token
alone.  The earlier layers run as transformers runs them.  The prompt and its
gradients are the same as the full forward's (to float rounding; a test checks
it, batched and padded), and the step does about 40% less Qwen work on the
default sizes (2 layers; on a 24-layer model about 1/24 less).  It applies to a
plain ``Qwen2Model`` whose last layer is a standard ``Qwen2DecoderLayer``
without sliding-window attention or attention dropout, also inside DDP and FSDP,
and not while the model is compiled (``compile: true``) or recomputing
activations (``gradient_checkpointing``): those run the full forward.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arcfw.core.data.batch import NUM_COLOURS, Batch, Example
from arcfw.core.engine.context import Context, Metric, ParamGroup
from arcfw.core.engine.distributed import unwrap
from arcfw.core.errors import PluginError, first_line
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin

#: marker texts of the serialisation (tokens of the compact vocabulary; plain text for other tokenizers)
IN_MARK = "<in>"
OUT_MARK = "<out>"
QUERY_MARK = "<query>"
ROW_END = "\n"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

POOLINGS = ("last", "mean")
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


@dataclass
class _CachedPrompt:
    """One example's prompt, kept for reuse (see the module docstring)."""

    fingerprint: int
    step: int  # ctx.step when it was computed
    weights: int | None  # stamp of a frozen Qwen's parameters when it was computed (None: Qwen trained, or restored)
    prompt: torch.Tensor  # [D], detached


class QwenPrompt(Plugin):
    """Prompt embedding from a Qwen2 model reading the serialised demos and query input.

    Parameters (YAML ``params``):

    - ``pretrained``: local folder or hub name for ``from_pretrained`` (model and
      tokenizer).  When set, the size parameters below are ignored.
    - ``trust_remote_code``: passed to both ``from_pretrained`` calls.
    - ``hidden_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``,
      ``intermediate_size``: sizes of the randomly initialised model.
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
    - ``last_layer_shortcut``: with ``pooling: "last"``, compute the final layer for the
      pooled token only (exact; module docstring).  ``false`` always runs the full forward.
    """

    name = "qwen"
    role = "prompt"
    description = "Qwen2 (transformers) over serialised demo pairs and query input; pooled hidden state as prompt"
    metrics = (Metric("qwen_grad", console=30, fmt=".4g", plot="Qwen gradient norm", grad_norm_of=(GROUP,)),)

    def __init__(
        self,
        pretrained: str | None = None,
        trust_remote_code: bool = False,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_kv_heads: int = 2,
        intermediate_size: int = 128,
        max_tokens: int = 2048,
        pooling: str = "last",
        gradient_checkpointing: bool = False,
        attn_implementation: str = "sdpa",
        cache_every: int = 10,
        batching: str = "auto",
        last_layer_shortcut: bool = True,
    ) -> None:
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
        self.pooling = pooling
        self.gradient_checkpointing = gradient_checkpointing
        self.attn_implementation = attn_implementation
        self.cache_every = cache_every
        self.batching = batching
        self._per_example = batching == "per_example"  # "auto" is resolved in configure
        self.last_layer_shortcut = bool(last_layer_shortcut)
        self._shortcut_layer: nn.Module | None = None  # the final decoder layer, when the shortcut applies
        self._shortcut_last: torch.Tensor | None = None  # [B] pooled positions, set only during _forward
        self._shortcut_ran = False

        self.model: nn.Module | None = None
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
                vocab_size=len(self.tokenizer),
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
        self._build_symbol_ids()
        self._install_shortcut(model)
        ctx.prompt_dim = int(model.config.hidden_size)

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
        return [ParamGroup(name=GROUP, params=list(self.model.parameters()), lr=1e-4, modules=[self.model], module_attr="model")]

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
    def generate_prompt(self, batch: Batch, ctx: Context) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("QwenPrompt.generate_prompt called before configure")
        if self.cache_every == 1 or not ctx.training or ctx.world_size > 1:
            self._last_use = None
            return self._encode(batch.examples, ctx.device)
        return self._reuse_or_encode(batch.examples, ctx)

    def _reuse_or_encode(self, examples: Sequence[Example], ctx: Context) -> torch.Tensor:
        """Prompts ``[B, D]``: cached ones where still usable, the others from Qwen (with gradient)."""
        trainable = any(p.requires_grad for p in self.model.parameters())
        weights = None if trainable else self._weights_stamp()
        self._evict(ctx.step, weights, trainable)
        fingerprints = [self._fingerprint(ex) for ex in examples]
        rows: list[torch.Tensor | None] = []
        staleness = 0
        for ex, fp in zip(examples, fingerprints):
            hit = self._prompts.get(ex.key)
            if hit is not None and hit.fingerprint == fp:
                rows.append(hit.prompt)
                if trainable:
                    staleness = max(staleness, ctx.step - hit.step)
            else:
                rows.append(None)
        misses = [b for b, row in enumerate(rows) if row is None]
        self._last_use = (len(examples) - len(misses), len(examples), staleness)
        if not misses:
            if trainable:
                ctx.no_grad_groups.add(GROUP)  # expected: no gradient for Qwen this step
            return torch.stack(rows)
        fresh = self._encode([examples[b] for b in misses], ctx.device)
        for i, b in enumerate(misses):
            rows[b] = fresh[i]
            self._prompts[examples[b].key] = _CachedPrompt(fingerprints[b], ctx.step, weights, fresh[i].detach())
        return fresh if len(misses) == len(examples) else torch.stack(rows)

    def _weights_stamp(self) -> int:
        """Changes when a parameter of a frozen Qwen is replaced or changed in place (a checkpoint load).

        Only used while Qwen is frozen: fused optimizer kernels update parameters without
        bumping their version counters, so a training Qwen is judged by age alone.
        """
        return hash(tuple((id(p), p._version) for p in self.model.parameters()))

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

    def _encode(self, examples: Sequence[Example], device: torch.device) -> torch.Tensor:
        """Prompts ``[n, D]`` of ``examples`` from Qwen, with gradient to its parameters."""
        if self._per_example:
            return torch.cat([self._forward(*self.encode_batch([ex], device)) for ex in examples])
        return self._forward(*self.encode_batch(examples, device))

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        last = attention_mask.sum(dim=1) - 1  # right padding: index of the last real token
        self._shortcut_ran = False
        if self._shortcut_applies():
            self._shortcut_last = last
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            self._shortcut_last = None
        hidden = out.last_hidden_state  # [B, L, D], or [B, 1, D] (the pooled token) after the shortcut
        if self._shortcut_ran:
            pooled = hidden[:, 0]
        elif self.pooling == "last":
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
        return pooled.float()

    # ------------------------------------------------------------------ last-layer shortcut

    def _install_shortcut(self, model: nn.Module) -> None:
        """Route the final decoder layer through :meth:`_last_token_layer` when that is exact
        for this model (module docstring); otherwise leave the model as it is."""
        self._shortcut_layer = None
        if not self.last_layer_shortcut or self.pooling != "last" or self.gradient_checkpointing:
            return
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

        layers = getattr(model, "layers", None)
        if not layers or type(layers[-1]) is not Qwen2DecoderLayer:
            return  # another architecture (AutoModel may load one): its last layer may differ
        layer = layers[-1]
        attn = layer.self_attn
        if getattr(attn, "sliding_window", None) is not None or float(getattr(attn, "attention_dropout", 0.0) or 0.0) > 0:
            return
        full_forward = layer.forward
        plugin = self

        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            last = plugin._shortcut_last
            hidden = args[0] if len(args) == 1 else kwargs.get("hidden_states") if not args else None
            embeddings = kwargs.get("position_embeddings")
            if last is None or hidden is None or embeddings is None or kwargs.get("use_cache"):
                return full_forward(*args, **kwargs)  # not from _forward, or a calling convention we do not know
            plugin._shortcut_ran = True
            return plugin._last_token_layer(layer, hidden, embeddings, last)

        layer.forward = forward  # an instance attribute: parameters, state_dict and save_pretrained are unchanged
        self._shortcut_layer = layer

    def _shortcut_applies(self) -> bool:
        # DDP and FSDP call the model's own forward, so the shortcut runs inside them (their
        # gradient hooks see the same parameters); a compiled model (compile: true) runs the full forward
        return self._shortcut_layer is not None and all(
            getattr(m, "_compiled_call_impl", None) is None for m in (self.model, unwrap(self.model))
        )

    @staticmethod
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

    @hookimpl
    def post_step_update(self, result: Any, ctx: Context) -> dict[str, float] | None:
        """Report this step's use of the prompt cache (nothing when the cache is off)."""
        if self._last_use is None:
            return None
        reused, n, staleness = self._last_use
        return {"prompt_cached": reused / n, "prompt_staleness": float(staleness)}

    # ------------------------------------------------------------------ state

    @hookimpl
    def state_dict(self, ctx: Context) -> dict[str, Any]:
        """The prompts a resumed run may still reuse (younger than ``cache_every`` steps)."""
        young = {k: c for k, c in self._prompts.items() if ctx.step - c.step < self.cache_every}
        return {"prompt_cache": {k: {"fingerprint": c.fingerprint, "step": c.step, "prompt": c.prompt} for k, c in young.items()}}

    @hookimpl
    def load_state_dict(self, state: dict[str, Any], ctx: Context) -> None:
        self._prompts = {
            k: _CachedPrompt(int(e["fingerprint"]), int(e["step"]), None, e["prompt"].to(ctx.device))
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
