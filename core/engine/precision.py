"""Mixed precision done right, in one place (after Lightning's ``plugins/precision/amp.py``).

=============  ================  ===========  ==============================
mode           autocast dtype    GradScaler   trainable parameters must be
=============  ================  ===========  ==============================
fp32           none              no           float32
bf16-mixed     bfloat16          no           float32 (master weights)
fp16-mixed     float16           yes          float32 (master weights)
=============  ================  ===========  ==============================

The engine's step calls, in this order: :meth:`backward` (scaled loss in fp16),
:meth:`unscale` (before clipping, so ``grad_clip`` is in real units),
clip, :meth:`step` (the scaler skips the step on inf/NaN gradients and the
skip is counted), nothing else.  Plugins never touch the scaler.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from arcfw.core.errors import PrecisionError

if TYPE_CHECKING:  # pragma: no cover
    from arcfw.core.engine.context import ParamGroup

MODES = ("fp32", "bf16-mixed", "fp16-mixed")


class Precision:
    def __init__(self, mode: str, device: torch.device):
        if mode not in MODES:
            raise PrecisionError(f"precision must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.device = device
        self.dtype = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}.get(mode)
        self.scaler = torch.amp.GradScaler(device.type) if mode == "fp16-mixed" else None
        self.scaler_skipped = 0  # optimizer steps the GradScaler skipped (inf/NaN in fp16 gradients)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def check_parameters(self, groups: list[ParamGroup]) -> None:
        """Refuse trainable parameters that cannot work with this mode, before the first step.

        The original script kept Qwen in fp16 and called ``scaler.unscale_`` ->
        "Attempting to unscale FP16 gradients".  Here that is refused up front.
        """
        for group in groups:
            bad = sorted({str(p.dtype).replace("torch.", "") for p in group.trainable() if p.dtype != torch.float32})
            if not bad:
                continue
            where = f"parameter group '{group.name}' (plugin '{group.plugin}')"
            if self.mode == "fp16-mixed" and "float16" in bad:
                raise PrecisionError(
                    f"{where} has float16 trainable parameters, which fp16-mixed cannot train (GradScaler cannot "
                    "unscale FP16 gradients). Fix: load the model in float32 (mixed precision keeps fp32 master "
                    "weights and autocasts the math), or use precision: bf16-mixed"
                )
            raise PrecisionError(
                f"{where} has {'/'.join(bad)} trainable parameters; precision '{self.mode}' expects float32 "
                "master weights. Fix: load the model in float32 and let autocast handle the low-precision math"
            )

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()  # type: ignore[no-untyped-call]

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer (through the scaler in fp16). Returns False if the step was skipped."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        applied = self.scaler.get_scale() >= before  # the scale only drops when the step was skipped
        if not applied:
            self.scaler_skipped += 1
        return applied

    def state_dict(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None, "scaler_skipped": self.scaler_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.scaler_skipped = int(state.get("scaler_skipped", 0))
