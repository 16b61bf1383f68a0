"""Generation with an encoder-decoder model (T5, BART, the 2017 Transformer).

1. Encode the input once; padding of shorter inputs in a batch is masked out.
2. Start the decoder with its start token (T5: the pad token; BART: the end token).
3. Each step, the decoder attends to itself, reading earlier positions from its KV cache, and to
   the encoder output, whose keys and values each layer computes at the first step and keeps.
4. Choose the next token (the sampler, or beam search) until the end-of-sequence token or the
   limit. Tokens the model's generation config forces (forced_bos_token_id at the first step,
   forced_eos_token_id at the last one the limit allows) replace the choice at their steps.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

import torch

from attendo.config import ModelConfig
from attendo.errors import ContextLengthError, InvalidSettingError
from attendo.generation.beam import (
    BeamSettings,
    ForcedTokens,
    ban_repeated_ngrams,
    beam_result,
    beam_search,
    check_beam_request,
)
from attendo.generation.loop import Event, GenerationResult, Request, Sequence, accept_token
from attendo.generation.sampler import make_generator
from attendo.generation.text import TextStream
from attendo.layers.attention import EncoderMemory
from attendo.models.encoder_decoder import EncoderDecoderLM
from attendo.tokenizer import TextTokenizer


def check_seq2seq_request(request: Request, config: ModelConfig) -> None:
    prompt = request.prompt_ids
    if not prompt:
        raise InvalidSettingError("the prompt is empty")
    if request.max_new_tokens < 1:
        raise InvalidSettingError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise InvalidSettingError(f"token id {bad[0]} is outside the vocabulary (0..{config.vocab_size - 1})")
    for what, length in (("the input", len(prompt)), ("max_new_tokens", request.max_new_tokens)):
        if length > config.context_length:
            raise ContextLengthError(
                f"{what} ({length} tokens) is beyond the model's context window of {config.context_length}"
            )
    if any(not s for s in request.stop):
        raise InvalidSettingError("stop strings must not be empty")


def encode_prompts(network: EncoderDecoderLM, prompts: list[list[int]], pad_id: int) -> EncoderMemory:
    """Run the encoder once over right-padded prompts; the padding is masked for every layer."""
    longest = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), longest), pad_id)
    real = torch.zeros((len(prompts), longest), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
        real[row, : len(prompt)] = True
    return network.encode(tokens, None if bool(real.all()) else real)


def _accept(
    sequence: Sequence,
    logits: torch.Tensor,
    start_id: int,
    eos_ids: Collection[int],
    no_repeat_ngram_size: int,
    forced: ForcedTokens,
    tokenizer: TextTokenizer,
) -> Event:
    """Choose a sequence's next token; the history is what the decoder has read, as transformers
    counts it (the start token, then the generated tokens)."""
    scores = ban_repeated_ngrams(logits, [start_id, *sequence.generated], no_repeat_ngram_size)
    scores = forced.apply(scores, len(sequence.generated), sequence.request.max_new_tokens)
    return accept_token(sequence, scores, logits, [start_id], eos_ids, tokenizer)


@torch.inference_mode()
def seq2seq_events(
    network: EncoderDecoderLM,
    tokenizer: TextTokenizer,
    eos_ids: Collection[int],
    requests: list[Request],
    start_id: int,
    pad_id: int,
    no_repeat_ngram_size: int = 0,
    forced: ForcedTokens = ForcedTokens(),
) -> Iterator[Event]:
    """Greedy decoding or sampling for a batch of requests, every sequence one token per step.

    Each event's sequence has slot = its request's index. A finished sequence stays in the batch
    (its rows are computed and ignored) until the last one ends.
    """
    for request in requests:
        check_seq2seq_request(request, network.config)
    sequences = [
        Sequence(r, TextStream(tokenizer, r.stop), make_generator(r.settings.seed), slot=i)
        for i, r in enumerate(requests)
    ]
    memory = encode_prompts(network, [r.prompt_ids for r in requests], pad_id)
    steps = max(r.max_new_tokens for r in requests)
    cache = network.new_cache(len(requests), steps)
    tokens = torch.full((len(requests), 1), start_id)
    for step in range(steps):
        logits = network.decode(tokens, memory, torch.full_like(tokens, step), cache=cache)[:, -1]
        for sequence, row in zip(sequences, logits):
            if not sequence.finished:
                yield _accept(sequence, row, start_id, eos_ids, no_repeat_ngram_size, forced, tokenizer)
        if all(s.finished for s in sequences):
            return
        tokens = torch.tensor([[s.generated[-1]] for s in sequences])


@torch.inference_mode()
def seq2seq_beam_search(
    network: EncoderDecoderLM,
    tokenizer: TextTokenizer,
    eos_ids: Collection[int],
    request: Request,
    beam: BeamSettings,
    start_id: int,
    pad_id: int,
    forced: ForcedTokens = ForcedTokens(),
) -> GenerationResult:
    """Beam search for one input: encoded once, its output shared by every beam."""
    check_beam_request(request)
    check_seq2seq_request(request, network.config)
    k = beam.num_beams
    encoded = encode_prompts(network, [request.prompt_ids], pad_id)
    memory = EncoderMemory(encoded.states.expand(k, -1, -1), None)
    cache = network.new_cache(k, request.max_new_tokens)
    start = torch.full((k, 1), start_id)
    first = network.decode(start, memory, torch.zeros_like(start), cache=cache)[0, -1]
    position = 1

    def advance(tokens: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
        nonlocal position
        cache.reorder(origins)
        positions = torch.full((k, 1), position)
        position += 1
        return network.decode(tokens[:, None], memory, positions, cache=cache)[:, -1]

    best = beam_search(first, advance, [start_id], beam, request.settings, request.max_new_tokens, eos_ids, forced)
    return beam_result(request, best.tokens, tokenizer, eos_ids)
