"""One dataclass that describes any architecture attendo runs.

Every behaviour that differs between model families is a field here; model code reads fields and
never asks which model it is. Presets (``presets.py``) are instances of this class, and the loaders
build one from a checkpoint's own metadata (``weights/hf_config.py``, ``weights/gguf.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["decoder", "encoder", "encoder-decoder"]
PositionKind = Literal["learned", "rope", "alibi", "sinusoidal", "relative"]
NormKind = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "silu", "relu"]
LayerType = Literal["global", "sliding"]


@dataclass(frozen=True)
class ModelConfig:
    family: Family
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    context_length: int
    n_kv_heads: int | None = None  # None: as many as query heads (plain multi-head attention)
    head_dim: int | None = None  # None: dim // n_heads

    # Positions. "learned"/"sinusoidal" are added to the embeddings; "rope" rotates queries and
    # keys; "alibi" and "relative" are biases added to the attention scores.
    positions: PositionKind = "rope"
    rope_theta: float = 10_000.0
    rope_dims: int | None = None  # partial rotary: rotate only the first rope_dims of each head
    # RoPE scaling for long contexts (linear, llama3, longrope): rotary frequency i is divided by
    # rope_frequency_factors[i] (rope_dims / 2 of them), and cos/sin are multiplied by
    # rope_attention_factor. Sliding-window layers use rope_local_theta without scaling, when set.
    rope_frequency_factors: tuple[float, ...] | None = None
    rope_attention_factor: float = 1.0
    rope_local_theta: float | None = None
    position_offset: int = 0  # BART's learned positions start at index 2
    relative_buckets: int = 32
    relative_max_distance: int = 128

    # Normalisation and residual layout.
    norm: NormKind = "rmsnorm"
    norm_eps: float = 1e-5
    pre_norm: bool = True  # False: post-LN (BERT, BART, the 2017 Transformer)
    norm_weight_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + weight): offset 1
    sublayer_norms: bool = False  # Gemma 2/3: also a norm on each sublayer's output, before the residual add
    qk_norm: bool = False  # an RMSNorm over head_dim on every query and key head, before RoPE (Gemma 3, Qwen3)
    embedding_norm: bool = False  # a norm right after the embeddings (BERT, BART, BLOOM)
    final_norm: bool = True  # a norm after the last block (pre-norm stacks)

    # Feed-forward: gated (SwiGLU / gated-GELU) or plain two-layer MLP.
    mlp_gated: bool = True
    activation: Activation = "silu"

    # Biases: GPT-2 has them everywhere, LLaMA nowhere, Qwen2 only on q/k/v.
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = True  # LayerNorm's additive term (ignored by RMSNorm)

    attention_scale: float | None = None  # None: 1/sqrt(head_dim); T5 uses 1.0
    # Which layers attend to every earlier position ("global") and which only to the last
    # sliding_window positions, query included ("sliding"). A pattern repeated over the layers:
    # ("global",) is every layer; Gemma 3's five sliding layers then one global is 6 long.
    layer_types: tuple[LayerType, ...] = ("global",)
    sliding_window: int | None = None
    embedding_scale: float = 1.0  # the 2017 Transformer multiplies embeddings by sqrt(dim)
    tie_embeddings: bool = False
    logit_scale: float = 1.0  # T5 with tied embeddings scales the decoder output by dim**-0.5
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2, some Gemma 3)
    token_types: int = 0  # BERT's segment embeddings

    # The output head. An encoder checkpoint may have none (a sentence-transformers BERT gives
    # hidden states only); BERT's masked-LM head transforms (dense, activation, norm) before the
    # output projection, and BERT and BART add a bias to the logits.
    lm_head: bool = True
    head_transform: bool = False
    head_bias: bool = False

    # Encoder-decoder: how many decoder layers (n_layers counts the encoder).
    n_decoder_layers: int | None = None

    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None

    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.rope_dims is None:
            object.__setattr__(self, "rope_dims", self.head_dim)
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        object.__setattr__(self, "layer_types", _shortest_period(tuple(self.layer_types)))
        if self.rope_frequency_factors is not None:
            object.__setattr__(self, "rope_frequency_factors", tuple(float(f) for f in self.rope_frequency_factors))
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "context_length"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.positions == "rope" and (self.rope_dims % 2 or self.rope_dims > self.head_dim):
            problems.append(f"rope_dims ({self.rope_dims}) must be even and at most head_dim ({self.head_dim})")
        if set(self.layer_types) - {"global", "sliding"}:
            problems.append(f"layer_types must be 'global' or 'sliding', got {self.layer_types}")
        if "sliding" in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
            problems.append(f"sliding layers need a positive sliding_window, got {self.sliding_window}")
        factors = self.rope_frequency_factors
        if factors is not None and len(factors) != self.rope_dims // 2:
            problems.append(f"rope_frequency_factors has {len(factors)} values, rope_dims / 2 is {self.rope_dims // 2}")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    @property
    def causal(self) -> bool:
        return self.family != "encoder"

    @property
    def decoder_layers(self) -> int:
        """Layers of the decoder stack of an encoder-decoder (n_layers counts the encoder's)."""
        return self.n_decoder_layers or self.n_layers

    def layer_type(self, layer: int) -> LayerType:
        return self.layer_types[layer % len(self.layer_types)]

    @property
    def has_sliding_layers(self) -> bool:
        return any(self.layer_type(i) == "sliding" for i in range(max(self.n_layers, self.decoder_layers)))

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _shortest_period(pattern: tuple[str, ...]) -> tuple[str, ...]:
    """The shortest prefix that, repeated, gives the pattern: a per-layer list read from a
    checkpoint (18 entries for Gemma 3 270M) and the 6-long pattern it repeats are one config."""
    for period in range(1, len(pattern)):
        if all(kind == pattern[i % period] for i, kind in enumerate(pattern)):
            return pattern[:period]
    return pattern or ("global",)
