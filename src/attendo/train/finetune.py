"""`attendo finetune`: adapt an existing model to examples of a task.

JSONL records (train/examples.py) → token ids with a loss mask → padded (or packed) batches → the
model loaded by attendo.load in float32 (a GGUF file's quantized blocks are dequantized: gradients
need float weights) → either every weight trains (full fine-tuning) or only LoRA adapters do
(train/lora.py: low-rank updates beside frozen layers) → the training loop (train/loop.py) → OUT:

- full fine-tuning, or LoRA with --merge: a Hugging Face-format model directory, with the source
  checkpoint's config and tensor names (train/export.py);
- LoRA: a PEFT adapter directory (adapter_config.json, adapter_model.safetensors), which
  attendo.load(MODEL, adapter=OUT), attendo generate --adapter OUT and peft read.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any

import torch

from attendo.errors import DataError, InvalidSettingError, UnsupportedModelError
from attendo.loader import load, read_checkpoint
from attendo.model import Model
from attendo.registry import resolve
from attendo.train import checkpoint, distributed, export
from attendo.train.data import Dataset, Example, PaddedExamples, Seq2SeqExamples, pack_examples
from attendo.train.examples import ExampleMaker, Record, end_of_sequence, read_records, truncate
from attendo.train.lora import LoraSettings, add_lora, merge_lora, save_adapter
from attendo.train.loop import Job, Outcome, Trainer
from attendo.train.plot import plot_loss
from attendo.train.report import say
from attendo.train.settings import TrainSettings

DEFAULT_MAX_LEN = 1024


def _examples(records: list[Record], maker: ExampleMaker, max_len: int) -> list[Example]:
    made = [truncate(maker(record), max_len) for record in records]
    kept = [e for e in made if e is not None]
    if not kept:
        raise DataError(f"no example has a token to learn within --max-len {max_len}")
    return kept


def _dataset(examples: list[Example], model: Model, pack: bool, max_len: int, eos_id: int | None) -> Dataset:
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_id or 0)
    if config.family == "encoder-decoder":
        return Seq2SeqExamples(examples, pad, model.decoder_start_token_id)
    if pack:
        packed = pack_examples(examples, max_len, eos_id)
        if len(packed) < 1:
            raise DataError(f"the examples hold fewer than --max-len {max_len} tokens: too few to pack one row")
        return packed
    return PaddedExamples(examples, pad)


def _split(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """A seeded random `fraction` of the records held out (none when fraction is 0)."""
    count = round(len(records) * fraction)
    if fraction <= 0 or count == 0:
        return records, []
    if count >= len(records):
        raise DataError(f"--eval-fraction {fraction} leaves no example to train on")
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [r for i, r in enumerate(records) if i not in held], [records[i] for i in sorted(held)]


def _hf_files(model: Model, source: Path, eos_id: int | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """config.json, tokenizer_config.json and generation_config.json for the fine-tuned model: the
    source checkpoint's own (a GGUF file's translated by its reader), with the end-of-sequence
    token the answers were taught to end with among the ids that stop generation."""
    original = read_checkpoint(source)
    tokenizer_config = {**export.tokenizer_files(model.tokenizer), **original.tokenizer_config}
    generation = dict(original.generation_config)
    stops = sorted(set(model.eos_token_ids) | ({eos_id} if eos_id is not None else set()))
    if stops:
        generation["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    return dict(original.hf_config), tokenizer_config, generation


def finetune(
    data: Path,
    model_source: str,
    out: Path,
    settings: TrainSettings | None = None,
    *,
    epochs: float | None = None,
    lora: LoraSettings | None = None,
    merge: bool = False,
    max_len: int | None = None,
    pack: bool = False,
    chat: bool = False,
    eval_data: Path | None = None,
    eval_fraction: float = 0.0,
    resume: bool = False,
) -> Outcome:
    """Fine-tune `model_source` on the records in `data` and write the result to `out`. Give
    settings.steps, or epochs (passes over the training examples; settings.steps is then
    replaced)."""
    settings = settings or TrainSettings()
    if merge and lora is None:
        raise InvalidSettingError("--merge folds a LoRA adapter into the weights: use it with --lora")
    if not 0 <= eval_fraction < 1:
        raise InvalidSettingError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    if max_len is not None and max_len < 2:
        raise InvalidSettingError(f"--max-len must be at least 2, got {max_len}")
    records = read_records(Path(data))  # every line checked before anything loads
    held_records = read_records(Path(eval_data)) if eval_data is not None else []
    checkpoint.check_fresh(out, resume)
    processes = distributed.start()
    try:
        source = resolve(model_source)
        model = load(source, dtype="float32")
        family = model.config.family
        if family == "encoder":
            raise UnsupportedModelError("attendo finetune trains models that generate text (decoder-only or encoder-decoder)")
        if pack and family == "encoder-decoder":
            raise InvalidSettingError("--pack is for decoder-only models; an encoder-decoder's examples are padded")
        if lora is not None and settings.strategy == "fsdp" and processes.distributed:
            raise InvalidSettingError("--lora trains few weights: use --strategy ddp (FSDP is for models too large to copy)")
        if processes.is_main and source.suffix == ".gguf":
            say(f"{source.name}: quantized weights dequantized to float32 for training")

        limit = min(max_len or DEFAULT_MAX_LEN, model.config.context_length)
        eos_id = end_of_sequence(model.tokenizer, model.eos_token_ids)
        maker = ExampleMaker(model.tokenizer, eos_id, family == "encoder-decoder", chat)
        train_records, split_off = _split(records, eval_fraction, settings.seed)
        train = _dataset(_examples(train_records, maker, limit), model, pack, limit, eos_id)
        held = held_records or split_off
        held_out = _dataset(_examples(held, maker, limit), model, pack, limit, eos_id) if held else None
        if epochs is not None:
            if epochs <= 0:
                raise InvalidSettingError(f"--epochs must be above 0, got {epochs}")
            settings = settings.replace(steps=max(1, math.ceil(epochs * len(train) / settings.batch_size)))

        network = model.network
        if lora is not None:
            torch.manual_seed(settings.seed)  # the adapters' random initial A
            add_lora(model, lora)  # freezes every other weight
        else:
            network.requires_grad_(True)
        network.to(processes.device).train()
        config_json, tokenizer_config, generation = _hf_files(model, source, eos_id)
        source_names = list(model.checkpoint_names.shapes)

        def save_model(weights: dict[str, torch.Tensor]) -> None:
            if lora is not None and not merge:
                save_adapter(model, out, base_model=str(model_source))
                return
            network_config = network.config
            if merge:  # fold the adapters into a copy; the training network keeps them
                merged = copy.copy(model)
                merged.network = copy.deepcopy(network)
                merge_lora(merged)
                weights, network_config = checkpoint.full_weights(merged.network), merged.network.config
            hf = {**config_json, "tie_word_embeddings": network_config.tie_embeddings}
            export.save_hf_directory(
                out, weights, network_config, model.tokenizer, hf, generation, source_names, tokenizer_config
            )

        record = {
            "data": train.fingerprint(), "model": str(model_source),
            "lora": dataclasses.asdict(lora) if lora is not None else None, "merge": merge,
        }  # fmt: skip
        if processes.is_main:
            trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
            total = sum(p.numel() for p in network.parameters())
            say(
                f"fine-tuning {trainable:,} of {total:,} parameters ({'LoRA' if lora else 'all'}) on "
                f"{len(train)} {'rows' if pack else 'examples'}"
                + (f" ({len(held_out)} held out)" if held_out is not None else "")
                + f", {settings.steps} steps; {processes.world_size} process(es)"
            )
        outcome = Trainer(Job(network, train, held_out, out, save_model, record), settings, processes).run(resume)
        if processes.is_main:
            plot_loss(out)
        return outcome
    finally:
        distributed.finish(processes)
