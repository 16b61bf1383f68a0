"""Read a sentence-transformers model's pooling recipe: modules.json, 1_Pooling/config.json,
sentence_bert_config.json. The one place that knows those files' keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attendo.errors import CheckpointError, UnsupportedModelError
from attendo.layers.pooling import Pooling, PoolingMode

_MODES: dict[str, PoolingMode] = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}
_UNSUPPORTED_MODES = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON ({e})") from None


def read_pooling(directory: Path) -> Pooling:
    """The directory's pooling; without sentence-transformers files, mean pooling (what
    sentence-transformers itself uses for a plain transformers model), not normalized."""
    if not directory.is_dir() or not (directory / "modules.json").exists():
        return Pooling()
    modules = _json(directory / "modules.json")
    kinds = {m.get("type", "").rpartition(".")[2]: m for m in modules}
    unknown = [kind for kind in kinds if kind not in _KNOWN_MODULES]
    if unknown:
        raise UnsupportedModelError(
            f"{directory}: modules.json has a {unknown[0]} module, which attendo does not run "
            f"(it runs {', '.join(_KNOWN_MODULES)})"
        )
    mode: PoolingMode = "mean"
    if "Pooling" in kinds:
        settings = _json(directory / kinds["Pooling"].get("path", "1_Pooling") / "config.json")
        chosen = [_MODES[key] for key in _MODES if settings.get(key)]
        unsupported = [key for key in _UNSUPPORTED_MODES if settings.get(key)]
        if unsupported or len(chosen) != 1:
            raise UnsupportedModelError(
                f"{directory}: pooling {', '.join(unsupported) or chosen or 'none'} is not supported "
                "(exactly one of mean, cls, max or mean_sqrt_len)"
            )
        mode = chosen[0]
    bert_config = directory / "sentence_bert_config.json"
    max_length = _json(bert_config).get("max_seq_length") if bert_config.exists() else None
    return Pooling(mode=mode, normalize="Normalize" in kinds, max_length=max_length)
