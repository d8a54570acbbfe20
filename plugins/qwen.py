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
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from arcfw.core.batch import NUM_COLOURS, Batch, Example
from arcfw.core.context import Context, ParamGroup
from arcfw.core.distributed import unwrap
from arcfw.core.errors import PluginError
from arcfw.core.hookspecs import hookimpl
from arcfw.core.plugin import Plugin

#: marker texts of the serialisation (tokens of the compact vocabulary; plain text for other tokenizers)
IN_MARK = "<in>"
OUT_MARK = "<out>"
QUERY_MARK = "<query>"
ROW_END = "\n"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"

POOLINGS = ("last", "mean")
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
    """

    name = "qwen"
    role = "prompt"
    description = "Qwen2 (transformers) over serialised demo pairs and query input; pooled hidden state as prompt"

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
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(repr(p) for p in POOLINGS)}, got {pooling!r}")
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
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
                raise PluginError(
                    f"qwen: cannot load pretrained model '{self.pretrained}' (plugins.prompt.pretrained): {first}. "
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
        self._build_symbol_ids()
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

    @hookimpl
    def parameter_groups(self, ctx: Context) -> list[ParamGroup]:
        return [ParamGroup(name="qwen", params=list(self.model.parameters()), lr=1e-4, modules=[self.model], module_attr="model")]

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
        grids: list[Any] = [example.query.input]
        for p in example.demos:
            grids.extend((p.input, p.output))
        return hash(tuple(
            (None if g is None else (np.shape(g), np.ascontiguousarray(g, dtype=np.int64).tobytes())) for g in grids
        ))

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
        input_ids, attention_mask = self.encode_batch(batch.examples, ctx.device)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # [B, L, D]
        if self.pooling == "last":
            last = attention_mask.sum(dim=1) - 1  # right padding: index of the last real token
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
        return pooled.float()

    # ------------------------------------------------------------------ helpers

    def save_pretrained(self, path: str) -> None:
        """Save model and tokenizer to ``path`` (loadable again with ``pretrained=path``)."""
        if self.model is None:
            raise RuntimeError("QwenPrompt.save_pretrained called before configure")
        unwrap(self.model).save_pretrained(path)
        self.tokenizer.save_pretrained(path)
