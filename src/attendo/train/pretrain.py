"""`attendo train`: pretrain a decoder-only model from scratch on your own text.

texts (train/data.py) → a byte-level BPE tokenizer trained on them (train/bpe.py), or a model's
own → token ids, documents joined by the end-of-text token → rows of --seq-len tokens, a few held
out → a network from a preset (or a config file), freshly initialised → the training loop
(train/loop.py) → OUT, a Hugging Face-format model directory (train/export.py) that attendo.load,
attendo generate, attendo serve and transformers read as they are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attendo.config import ModelConfig
from attendo.datafiles import read_json
from attendo.errors import CheckpointError, DataError, InvalidSettingError, UnsupportedModelError
from attendo.models import build_network
from attendo.presets import preset
from attendo.tokenizer import TextTokenizer
from attendo.train import checkpoint, distributed, export
from attendo.train.bpe import train_bpe
from attendo.train.data import PackedTokens, read_texts, text_files
from attendo.train.loop import Job, Outcome, Trainer
from attendo.train.plot import plot_loss
from attendo.train.report import say
from attendo.train.settings import TrainSettings

INIT_STD = 0.02


def initialise(network: nn.Module) -> None:
    """GPT-2's initialisation, which LLaMA-style models also use: every matrix and embedding
    drawn from N(0, 0.02²), biases 0, norms 1, and the two projections that write into the
    residual stream (attention output, MLP down) scaled by 1/sqrt(2·layers), so the stream's
    variance does not grow with depth. (PyTorch's layer defaults would start the tied output
    head with N(0, 1) embeddings: logits in the hundreds.)"""
    residual_std = INIT_STD / math.sqrt(2 * network.config.n_layers)
    for name, module in network.named_modules():
        if isinstance(module, nn.Linear):
            std = residual_std if name.endswith(("attn.out", "mlp.down")) else INIT_STD
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=INIT_STD)


def read_config(path: Path) -> dict[str, Any]:
    """A config file: ModelConfig fields as JSON (what ModelConfig.to_dict() writes)."""
    fields = read_json(path, InvalidSettingError)
    if not isinstance(fields, dict):
        raise InvalidSettingError(f"{path}: a config file is a JSON object of ModelConfig fields")
    fields.pop("extra", None)
    return fields


def model_config(
    tokenizer: TextTokenizer, seq_len: int, preset_name: str | None, config_file: Path | None, overrides: dict[str, Any]
) -> ModelConfig:
    """The architecture: a preset's (or the config file's) fields, then the overrides, then what
    the tokenizer and sequence length decide (vocabulary size, special ids, context length)."""
    end = tokenizer.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None
    if end is None:
        raise InvalidSettingError("the tokenizer has no end-of-text token to separate documents with")
    begin = tokenizer.token_to_id(tokenizer.bos_token) if tokenizer.bos_token else None
    decided = {
        "vocab_size": tokenizer.vocab_size, "context_length": seq_len, "bos_token_id": begin,
        "eos_token_ids": (end,), "pad_token_id": None,
    }  # fmt: skip
    try:
        if config_file is not None:
            config = ModelConfig(**{**read_config(config_file), **overrides, **decided})
        else:
            config = preset(preset_name, **{**overrides, **decided})
    except (TypeError, ValueError) as e:
        raise InvalidSettingError(f"invalid model config: {e}") from None
    if config.family != "decoder":
        raise UnsupportedModelError(
            f"attendo train pretrains decoder-only models (next-token prediction); this config is {config.family}"
        )
    return config


def documents_to_stream(tokenizer: TextTokenizer, texts: list[str], end_id: int) -> torch.Tensor:
    """Every document's ids followed by the end-of-text id, end to end."""
    ids: list[int] = []
    for encoded in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += encoded
        ids.append(end_id)
    return torch.tensor(ids, dtype=torch.long)


def _tokenizer(out: Path, texts: list[str], vocab_size: int, source: str | None, processes: distributed.Processes, resume: bool) -> TextTokenizer:
    """Rank 0 makes the tokenizer (or, resuming, keeps the run's own) and writes it into OUT;
    every process then reads that file, so all of them tokenize identically."""
    from tokenizers import Tokenizer

    path = out / "tokenizer.json"
    settings_path = out / "tokenizer_config.json"
    if processes.is_main and not (resume and path.exists()):
        if source is not None:
            from attendo.loader import load_tokenizer

            made = load_tokenizer(source)
        else:
            made = train_bpe(texts, vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        export.write_tokenizer(path, made)
        export.write_json(settings_path, export.tokenizer_files(made))
    distributed.barrier(processes)
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the run's tokenizer cannot be resumed")
    special = json.loads(settings_path.read_text(encoding="utf-8"))
    return TextTokenizer(
        Tokenizer.from_file(str(path)), chat_template=special.get("chat_template"),
        bos_token=special.get("bos_token"), eos_token=special.get("eos_token"),
    )  # fmt: skip


def pretrain(
    data: list[str | Path],
    out: Path,
    settings: TrainSettings,
    *,
    preset_name: str | None = "llama-mini",
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    seq_len: int = 256,
    vocab_size: int = 4096,
    tokenizer: str | None = None,
    eval_fraction: float = 0.05,
    resume: bool = False,
) -> Outcome:
    """Train a model from scratch on the texts in `data` and write it to `out`."""
    if seq_len < 1:
        raise InvalidSettingError(f"--seq-len must be at least 1, got {seq_len}")
    if not 0 <= eval_fraction < 1:
        raise InvalidSettingError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    texts = read_texts(text_files(data))
    checkpoint.check_fresh(out, resume)
    processes = distributed.start()
    try:
        text_tokenizer = _tokenizer(out, texts, vocab_size, tokenizer, processes, resume)
        config = model_config(text_tokenizer, seq_len, preset_name, config_file, overrides or {})
        hf_config = export.hf_config(config)  # before training: can the result be saved?
        rows = PackedTokens(documents_to_stream(text_tokenizer, texts, config.eos_token_ids[0]), seq_len)
        if len(rows) < 1:
            raise DataError(
                f"the text is too short for one sequence: {len(rows.stream)} tokens, and a sequence "
                f"needs {seq_len + 1}; give more text or a smaller --seq-len"
            )
        held_out_rows = max(1, round(len(rows) * eval_fraction)) if eval_fraction > 0 and len(rows) >= 2 else 0
        train_rows, held_out = rows.split(held_out_rows) if held_out_rows else (rows, None)
        torch.manual_seed(settings.seed)
        network = build_network(config)
        initialise(network)
        network = network.to(processes.device).train()
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_ids[0]}

        def save_model(weights: dict[str, torch.Tensor]) -> None:
            export.save_hf_directory(out, weights, config, text_tokenizer, hf_config, generation)

        job = Job(network, train_rows, held_out, out, save_model, {"data": train_rows.fingerprint(), "config": config.to_dict()})
        if processes.is_main:
            parameters = sum(p.numel() for p in network.parameters())
            say(
                f"training {parameters:,} parameters on {len(train_rows)} rows of {seq_len} tokens"
                + (f" ({len(held_out)} held out)" if held_out is not None else " (none held out)")
                + f"; {processes.world_size} process(es)"
            )
        outcome = Trainer(job, settings, processes).run(resume)
        if processes.is_main:
            plot_loss(out)
        return outcome
    finally:
        distributed.finish(processes)
