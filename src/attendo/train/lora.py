"""LoRA: low-rank adapters on a model's linear layers, saved and read in PEFT's adapter format.

An adapter adds scale · B A x to a linear layer's output, with A (rank, in) and B (out, rank)
the only weights that train and scale = alpha / rank. Users (and the `peft` library) name the
layers as the checkpoint does: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
(LLaMA, Mistral, Qwen2), c_attn, c_proj, c_fc (GPT-2), query_key_value, dense, dense_h_to_4h,
dense_4h_to_h (BLOOM), q, k, v, o, wi, wi_0, wi_1, wo (T5), q_proj, k_proj, v_proj, out_proj,
fc1, fc2 (BART). attendo's own layers are fused (one q/k/v projection, one gate/up projection),
so an adapter on q_proj is a low-rank update of the q rows of our fused qkv layer. Which rows
is not written down a second time: the loader's weight-name rules (weights/names.py, which the
Model keeps as ``model.checkpoint_names``) are run on stand-ins that number every element of
every source matrix, and where the numbers land says where each source row went (and whether
the source is stored transposed, as GPT-2's Conv1D is).

API (attendo.train.lora):
    LoraSettings(rank=8, alpha=16.0, dropout=0.0, target_modules=None)
        target_modules: checkpoint layer names as PEFT takes them (a name matches a layer whose
        path is that name or ends in "." + name), or "all-linear"; None: PEFT's default for the
        model type (the query and value projections).
    add_lora(model, settings) -> list[str]
        adapters on every targeted layer; every other weight is frozen (requires_grad False).
        Returns the names of the trainable parameters. An unknown target name is an AdapterError
        listing the valid ones.
    adapter_state(model) -> dict[str, Tensor]
        PEFT's tensor names: base_model.model.<layer path>.lora_A.weight (rank, in) and
        .lora_B.weight (out, rank).
    save_adapter(model, out_dir, base_model=None) -> Path
        adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel.
    load_adapter(model, directory)
        apply a PEFT LoRA adapter directory (ours or one made by peft); attendo.load(base,
        adapter=DIR) calls it. Everything is checked before the model changes.
    merge_lora(model)
        fold every adapter into its layer's weights (W += scale · B A); the layers are plain again.
    lora_layers(network) -> list[(name, LoraLinear)]

Quantized bases (a GGUF file's Q8_0/Q4_0/Q4_1 blocks, int8/int4, 16-bit weights): an adapter
runs beside the layer, which stays as it is; the update x Aᵀ Bᵀ never needs the base weight, so
nothing is dequantized for it. Merging into blocks would round most of a small update away, so
merge_lora refuses there: load the base with dtype="float32" to merge.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from attendo import optimize
from attendo.datafiles import read_json
from attendo.errors import AdapterError, CheckpointError
from attendo.model import Model
from attendo.train.export import write_json, write_safetensors
from attendo.weights.names import CheckpointNames, Rule, only, rule_for
from attendo.weights.safetensors_dir import PICKLE_SUFFIXES, read_safetensors_header, refuse_pickle

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT wraps the transformers model twice (PeftModel.base_model is a LoraModel whose .model is it).
PEFT_PREFIX = "base_model.model."
_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])\.weight$")
TASK_TYPES = {"decoder": "CAUSAL_LM", "encoder-decoder": "SEQ_2_SEQ_LM", "encoder": "FEATURE_EXTRACTION"}
ALL_LINEAR = "all-linear"
# PEFT's own default targets per checkpoint naming: the attention's query and value projections
# (PEFT has none for phi3, whose q/k/v is one fused qkv_proj: name the targets).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "t5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
}
_LINEAR_LAYERS = (nn.Linear, optimize.HalfLinear, optimize.BlockLinear)
# Adapter options that change what the tensors mean; attendo refuses rather than misapply them.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "trained biases (lora_bias)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(t for t in self.target_modules.split(",") if t))
        elif self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.rank < 1:
            raise AdapterError(f"LoRA rank must be at least 1, got {self.rank}")
        if self.alpha <= 0:
            raise AdapterError(f"LoRA alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules == ():
            raise AdapterError("no LoRA target modules given")


class LoraPart(nn.Module):
    """One checkpoint layer's adapter: scale · B A x on some of our layer's output rows.

    A (rank, in) and B (len(rows), rank) are PEFT's lora_A and lora_B of the checkpoint layer
    `path`; rows (len(rows),) are the indices among our layer's outputs of its outputs, in the
    checkpoint layer's order. transposed: the checkpoint stores that layer's weight as (in, out)
    (PEFT's fan_in_fan_out; A and B are the same either way).
    """

    def __init__(
        self, path: str, rows: torch.Tensor, in_features: int, rank: int, alpha: float, dropout: float, transposed: bool
    ) -> None:
        super().__init__()
        self.path, self.alpha, self.transposed = path, alpha, transposed
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_features, device=rows.device))
        self.B = nn.Parameter(torch.zeros(len(rows), rank, device=rows.device))  # B = 0: the model starts unchanged
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as PEFT (and nn.Linear) initialise A
        self.register_buffer("rows", rows, persistent=False)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) → (..., len(rows))."""
        return (self.dropout(x) @ self.A.t()) @ self.B.t() * self.scale

    def weight_delta(self) -> torch.Tensor:
        """What the adapter adds to the checkpoint layer's weight rows: (len(rows), in)."""
        return self.B @ self.A * self.scale


class LoraLinear(nn.Module):
    """A linear layer (float, 16-bit or block-quantized, left as it is) plus the LoRA parts on
    its output rows, keyed by the checkpoint layer's last name (q_proj, k_proj, ...)."""

    def __init__(self, base: nn.Module, parts: dict[str, LoraPart]) -> None:
        super().__init__()
        self.base = base
        self.parts = nn.ModuleDict(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for part in self.parts.values():
            y = y.index_add(-1, part.rows, part(x.to(part.A.dtype)).to(y.dtype))
        return y


@dataclass(frozen=True)
class _Site:
    """A checkpoint linear layer that an adapter can target, and where it sits among ours."""

    module: str  # our layer, e.g. "blocks.0.attn.qkv"
    path: str  # the checkpoint's layer, e.g. "model.layers.0.self_attn.q_proj"
    rule: Rule
    sources: tuple[str, ...]
    index: int  # which of the rule's sources this layer is
    weight_shape: tuple[int, int]  # our layer's (out, in)


def lora_layers(network: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(name, m) for name, m in network.named_modules() if isinstance(m, LoraLinear)]


def target_names(model: Model) -> list[str]:
    """The layer names a LoRA target may be, as the checkpoint names them (plus all-linear)."""
    return sorted({site.path.rpartition(".")[2] for site in _sites(model)}) + [ALL_LINEAR]


def add_lora(model: Model, settings: LoraSettings) -> list[str]:
    """Put a fresh adapter (A random, B zero) on every targeted layer and freeze everything else.
    Returns the trainable parameters' names."""
    _refuse_second_adapter(model)
    names = _checkpoint_names(model)
    targets = settings.target_modules or DEFAULT_TARGETS.get(names.model_type)
    if not targets:
        raise AdapterError(f"no default LoRA targets for {names.model_type} models: give target modules")
    sites = _sites(model)
    for target in targets:
        if not any(_matches(site, (target,)) for site in sites):
            valid = ", ".join(target_names(model))
            raise AdapterError(f"unknown LoRA target module {target!r} for this {names.model_type} model (valid: {valid})")
    chosen = [site for site in sites if _matches(site, targets)]
    rows = _placements(names, chosen)
    parts = {
        site: LoraPart(site.path, rows[site][0], site.weight_shape[1], settings.rank, settings.alpha, settings.dropout, rows[site][1])
        for site in chosen
    }
    model.network.requires_grad_(False)
    for part in parts.values():
        part.requires_grad_(True)
    _attach(model.network, parts)
    return [name for name, p in model.network.named_parameters() if p.requires_grad]


def adapter_state(model: Model) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's tensor names (float32, contiguous)."""
    state = {}
    for _, layer in lora_layers(model.network):
        for part in layer.parts.values():
            state[f"{PEFT_PREFIX}{part.path}.lora_A.weight"] = part.A.detach().float().contiguous()
            state[f"{PEFT_PREFIX}{part.path}.lora_B.weight"] = part.B.detach().float().contiguous()
    return state


def save_adapter(model: Model, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write adapter_config.json and adapter_model.safetensors as PEFT does; return out_dir.
    base_model: what adapter_config.json names as the base (default: where the model came from)."""
    parts = [part for _, layer in lora_layers(model.network) for part in layer.parts.values()]
    if not parts:
        raise AdapterError("the model has no LoRA adapter to save (add_lora or load_adapter first)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each file replaced whole: training saves the adapter again at every checkpoint.
    write_safetensors(out / WEIGHTS_FILE, adapter_state(model), metadata={"format": "pt"})
    write_json(out / CONFIG_FILE, _adapter_config(model, parts, base_model))
    return out


def load_adapter(model: Model, directory: str | Path) -> None:
    """Apply the PEFT LoRA adapter in directory to the model (its weights stay frozen)."""
    _refuse_second_adapter(model)
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path, tensors = _read_adapter_weights(directory)
    pairs = _lora_pairs(tensors, weights_path)
    sites = {site.path: site for site in _sites(model)}
    names = _checkpoint_names(model)
    chosen = []
    for path, (a, b) in pairs.items():
        site = sites.get(path)
        if site is None:
            raise AdapterError(f"{weights_path}: has LoRA weights for {path}, which this {names.model_type} model does not have")
        chosen.append(site)
    placements = _placements(names, chosen)
    parts = {}
    for site in chosen:
        a, b = pairs[site.path]
        rows, transposed = placements[site]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != site.weight_shape[1] or b.shape != (len(rows), a.shape[0]):
            raise AdapterError(
                f"{weights_path}: LoRA weights for {site.path} are A {list(a.shape)} and B {list(b.shape)}, but this "
                f"model's layer needs A [rank, {site.weight_shape[1]}] and B [{len(rows)}, rank]: "
                "the adapter was made for a different base model"
            )
        rank = a.shape[0]
        alpha = _alpha_for(config, site.path)
        if config.get("use_rslora"):  # rank-stabilised LoRA: scale = alpha / sqrt(rank)
            alpha *= math.sqrt(rank)
        part = LoraPart(site.path, rows, a.shape[1], rank, alpha, 0.0, transposed)
        with torch.no_grad():
            part.A.copy_(a)
            part.B.copy_(b)
        part.requires_grad_(False)
        parts[site] = part
    _attach(model.network, parts)


def merge_lora(model: Model) -> None:
    """Fold every adapter into its layer's weights: W[rows] += scale · B A. The outputs stay the
    same (to float rounding) and the layers become plain linear layers again."""
    layers = lora_layers(model.network)
    for name, layer in layers:
        if not isinstance(layer.base, nn.Linear):
            raise AdapterError(
                f"cannot merge a LoRA adapter into {name}, whose weights are {type(layer.base).__name__} "
                "(quantized or 16-bit): load the base model with dtype='float32' to merge"
            )
    network = model.network
    embedding = getattr(getattr(network, "embed", None), "weight", None)
    for name, layer in layers:
        base = layer.base
        with torch.no_grad():
            weight = base.weight.detach().clone()  # a new tensor: a tied embedding keeps its own
            for part in layer.parts.values():
                weight.index_add_(0, part.rows, part.weight_delta().to(weight.dtype))
        if base.weight is embedding and network.config.tie_embeddings:
            network.config = network.config.replace(tie_embeddings=False)  # the head now differs
        base.weight = nn.Parameter(weight, requires_grad=False)
        network.set_submodule(name, base)


def read_adapter_config(directory: Path) -> dict[str, Any]:
    """adapter_config.json, checked for what attendo can apply."""
    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    if not path.exists():
        raise AdapterError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    config = read_json(path, AdapterError)
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: a {config['peft_type']} adapter; attendo applies LoRA adapters only")
    for option, what in _REFUSED_OPTIONS.items():
        if config.get(option):
            raise AdapterError(f"{path}: uses {what}, which attendo does not apply")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: trains biases (bias={config['bias']!r}), which attendo does not apply")
    if config.get("modules_to_save"):
        raise AdapterError(f"{path}: also saves whole modules ({', '.join(config['modules_to_save'])}), which attendo does not apply")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
    return config


def _refuse_second_adapter(model: Model) -> None:
    if lora_layers(model.network):
        raise AdapterError("the model already has a LoRA adapter: merge it (merge_lora) or load the base model again")


def _checkpoint_names(model: Model) -> CheckpointNames:
    names = getattr(model, "checkpoint_names", None)
    if names is None:
        raise AdapterError(
            f"{model.source}: LoRA needs a model loaded from a checkpoint with attendo.load (its layer names "
            "are the checkpoint's); save this one as a model directory first"
        )
    return names


def _weight_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, optimize.HalfLinear):
        return tuple(module.weight.shape)  # type: ignore[return-value]
    return module.out_features, module.in_features


def _sites(model: Model) -> list[_Site]:
    """Every checkpoint linear layer that makes (part of) one of our linear layers."""
    names = _checkpoint_names(model)
    found = []
    # remove_duplicate=False: a head tied to the embedding is also reachable as embed.table.
    for name, module in model.network.named_modules(remove_duplicate=False):
        if isinstance(module, LoraLinear):  # an adapted layer is still the checkpoint's layer
            module = module.base
        if not isinstance(module, _LINEAR_LAYERS):
            continue
        match = rule_for(names.rules, f"{name}.weight")
        if match is None:
            continue
        rule, sources = match
        for index, source in enumerate(sources):
            found.append(_Site(name, source.removesuffix(".weight"), rule, sources, index, _weight_shape(module)))
    return found


def _matches(site: _Site, targets: Sequence[str]) -> bool:
    """PEFT's rule: a target names a layer whose path is the target or ends in "." + target;
    all-linear is every linear layer but the output head."""
    return any(
        (t == ALL_LINEAR and site.module != "lm_head") or site.path == t or site.path.endswith("." + t) for t in targets
    )


def _placements(names: CheckpointNames, sites: list[_Site]) -> dict[_Site, tuple[torch.Tensor, bool]]:
    """For each site: our layer's rows that its outputs become (in its order), and whether the
    checkpoint stores it transposed. Layers of one kind share the answer, so each rule and set of
    shapes is worked out once."""
    worked: dict[tuple, list[tuple[torch.Tensor, bool]] | None] = {}
    placed = {}
    for site in sites:
        shapes = tuple(names.shapes.get(s) for s in site.sources)
        if None in shapes and site.rule.combine is only:  # a tied head: the file has no tensor of its own
            shapes = (site.weight_shape,)
        key = (site.rule, shapes, site.weight_shape)
        if key not in worked:
            worked[key] = None if None in shapes else _row_placements(site.rule, shapes, site.weight_shape)  # type: ignore[arg-type]
        if worked[key] is None:
            raise AdapterError(f"a LoRA adapter on {site.path} cannot be applied to {site.module}: its weight is not made of whole rows of {site.path}")
        rows, transposed = worked[key][site.index]  # type: ignore[index]
        placed[site] = (rows, transposed)
    return placed


def _row_placements(
    rule: Rule, shapes: Sequence[tuple[int, ...]], weight_shape: tuple[int, int]
) -> list[tuple[torch.Tensor, bool]] | None:
    """Run the rule on stand-ins numbering every source element: each of our rows must be one
    whole row of a source matrix (or a whole column, when the source is stored transposed), with
    its columns in order. None when the rule does anything else (then rows cannot be adapted)."""
    if any(len(shape) != 2 for shape in shapes):
        return None
    sizes = [shape[0] * shape[1] for shape in shapes]
    ends = torch.tensor(sizes).cumsum(0)
    numbered = [torch.arange(int(end) - size, int(end)).reshape(shape) for end, size, shape in zip(ends, sizes, shapes)]
    combined = rule.combine(numbered)
    if tuple(combined.shape) != weight_shape:
        return None
    columns = torch.arange(weight_shape[1])
    source = torch.bucketize(combined[:, 0].contiguous(), ends, right=True)  # which source each of our rows is from
    placements = []
    for index, (shape, end, size) in enumerate(zip(shapes, ends, sizes)):
        ours = (source == index).nonzero().flatten()
        local = combined[ours] - (int(end) - size)  # (rows, in): element numbers within the source
        row, column = local // shape[1], local % shape[1]
        if (row == row[:, :1]).all() and (column == columns).all():
            outputs, transposed = row[:, 0], False
        elif (column == column[:, :1]).all() and (row == columns).all():
            outputs, transposed = column[:, 0], True
        else:
            return None
        if sorted(outputs.tolist()) != list(range(shape[1] if transposed else shape[0])):
            return None
        rows = torch.empty_like(ours)
        rows[outputs] = ours
        placements.append((rows, transposed))
    return placements


def _attach(network: nn.Module, parts: dict[_Site, LoraPart]) -> None:
    by_module: dict[str, dict[str, LoraPart]] = {}
    for site, part in parts.items():
        key = site.path.rpartition(".")[2]
        by_module.setdefault(site.module, {})[key] = part
    for module_name, module_parts in by_module.items():
        base = network.get_submodule(module_name)
        device = next(iter([*base.parameters(), *base.buffers()])).device
        network.set_submodule(module_name, LoraLinear(base, module_parts).to(device))


def _read_adapter_weights(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    path = directory / WEIGHTS_FILE
    if not path.exists():
        pickles = sorted(p for p in directory.iterdir() if p.stem == "adapter_model" and p.suffix in PICKLE_SUFFIXES)
        if pickles:
            refuse_pickle(pickles[0])
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE}")
    try:
        read_safetensors_header(path)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    return path, load_file(str(path))


def _lora_pairs(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{checkpoint layer path: (A, B)} from PEFT's tensor names."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.match(name)
        if match is None:
            raise AdapterError(f"{path}: tensor {name!r} is not a LoRA weight attendo can apply")
        found.setdefault(match["path"], {})[match["part"]] = tensor.float()
    if not found:
        raise AdapterError(f"{path}: holds no LoRA weights")
    for layer, pair in found.items():
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise AdapterError(f"{path}: {layer} has no lora_{missing} weight")
    return {layer: (pair["A"], pair["B"]) for layer, pair in found.items()}


def _alpha_for(config: dict[str, Any], path: str) -> float:
    """lora_alpha, or the alpha_pattern entry whose key matches the layer as PEFT matches it."""
    for key, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):
            return float(alpha)
    return float(config["lora_alpha"])


def _adapter_config(model: Model, parts: list[LoraPart], base_model: str | None) -> dict[str, Any]:
    """PEFT's LoraConfig fields. The most common rank and alpha are r and lora_alpha; layers
    that differ (an adapter loaded with patterns) get rank_pattern / alpha_pattern entries."""
    rank = Counter(p.rank for p in parts).most_common(1)[0][0]
    alpha = Counter(p.alpha for p in parts).most_common(1)[0][0]
    dropouts = [p.dropout.p for p in parts if isinstance(p.dropout, nn.Dropout)]
    adapted = {p.path for p in parts}
    leaves = sorted({path.rpartition(".")[2] for path in adapted})
    # Short names where they pick exactly these layers (PEFT matches them by suffix), else paths.
    by_leaf = {site.path for site in _sites(model) if _matches(site, leaves)}
    return {
        "peft_type": "LORA",
        "task_type": TASK_TYPES[model.config.family],
        "base_model_name_or_path": base_model if base_model is not None else str(model.source),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropouts[0] if dropouts else 0.0,
        "target_modules": leaves if by_leaf == adapted else sorted(adapted),
        "rank_pattern": {p.path: p.rank for p in parts if p.rank != rank},
        "alpha_pattern": {p.path: p.alpha for p in parts if p.alpha != alpha},
        "fan_in_fan_out": any(p.transposed for p in parts),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
