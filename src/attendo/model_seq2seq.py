"""The Model facade of an encoder-decoder network (T5, FLAN-T5, BART, the 2017 Transformer)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from attendo.errors import CheckpointError, InvalidSettingError
from attendo.generation.beam import BeamSettings, ForcedTokens
from attendo.generation.loop import Event, GenerationResult, Request
from attendo.generation.seq2seq import seq2seq_beam_search, seq2seq_events
from attendo.layers.attention import LayerRecord, Recorded
from attendo.model import Model, _as_batch
from attendo.models.encoder_decoder import EncoderDecoderLM


class Seq2SeqModel(Model):
    """generate() reads the prompt with the encoder once and writes the answer with the decoder;
    the same settings as for a decoder-only model apply, beam search included."""

    network: EncoderDecoderLM

    @property
    def decoder_start_token_id(self) -> int:
        c = self.config
        for candidate in (self.generation_defaults.get("decoder_start_token_id"), c.decoder_start_token_id, c.bos_token_id):
            if candidate is not None:
                return int(candidate)
        raise CheckpointError(f"{self.source}: the config names no decoder_start_token_id")

    @property
    def forced_tokens(self) -> ForcedTokens:
        """forced_bos_token_id / forced_eos_token_id from the generation config (see ForcedTokens)."""
        return ForcedTokens.from_defaults(self.generation_defaults)

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id if self.config.pad_token_id is not None else 0

    def _decoder_tokens(self, decoder_token_ids: torch.Tensor | list[list[int]] | None, batch: int) -> torch.Tensor:
        if decoder_token_ids is None:
            return torch.full((batch, 1), self.decoder_start_token_id)
        return _as_batch(decoder_token_ids)

    @torch.inference_mode()
    def logits(
        self,
        token_ids: torch.Tensor | list[list[int]],
        decoder_token_ids: torch.Tensor | list[list[int]] | None = None,
    ) -> torch.Tensor:
        """Decoder logits (batch, decoder positions, vocabulary) for the input token_ids
        (batch, positions) and the decoder's own input (default: just its start token)."""
        tokens = _as_batch(token_ids)
        return self.network(tokens, self._decoder_tokens(decoder_token_ids, tokens.shape[0])).float()

    def next_token_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float logits (vocabulary,) of the decoder's first token for the input token_ids."""
        return self.logits([token_ids])[0, -1]

    @torch.inference_mode()
    def attention_maps(
        self,
        token_ids: torch.Tensor | list[list[int]],
        decoder_token_ids: torch.Tensor | list[list[int]] | None = None,
        layer: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Attention weights per layer from the explicit path, (layers, batch, heads, queries, keys):
        "encoder" (input over input), "decoder" (output over output so far) and "cross"
        (output over input); with `layer`, that layer's only of each (the first axis is 1), and
        only the kinds whose stack has that layer (the encoder and decoder may differ in depth)."""
        tokens = _as_batch(token_ids)
        # The decoder reads the whole encoder output, so only the decoder can stop early: after
        # its layer's cross-attention, which comes after that layer's self-attention.
        encoder, decoder, cross = LayerRecord(layer), LayerRecord(layer), LayerRecord(layer, end_pass=True)
        memory = self.network.encode(tokens, record=encoder)
        memory.record = cross
        with contextlib.suppress(Recorded):
            self.network.decode(self._decoder_tokens(decoder_token_ids, tokens.shape[0]), memory, record=decoder)
        recorded = {"encoder": encoder, "decoder": decoder, "cross": cross}
        return {kind: torch.stack(weights) for kind, weights in recorded.items() if weights}

    def _complete(self, requests: list[Request], search: BeamSettings, prompt_lookup: int = 0) -> list[GenerationResult]:
        _check_no_lookup(prompt_lookup)
        if search.num_beams > 1:
            return [
                seq2seq_beam_search(
                    self.network, self.tokenizer, self.eos_token_ids, r, search, self.decoder_start_token_id,
                    self.pad_token_id, self.forced_tokens,
                )
                for r in requests
            ]
        results: list[GenerationResult] = [None] * len(requests)  # type: ignore[list-item]
        for event in self._events(requests, search):
            if event.finished:
                results[event.sequence.slot] = event.sequence.result()
        return results

    def _events(self, requests: list[Request], search: BeamSettings, prompt_lookup: int = 0) -> Iterator[Event]:
        _check_no_lookup(prompt_lookup)
        return seq2seq_events(
            self.network,
            self.tokenizer,
            self.eos_token_ids,
            requests,
            self.decoder_start_token_id,
            self.pad_token_id,
            search.no_repeat_ngram_size,
            self.forced_tokens,
        )


def _check_no_lookup(prompt_lookup: int) -> None:
    if prompt_lookup:
        raise InvalidSettingError("prompt_lookup needs a decoder-only model")
