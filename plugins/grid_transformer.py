"""Grid transformer: the predictor that reads every demonstration cell and every query input cell.

The predictor role.  For every cell ``(r, c)`` of the output grid (its size is
the answer's in training and the predicted one at evaluation) it builds a
token from:

- every *view* of the query input at that cell (:mod:`arcfw.core.data.views`:
  the 8 symmetries of the square, scaling, tiling, cropping, gravity), so that
  flips, rotations and resampling are a lookup, not a coordinate the net has to
  compute;
- the cell's position counted from each edge of the output grid;
- the refined prompt (added, and FiLM on every block's MLP), which keeps the
  gradient path from the loss back through ``refine`` to the prompt model.

Each block then lets the output cells

1. *cross-attend* to the prompt plugin's token states (the
   :class:`~arcfw.core.engine.context.TaskEncoding`: with the ``qwen`` plugin's
   ``cells`` encoding, one state per demonstration output cell, carrying its
   output colour and the views of its input there, and one per query input
   cell): this is where the demonstrations decide the answer - a cell whose
   views read "colour 1" finds the demonstration cells whose views read
   "colour 1" and what they became;
2. *self-attend* to every other output cell (global reach over the grid);
3. run an MLP.

The logits are a colour classifier plus a *pointer* over views: per cell,
learned scores ``s_k`` add ``s_k`` to the logit of the colour that view ``k``
shows there, so "copy view k" (a flip, a rotation, an upscale) is one direction
in the last layer.  Padding is exact: cells outside an example's output grid
are never attended to, and an example gives the same logits alone or batched
(tested).  Without a :class:`TaskEncoding` (a prompt plugin that returns a bare
tensor) the cross-attention is skipped and the prompt alone conditions the grid.

Its :class:`~arcfw.core.nn.SizeHead` predicts the output size at evaluation
(``predict_shape``) and learns in ``post_step_update`` with its own optimizer
(``size_lr``), as the ``agent`` predictor's does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arcfw.core.data.batch import NUM_COLOURS
from arcfw.core.data.shapes import mask_shapes
from arcfw.core.data.tasks import MAX_SIDE
from arcfw.core.data.views import NO_CELL, NUM_VIEWS, grid_views
from arcfw.core.engine.context import ParamGroup
from arcfw.core.engine.hookspecs import hookimpl
from arcfw.core.engine.plugin import Plugin
from arcfw.core.nn import SizeLearner, SizePredictor

_OFF_VIEW = 1  # 0: padding (a feature that is absent)
_OFF_POS = _OFF_VIEW + NUM_VIEWS * (NO_CELL + 1)
_OFF_FLAG = _OFF_POS + 4 * MAX_SIDE
VOCAB = _OFF_FLAG + 2
FEATURES = NUM_VIEWS + 4 + 1
#: ``batch.meta`` key of a batch's output-cell features (see ``GridTransformer._cells``)
_CELLS_KEY = "grid_transformer.cells"


def query_cells(inp: np.ndarray, out_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[ho*wo, FEATURES]`` and view colours ``[ho*wo, NUM_VIEWS]`` of the output cells, row-major."""
    ho, wo = int(out_shape[0]), int(out_shape[1])
    views = grid_views(inp, (ho, wo)).reshape(NUM_VIEWS, -1).T  # [n, K]
    n = ho * wo
    f = np.empty((n, FEATURES), dtype=np.int64)
    f[:, :NUM_VIEWS] = _OFF_VIEW + np.arange(NUM_VIEWS) * (NO_CELL + 1) + views
    r, c = np.divmod(np.arange(n), wo)
    for j, pos in enumerate((r, c, ho - 1 - r, wo - 1 - c)):
        f[:, NUM_VIEWS + j] = _OFF_POS + j * MAX_SIDE + pos
    f[:, NUM_VIEWS + 4] = _OFF_FLAG + 1
    return f, views


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.heads
        q = self.q(x).view(B, N, h, D // h).transpose(1, 2)
        k, v = self.kv(mem).view(B, mem.shape[1], 2, h, D // h).permute(2, 0, 3, 1, 4)
        mask = None if bool(key_mask.all()) else key_mask[:, None, None, :]  # no mask: the fast kernel
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(B, N, D))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mem_dim: int, cross: bool = True):
        super().__init__()
        if cross:  # without token states to read (a prompt plugin that returns a bare prompt): no cross-attention
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = _Attention(dim, heads)
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, mem, mem_mask, cell_mask, gamma, beta):
        if mem is not None:
            x = x + self.cross(self.norm_cross(x), mem, mem_mask)
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, cell_mask)
        h = self.norm_mlp(x) * (1 + gamma[:, None]) + beta[:, None]  # FiLM from the prompt
        return x + self.mlp(h)


class GridTransformerNet(nn.Module):
    """``forward(prompt [B, P], features [B, N, F], views [B, N, K], cell_mask [B, N], mem, mem_mask)`` -> ``[B, N, 10]``."""

    def __init__(self, prompt_dim: int, mem_dim: int, dim: int, layers: int, heads: int, copy_bias: float = 0.0):
        """``mem_dim`` 0: no token states will come (cross-attention and the demonstration lookup are left out)."""
        super().__init__()
        self.cross = mem_dim > 0
        self.embed = nn.EmbeddingBag(VOCAB, dim, mode="sum", padding_idx=0)
        self.prompt_in = nn.Linear(prompt_dim, dim)
        if self.cross:
            self.mem_in = nn.Linear(mem_dim, dim)
            self.mem_norm = nn.LayerNorm(dim)
        self.film = nn.Linear(prompt_dim, 2 * dim * layers)
        self.blocks = nn.ModuleList(_Block(dim, heads, dim, self.cross) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_COLOURS)
        self.pointer = nn.Linear(dim, NUM_VIEWS)
        if self.cross:
            # the demonstrations' colour lookup: per task (from the prompt), a weight per view on "same colour
            # in view k here as in view k of that demonstration cell"; it starts on the identity view
            self.lookup_beta = nn.Linear(prompt_dim, NUM_VIEWS)
            self.lookup_gate = nn.Linear(dim, 1)
            nn.init.zeros_(self.lookup_beta.weight)
            with torch.no_grad():
                self.lookup_beta.bias.zero_()
                self.lookup_beta.bias[0] = 4.0
        # most ARC output cells are their input cell: the pointer starts leaning on the identity view (0)
        with torch.no_grad():
            self.pointer.bias.zero_()
            self.pointer.bias[0] = copy_bias
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        # small, not zero: with a zero FiLM the prompt (and so Qwen) would get exactly no gradient at step 1
        nn.init.normal_(self.film.weight, std=0.02)
        nn.init.zeros_(self.film.bias)

    def forward(self, prompt, features, views, cell_mask, mem=None, mem_mask=None, mem_views=None, mem_outputs=None):
        B, N, Fn = features.shape
        x = self.embed(features.reshape(B * N, Fn)).view(B, N, -1) + self.prompt_in(prompt)[:, None]
        m = self.mem_norm(self.mem_in(mem.to(x.dtype))) if mem is not None else None
        film = self.film(prompt).view(B, len(self.blocks), 2, -1)
        onehot = F.one_hot(views, NO_CELL + 1)[..., :NUM_COLOURS].to(x.dtype)  # [B, N, K, 10]; no cell -> 0
        match = None
        if mem_views is not None:
            match = (onehot, F.one_hot(mem_views, NO_CELL + 1)[..., :NUM_COLOURS].to(x.dtype))
        for i, block in enumerate(self.blocks):
            x = block(x, m, mem_mask, cell_mask, film[:, i, 0], film[:, i, 1])
        x = self.norm(x)
        pointed = torch.einsum("bnk,bnkc->bnc", self.pointer(x), onehot)
        logits = self.head(x) + pointed
        if match is not None and mem_outputs is not None:
            logits = logits + self.lookup_gate(x) * self._lookup(prompt, match, mem_mask, mem_outputs)
        return logits

    def _lookup(self, prompt, match, mem_mask, mem_outputs):
        """``[B, N, 10]``: per output cell, the distribution of the output colours of the demonstration
        cells that match it (attention with scores ``sum_k beta_k(prompt) [view k equal]``).  A null
        option (score 0, no colour) takes the weight where nothing matches, or the task has no
        demonstration cell at all."""
        cells, tokens = match
        beta = self.lookup_beta(prompt).to(cells.dtype)  # [B, K]
        B, N, K, C = cells.shape
        # sum_k beta_k [view k equal] as one matmul over (view, colour): weighting the cells' side first keeps
        # the intermediate at [B, N, K*C] (a three-operand einsum built [B, N, T, K] here: a third of a step)
        weighted = (cells * beta[:, None, :, None]).reshape(B, N, K * C)
        scores = torch.bmm(weighted, tokens.reshape(B, tokens.shape[1], K * C).transpose(1, 2))
        demo = mem_mask & (mem_outputs < NUM_COLOURS)  # demonstration cells only (query cells have no output)
        scores = scores.float().masked_fill(~demo[:, None, :], float("-inf"))
        scores = torch.cat([scores, scores.new_zeros(*scores.shape[:2], 1)], dim=-1)  # the null option
        weights = torch.softmax(scores, dim=-1)[..., :-1].to(cells.dtype)
        out = F.one_hot(mem_outputs.clamp(max=NUM_COLOURS), NUM_COLOURS + 1)[..., :NUM_COLOURS].to(cells.dtype)
        return torch.bmm(weights, out)


class GridTransformer(SizePredictor, Plugin):
    """Predicts the output grid by attending from its cells to the demonstrations' token states.

    Parameter group ``agent`` (the original script's name: ``--agent-lr``).  Logs ``size_loss`` and ``size_acc``.

    Parameters (YAML):

    - ``dim``: width of the cell states and of the attention.
    - ``layers``: attention layers (each attends to the demonstrations' tokens and among the output cells).
    - ``heads``: attention heads (``dim`` must be divisible by it).
    - ``size_lr``: learning rate of the size head's own Adam (0: the head does not learn).
    - ``copy_bias``: the pointer's starting lean on the identity view: the untrained net gives each
      cell's input colour this much more logit (most ARC output cells equal their input cell).
    """

    name = "grid_transformer"
    role = "predictor"
    description = "Output cells attend to the demonstrations' token states and to each other; views of the input as a pointer"

    def __init__(self, dim: int = 64, layers: int = 2, heads: int = 4, size_lr: float = 1e-3, copy_bias: float = 2.0):
        if dim < 1 or layers < 1 or heads < 1:
            raise ValueError("dim, layers and heads must be >= 1")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not size_lr >= 0:
            raise ValueError(f"size_lr must be >= 0, got {size_lr!r}")
        self.dim, self.layers, self.heads, self.size_lr = dim, layers, heads, float(size_lr)
        self.copy_bias = float(copy_bias)
        self.net: GridTransformerNet | None = None
        self.sizes: SizeLearner | None = None
        self._mem_dim: int | None = None

    @hookimpl
    def configure(self, ctx):
        # the width of the prompt plugin's token states (ctx.token_dim; qwen: hidden_size, 0 with encoding text)
        self._mem_dim = ctx.prompt_dim if ctx.token_dim is None else ctx.token_dim
        self.net = GridTransformerNet(ctx.prompt_dim, self._mem_dim, self.dim, self.layers, self.heads, self.copy_bias).to(
            ctx.device
        )
        self.sizes = SizeLearner(ctx.prompt_dim, 2 * self.dim, self.size_lr, ctx.device, ctx.fused_optimizers)

    @hookimpl
    def parameter_groups(self, ctx):
        return [ParamGroup(name="agent", params=list(self.net.parameters()), lr=1e-3, modules=[self.net], module_attr="net")]

    def _cells(self, batch):
        """Canvas-wide features, views and the output-cell mask of a batch (the output size from
        ``batch.target_mask``: the answer's in training, the predicted one at evaluation).

        Kept in ``batch.meta`` for the batch's next predictions (the RL reward predicts the step's batch
        twice more), as long as the batch holds the same ``target_mask`` tensor."""
        cached = batch.meta.get(_CELLS_KEY)
        if cached is not None and cached[0] is batch.target_mask:
            return cached[1]
        cells = self._build_cells(batch)
        batch.meta[_CELLS_KEY] = (batch.target_mask, cells)
        return cells

    def _build_cells(self, batch):
        B = batch.size
        H, W = batch.canvas
        sizes = mask_shapes(batch.target_mask).tolist()
        feats = np.zeros((B, H, W, FEATURES), dtype=np.int64)
        views = np.full((B, H, W, NUM_VIEWS), NO_CELL, dtype=np.int64)
        for b, (ex, (ho, wo)) in enumerate(zip(batch.examples, sizes)):
            if ho == 0 or wo == 0:
                continue
            f, v = query_cells(ex.query.input, (ho, wo))
            feats[b, :ho, :wo] = f.reshape(ho, wo, -1)
            views[b, :ho, :wo] = v.reshape(ho, wo, -1)
        dev = batch.inputs.device
        cell_mask = batch.target_mask.reshape(B, H * W)
        empty = ~cell_mask.any(1)
        if empty.any():  # no output cell (cannot happen with real data): attend over the canvas instead
            cell_mask = torch.where(empty[:, None], batch.canvas_mask.reshape(B, H * W), cell_mask)
        return (torch.from_numpy(feats).to(dev).view(B, H * W, -1), torch.from_numpy(views).to(dev).view(B, H * W, -1),
                cell_mask)

    @hookimpl
    def predict(self, prompt, batch, ctx, encoding):
        feats, views, cell_mask = self._cells(batch)
        mem = mem_mask = mem_views = mem_outputs = None
        if encoding is not None:
            if not self._mem_dim:
                raise ValueError(
                    "the prompt plugin returned token states (a TaskEncoding) although it set ctx.token_dim = 0 in configure"
                )
            if encoding.tokens.shape[-1] != self._mem_dim:
                raise ValueError(
                    f"the prompt plugin's token states have width {encoding.tokens.shape[-1]}, expected {self._mem_dim} (ctx.token_dim, or ctx.prompt_dim when not set)"
                )
            mem, mem_mask = encoding.tokens, encoding.token_mask
            mem_views, mem_outputs = encoding.meta.get("views"), encoding.meta.get("outputs")
        logits = self.net(prompt, feats, views, cell_mask, mem, mem_mask, mem_views, mem_outputs)
        H, W = batch.canvas
        return logits.view(batch.size, H, W, NUM_COLOURS)
