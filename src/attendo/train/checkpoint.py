"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder OUT/checkpoints/step-NNNNNNN (N optimizer steps done) holding

  weights.safetensors    the trainable parameters, by their names in the network
  optimizer.safetensors  AdamW's moments and step count for each of them ("NAME.exp_avg", ...)
  rng.safetensors        every process's torch random-number generator state ("cpu.rank0", ...)
  state.json             the step, the data position, the optimizer's hyperparameters, the
                         settings and a fingerprint of the data, as JSON

No pickle anywhere: tensors in safetensors, the rest in JSON. The learning-rate schedule is a pure
function of the step and the settings (train/settings.py), and the data order of the step number
and the seed (train/data.py), so the step is also the scheduler's state and the data position.

Writing is atomic: the folder is written under a temporary name, flushed to disk, then renamed,
and only then does OUT/checkpoints/latest name it. A crash or Ctrl-C while writing leaves at worst
a temporary folder, which is ignored and later removed; the previous checkpoint stays whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from attendo.errors import CheckpointError
from attendo.train.distributed import Processes, gather_tensors
from attendo.train.export import write_atomically

# Whole tensors (gathered from FSDP shards when sharded), copied to the CPU.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
_NAME = re.compile(r"^step-(\d+)$")


def checkpoint_root(out: Path) -> Path:
    return out / "checkpoints"


def full_weights(network: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, whole, by name (a tied weight once). Collective under FSDP: every
    process calls it; under FSDP only rank 0 receives the tensors."""
    state = get_model_state_dict(network, options=FULL)
    names = [name for name, _ in network.named_parameters()]
    return {name: state[name] for name in names if name in state}


def _trainable(network: nn.Module) -> list[str]:
    return [name for name, parameter in network.named_parameters() if parameter.requires_grad]


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.iterdir(), folder]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def save_checkpoint(
    out: Path,
    step: int,
    network: nn.Module,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    processes: Processes,
    keep: int,
) -> Path | None:
    """Write the checkpoint of `step`, given the network's full_weights (every process calls
    this; rank 0 writes). Returns its folder on rank 0."""
    moments = get_optimizer_state_dict(network, optimizer, options=FULL)
    generators = gather_tensors(torch.get_rng_state(), processes)
    if not processes.is_main:
        return None
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    if final.exists():  # already saved at this step (Ctrl-C right after a periodic save)
        return final
    temporary = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    save_file({n: weights[n].contiguous() for n in _trainable(network)}, str(temporary / "weights.safetensors"))
    tensors = {
        f"{name}.{field}": value.contiguous()
        for name, fields in moments["state"].items()
        for field, value in fields.items()
        if isinstance(value, torch.Tensor)
    }
    save_file(tensors, str(temporary / "optimizer.safetensors"))
    save_file({f"cpu.rank{r}": g for r, g in enumerate(generators)}, str(temporary / "rng.safetensors"))
    groups = [{k: v for k, v in group.items()} for group in moments["param_groups"]]
    record = {**state, "step": step, "world_size": processes.world_size, "param_groups": groups}
    (temporary / "state.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    _fsync_tree(temporary)
    os.rename(temporary, final)
    write_atomically(root / "latest", lambda temporary: temporary.write_text(final.name + "\n", encoding="utf-8"))
    _prune(root, keep)
    return final


def _complete(root: Path) -> list[Path]:
    """The finished checkpoints, oldest first (temporary folders never match the name)."""
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)] if root.exists() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_unfinished(out: Path) -> None:
    """Delete temporary folders a crash left behind while writing a checkpoint."""
    root = checkpoint_root(out)
    if root.exists():
        for stale in root.glob(".step-*.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    root = checkpoint_root(out)
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text(encoding="utf-8").strip()
        if _NAME.match(named.name) and named.is_dir():
            return named
    complete = _complete(root)
    return complete[-1] if complete else None


def check_fresh(out: Path, resume: bool) -> None:
    """Refuse to start over a run that has checkpoints unless asked to resume it."""
    folder = latest_checkpoint(out)
    if folder is not None and not resume:
        raise CheckpointError(
            f"{out} already holds a training run ({folder.name}); add --resume to continue it, or choose another --out"
        )


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}: unreadable state.json ({e})") from None


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from None


def load_checkpoint(
    folder: Path, network: nn.Module, optimizer: torch.optim.Optimizer, processes: Processes, seed: int
) -> dict[str, Any]:
    """Restore the weights, optimizer state and random generators saved in `folder` (every
    process reads the files: the output folder must be on storage every node sees). Returns
    state.json. On a different number of processes the generators are seeded from (seed, step,
    rank) instead, since there is no saved state for the new ranks."""
    state = read_state(folder)
    weights = _load(folder / "weights.safetensors")
    expected = set(_trainable(network))
    if set(weights) != expected:
        extra, missing = sorted(set(weights) - expected), sorted(expected - set(weights))
        raise CheckpointError(
            f"{folder}: its weights do not match this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    set_model_state_dict(network, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    tensors = _load(folder / "optimizer.safetensors")
    moments: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, field = key.rpartition(".")
        moments.setdefault(name, {})[field] = value
    set_optimizer_state_dict(
        network, optimizer, {"state": moments, "param_groups": state["param_groups"]},
        options=StateDictOptions(full_state_dict=True),
    )  # fmt: skip
    generators = _load(folder / "rng.safetensors")
    mine = generators.get(f"cpu.rank{processes.rank}")
    if state.get("world_size") == processes.world_size and mine is not None:
        torch.set_rng_state(mine)
    else:
        torch.manual_seed(seed * 1_000_003 + state["step"] * 1_009 + processes.rank)
    return state
