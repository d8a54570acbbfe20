"""Trained weights into (and out of) an engine, for ``arcfw eval``.

Provisional and isolated here until the checkpoint module (issue 4) lands;
:func:`load_weights` is the one function evaluation calls.  A weights folder
holds:

- ``weights.safetensors``: the modules of every parameter group, keys
  ``<module name>.<parameter>`` (:func:`named_modules`);
- ``plugin_state.pt``: what each plugin's ``state_dict`` hook returned (the RL
  policy's own network, the curriculum position...), keyed by plugin name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from arcfw.core.engine import Engine
from arcfw.core.errors import CheckpointError

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "plugin_state.pt"


def named_modules(engine: Engine) -> list[tuple[str, torch.nn.Module]]:
    """The modules of every parameter group: named by the group, ``<group>.<i>`` when it has several."""
    return [
        (g.name if len(g.modules) == 1 else f"{g.name}.{i}", m) for g in engine.groups for i, m in enumerate(g.modules)
    ]


def _one_plugin(engine: Engine, hook: str, name: str):
    """A caller of ``hook`` restricted to the plugin registered as ``name``."""
    others = [p for n, p in engine.plugins.items() if n != name]
    return engine.pm.subset_hook_caller(hook, remove_plugins=others)


def save_weights(engine: Engine, folder: Path | str) -> Path:
    """Write the engine's module weights and plugin states to ``folder`` (created)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in named_modules(engine) for k, v in m.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    states = {}
    for name in engine.plugins:
        found = [s for s in _one_plugin(engine, "state_dict", name)(ctx=engine.ctx) if s is not None]
        if found:
            states[name] = found[0]
    torch.save(states, folder / STATE_FILE)
    return folder


def load_weights(engine: Engine, folder: Path | str) -> None:
    """Load what :func:`save_weights` wrote into a freshly built engine of the same config."""
    folder = Path(folder)
    where = f"checkpoint {folder}"
    if not folder.is_dir():
        raise CheckpointError(f"{where}: folder does not exist")
    for f in (WEIGHTS_FILE, STATE_FILE):
        if not (folder / f).is_file():
            raise CheckpointError(f"{where}: no {f} in it")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE), device=str(engine.device))
    except Exception as exc:
        raise CheckpointError(f"{where}: cannot read {WEIGHTS_FILE}: {exc}") from None
    used: set[str] = set()
    for name, module in named_modules(engine):
        prefix = f"{name}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        used.update(prefix + k for k in own)
        try:
            module.load_state_dict(own)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(f"{where}: module '{name}' does not match the config: {detail}") from None
    unknown = sorted({k.split(".")[0] for k in tensors if k not in used})
    if unknown:
        raise CheckpointError(f"{where}: weights of modules the config does not build: {', '.join(unknown)}")
    states = torch.load(folder / STATE_FILE, map_location=engine.device, weights_only=True)
    for name, state in states.items():
        if name not in engine.plugins:
            raise CheckpointError(f"{where}: state of plugin '{name}', which the config does not load")
        _one_plugin(engine, "load_state_dict", name)(state=state, ctx=engine.ctx)
