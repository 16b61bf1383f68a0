"""Helpers for the family parity tests (test_bert, test_seq2seq, test_bloom): word-level and
WordPiece tokenizers built in memory, and tiny random transformers models saved with
save_pretrained, the reference that attendo loads back through its production loader."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

WORDS = (
    "the a an of to in on at is are was be it this that and or but not with for from by as "
    "cat dog bird fish house tree car road city river king queen man woman child paris france "
    "capital country small big red blue green happy sad fast slow good bad new old first last "
    "translate english german summarize sentence word book read write run walk see say go come "
    "one two three four five day night sun moon water fire"
).split()

SENTENCES = [
    "the cat is on the tree",
    "translate english to german : the house is big",
    "paris is the capital of france",
    "a small dog and a big bird",
    "summarize : the king and the queen walk to the city on a sunny day",
]


def word_tokenizer(specials: list[str], template: str | None = None) -> Tokenizer:
    """Whitespace-separated words; the specials take the first ids. template: a post-processor
    for single texts, such as "$A </s>" (T5) or "<s> $A </s>" (BART)."""
    vocab = {token: i for i, token in enumerate(specials + list(WORDS))}
    unk = next(s for s in specials if "unk" in s)
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tokenizer.add_special_tokens(specials)
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template:
        used = [t for t in template.split() if t in vocab]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, vocab[t]) for t in used]
        )
    return tokenizer


def wordpiece_tokenizer() -> Tokenizer:
    """A BERT-style tokenizer: lower-casing, [CLS] text [SEP], words split into ##pieces."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = sorted({c for w in WORDS for c in w}) + sorted({f"##{c}" for w in WORDS for c in w})
    vocab = {t: i for i, t in enumerate(specials + list(WORDS) + pieces)}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tokenizer.add_special_tokens(specials)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def jitter(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random init leaves biases at 0 and norms at 1: perturb every tensor so each one counts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def save(model, tokenizer: Tokenizer, directory: Path, **generation: object) -> Path:
    """save_pretrained plus tokenizer.json; generation fields overwrite generation_config.json."""
    model.save_pretrained(directory)
    tokenizer.save(str(directory / "tokenizer.json"))
    if generation:
        path = directory / "generation_config.json"
        config = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps({**config, **generation}))
    return directory


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())
