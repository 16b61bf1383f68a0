"""The Model: a network, its tokenizer and its generation defaults, behind one small API."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch
from torch import nn

from attendo import fused, optimize
from attendo.config import ModelConfig
from attendo.errors import InvalidSettingError, UnsupportedModelError
from attendo.generation.beam import BeamSettings, decoder_beam_search, split_beam_settings
from attendo.generation.lookup import LookupBatch, check_draft_tokens
from attendo.generation.loop import Batch, Event, GenerationResult, Request, run
from attendo.generation.sampler import SamplingSettings
from attendo.layers.attention import LayerRecord, Recorded
from attendo.tokenizer import TextTokenizer
from attendo.weights.names import CheckpointNames

if TYPE_CHECKING:
    from attendo.inspect.stages import StagesReport
    from attendo.prompting.grammar import Grammar, Vocabulary

DEFAULT_MAX_NEW_TOKENS = 128
Prompt = str | list[int]  # text, or token ids (e.g. from encode_chat)
_SETTING_NAMES = {f.name for f in fields(SamplingSettings)}


class Model:
    def __init__(
        self, network: nn.Module, tokenizer: TextTokenizer, generation_defaults: dict[str, Any], source: Path
    ) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.generation_defaults = generation_defaults
        self.source = source
        self.decode_step: Callable[..., torch.Tensor] | None = None
        # How the checkpoint's tensors made the parameters (attendo.load sets it; None for a model
        # built from a preset). LoRA adapters name our fused layers' parts with it.
        self.checkpoint_names: CheckpointNames | None = None
        self._vocabulary: Vocabulary | None = None  # the tokens as the grammar library sees them, made on first use

    def speed_up(self, weights: str = "int8", compile: bool = True) -> Model:
        """Faster decoding (see attendo.optimize): float32 matrices stored as "int8" or "int4"
        (weight-only quantization; also by ggml's names q8_0, q4_0, q4_1), "float16" or "bfloat16",
        or kept "float32"; matrices already quantized (a GGUF file's) stay as they are. A network
        whose blocks run fused in C (attendo.fused: LLaMA-, Qwen2-, GPT-2-, BLOOM-style decoders)
        needs nothing more; any other gets a compiled decode step: the first generation after
        this compiles (a minute or more), later ones reuse it."""
        if weights in optimize.QUANTIZED_FORMATS:
            optimize.quantize_weights(self.network, optimize.QUANTIZED_FORMATS[weights])
        elif weights in ("float16", "bfloat16"):
            optimize.half_weights(self.network, getattr(torch, weights))
        elif weights != "float32":
            raise InvalidSettingError(
                f"unknown weight format {weights!r} (use {', '.join(optimize.QUANTIZED_FORMATS)}, float16, bfloat16 or float32)"
            )
        fused.fuse_blocks(self.network)  # the plan reads the modules now present
        if compile and fused.unfusable(self.network) is not None:  # the fused C blocks need no compiling
            self.decode_step = optimize.compile_decode(self.network)
        return self

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    @property
    def eos_token_ids(self) -> list[int]:
        return self.generation_defaults.get("eos_token_ids", [])

    def __repr__(self) -> str:
        c = self.config
        return f"Model({self.source.name}: {c.family}, {c.n_layers} layers, dim {c.dim}, {c.n_heads} heads)"

    @torch.inference_mode()
    def logits(self, token_ids: torch.Tensor | list[list[int]]) -> torch.Tensor:
        """Float logits (batch, positions, vocabulary) for token ids (batch, positions)."""
        return self.network(_as_batch(token_ids)).float()

    @torch.inference_mode()
    def attention_maps(self, token_ids: torch.Tensor | list[list[int]], layer: int | None = None) -> torch.Tensor:
        """Attention weights (layers, batch, heads, query positions, key positions), from the
        explicit softmax(QKᵀ/√d)V path; with `layer`, that layer's only (the first axis is 1), and
        the layers above it are not run."""
        record = LayerRecord(layer, end_pass=True)
        with contextlib.suppress(Recorded):
            self.network(_as_batch(token_ids), record=record)
        return torch.stack(record)

    @torch.inference_mode()
    def next_token_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float logits (vocabulary,) of the token after token_ids; the LM head, the largest
        product of a small model, runs at the last position only."""
        tokens = _as_batch([token_ids])
        return self.network(tokens, logits_index=torch.tensor([tokens.shape[1] - 1]))[0].float()

    def sampling_stages(
        self, prompt: str | list[int], *, top: int = 20, chosen: int | None = None, **settings: Any
    ) -> StagesReport:
        """The next token's distribution after each sampler stage, with the settings generate()
        would use (see attendo.inspect.stages); `chosen` marks a token, else the one generate()
        would pick first with these settings and seed."""
        from attendo.inspect.stages import model_stages

        ids = self._encode_prompt(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        return model_stages(self, ids, self.sampling_settings(**settings), top=top, chosen=chosen)

    def sampling_settings(self, **overrides: Any) -> SamplingSettings:
        """The model's own defaults (generation_config.json) with the given settings on top.

        Asking for any sampling control (temperature > 0, top_k, top_p, min_p) without saying
        do_sample turns sampling on, since that is what asking for it means.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - _SETTING_NAMES
        if unknown:
            raise InvalidSettingError(f"unknown generation setting {sorted(unknown)[0]!r}")
        defaults = {k: v for k, v in self.generation_defaults.items() if k in _SETTING_NAMES}
        settings = {**defaults, **given}
        if "do_sample" not in given and any(k in given for k in ("top_k", "top_p", "min_p", "temperature")):
            settings["do_sample"] = given.get("temperature", 1.0) != 0
        return SamplingSettings(**settings)

    def _requests(
        self,
        prompts: list[Prompt],
        max_new_tokens: int | None,
        stop: str | list[str] | None,
        logprobs: int | None,
        settings: dict[str, Any],
        structure: dict[str, Any],
    ) -> list[Request]:
        grammar = self.grammar(**structure)
        sampling = self.sampling_settings(**settings)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        limit = max_new_tokens  # 0 is invalid, not "use the default": check_request rejects it
        if limit is None:
            limit = self.generation_defaults.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
        return [Request(self._encode_prompt(p), sampling, limit, stops, logprobs, grammar) for p in prompts]

    def grammar(self, *, json_schema: Any = None, regex: str | None = None) -> Grammar | None:
        """The constraint for structured output (see attendo.prompting.grammar): a JSON Schema (a
        dict, JSON text, or a pydantic model class; {"type": "object"} for any JSON object) or a
        regular expression the whole output must match. None when neither is given."""
        if json_schema is not None and regex is not None:
            raise InvalidSettingError("give json_schema or regex, not both")
        if json_schema is None and regex is None:
            return None
        vocabulary = self.grammar_vocabulary
        return vocabulary.json_schema(json_schema) if json_schema is not None else vocabulary.regex(regex)

    @property
    def grammar_vocabulary(self) -> Vocabulary:
        """The tokens as the grammar library sees them (made on first use, ~0.3 s for 49k tokens)."""
        if self._vocabulary is None:
            from attendo.prompting.grammar import Vocabulary

            self._vocabulary = Vocabulary(self.tokenizer, self.config.vocab_size, self.eos_token_ids)
        return self._vocabulary

    def _encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)  # token ids, e.g. from encode_chat; the loop checks their range
        if not isinstance(prompt, str):
            raise InvalidSettingError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if not ids and self.config.bos_token_id is not None:
            ids = [self.config.bos_token_id]  # an empty prompt means "start from scratch"
        return ids

    def _batch(self, requests: list[Request], prompt_lookup: int = 0) -> Batch:
        """A batch for the requests; with prompt_lookup, one that checks that many draft tokens
        per step while a single sequence decodes (attendo.generation.lookup)."""
        longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
        if self.decode_step is not None:  # few distinct cache shapes, so few compilations
            longest = max(256, 1 << (longest - 1).bit_length())
        max_len = min(self.config.context_length, longest)
        lookup = {"draft_tokens": prompt_lookup} if prompt_lookup else {}
        return (LookupBatch if prompt_lookup else Batch)(
            self.network, self.tokenizer, self.eos_token_ids, slots=len(requests), max_len=max_len,
            decode_step=self.decode_step, **lookup,
        )

    @overload
    def generate(self, prompt: str | list[int], **kwargs: Any) -> GenerationResult: ...
    @overload
    def generate(self, prompt: list[str] | list[list[int]], **kwargs: Any) -> list[GenerationResult]: ...

    def generate(
        self,
        prompt: Prompt | list[Prompt],
        *,
        max_new_tokens: int | None = None,
        stop: str | list[str] | None = None,
        logprobs: int | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        prompt_lookup: int = 0,
        **settings: Any,
    ) -> GenerationResult | list[GenerationResult]:
        """Complete one prompt or a batch of prompts; a prompt is text or a list of token ids.

        Settings (see SamplingSettings): do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, presence_penalty, frequency_penalty, seed; beam search (see
        BeamSettings): num_beams, length_penalty, early_stopping, no_repeat_ngram_size.
        stop: strings that end generation (not included in the text). logprobs: also return each
        chosen token's log probability and the top `logprobs` alternatives. json_schema or regex:
        structured output (see `grammar`): every token keeps the text inside the schema or regex,
        and a finished text ("stop") matches it; cut off by max_new_tokens ("length"), it is a
        prefix of a match. prompt_lookup: check up to this many draft tokens per step, copied from
        where the text's last few tokens occurred before (attendo.generation.lookup); the same
        tokens, sooner when the answer repeats its prompt (rewriting code, quoting). 0: off.
        """
        single = _is_single(prompt)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise InvalidSettingError("no prompts given")
        search, settings = split_beam_settings(settings, self.generation_defaults)
        requests = self._requests(prompts, max_new_tokens, stop, logprobs, settings, {"json_schema": json_schema, "regex": regex})
        _check_no_grammar(requests, search)
        results = self._complete(requests, search, _lookup_drafts(prompt_lookup, search))
        return results[0] if single else results

    def _complete(self, requests: list[Request], search: BeamSettings, prompt_lookup: int = 0) -> list[GenerationResult]:
        """Run requests to the end: beam search one prompt at a time, or all together in one batch."""
        if search.num_beams > 1:
            return [decoder_beam_search(self.network, self.tokenizer, self.eos_token_ids, r, search) for r in requests]
        _check_no_ngram_ban(search)
        batch = self._batch(requests, prompt_lookup)
        sequences = [batch.add(r) for r in requests]
        while batch.busy:
            batch.step()
        return [s.result() for s in sequences]

    def _events(self, requests: list[Request], search: BeamSettings, prompt_lookup: int = 0) -> Iterator[Event]:
        """Every token of every request as it is chosen (greedy decoding or sampling)."""
        _check_no_ngram_ban(search)
        return run(self._batch(requests, prompt_lookup), requests)

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int | None = None,
        stop: str | list[str] | None = None,
        json_schema: Any = None,
        regex: str | None = None,
        prompt_lookup: int = 0,
        **settings: Any,
    ) -> Generator[str, None, GenerationResult]:
        """Text pieces as they are generated; joined, they equal generate(...).text. The
        generator's return value (StopIteration.value) is the GenerationResult.

        Beam search only knows its best sequence at the end: it yields the whole text at once."""
        search, settings = split_beam_settings(settings, self.generation_defaults)
        requests = self._requests([prompt], max_new_tokens, stop, None, settings, {"json_schema": json_schema, "regex": regex})
        _check_no_grammar(requests, search)
        drafts = _lookup_drafts(prompt_lookup, search)
        if search.num_beams > 1:
            result = self._complete(requests, search)[0]
            yield result.text
            return result
        for event in self._events(requests, search, drafts):
            if event.text:
                yield event.text
        return event.sequence.result()

    def chat_prompt(self, messages: list[dict[str, Any]], **variables: Any) -> str:
        """The conversation as the chat template renders it: what the model reads, for showing."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **variables)

    def encode_chat(self, messages: list[dict[str, Any]], **variables: Any) -> list[int]:
        """The conversation's token ids, text inside messages always encoded as text (see
        TextTokenizer.encode_chat); pass them to generate or stream."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, **variables)

    def chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> GenerationResult:
        """Answer a conversation ([{"role": ..., "content": ...}, ...]) with the model's chat template."""
        return self.generate(self.encode_chat(messages), **kwargs)

    def embed(self, texts: str | list[str], normalize: bool | None = None) -> torch.Tensor:
        """Sentence embeddings (n, dim): encoder-only models (see EncoderModel)."""
        raise UnsupportedModelError(
            f"{self.source.name} is a {self.config.family} model; sentence embeddings need an "
            "encoder-only model such as all-minilm-l6-v2"
        )

    def fill_mask(self, text: str, top_k: int = 5) -> list[Any]:
        """The likeliest tokens for a masked position: BERT-style models (see EncoderModel)."""
        raise UnsupportedModelError(
            f"{self.source.name} is a {self.config.family} model; fill_mask needs an encoder-only model "
            "with a masked-language-model head (a BERT checkpoint such as bert-base-uncased)"
        )


def _is_single(prompt: Any) -> bool:
    """One prompt (text, or token ids) rather than a list of them."""
    return isinstance(prompt, str) or (isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], int))


def _check_no_grammar(requests: list[Request], search: BeamSettings) -> None:
    if search.num_beams > 1 and any(r.grammar is not None for r in requests):
        raise InvalidSettingError("json_schema and regex work with greedy decoding or sampling, not beam search")


def _lookup_drafts(prompt_lookup: Any, search: BeamSettings) -> int:
    """generate's prompt_lookup, checked: a count of draft tokens, and no beam search beside it."""
    drafts = check_draft_tokens(prompt_lookup)
    if drafts and search.num_beams > 1:
        raise InvalidSettingError("prompt_lookup works with greedy decoding or sampling, not beam search")
    return drafts


def _check_no_ngram_ban(search: BeamSettings) -> None:
    if search.no_repeat_ngram_size:
        raise InvalidSettingError("no_repeat_ngram_size needs beam search (num_beams > 1) with a decoder-only model")


def _as_batch(token_ids: torch.Tensor | list[list[int]]) -> torch.Tensor:
    tokens = torch.as_tensor(token_ids, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2:
        raise InvalidSettingError(f"token_ids must be (batch, positions), got shape {list(tokens.shape)}")
    return tokens
