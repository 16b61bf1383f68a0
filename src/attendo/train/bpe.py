"""Train a byte-level BPE tokenizer on the training texts (the `tokenizers` library does the work).

Byte-level: every text is first read as its UTF-8 bytes, each byte one of 256 base symbols, so
any text can be encoded, whatever its language or emoji. BPE then merges the most frequent
neighbouring pairs into new tokens until the vocabulary has the size asked for. One special
token, <|endoftext|> (id 0), separates documents and marks where generation should stop, as in
GPT-2.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from attendo.errors import InvalidSettingError
from attendo.tokenizer import TextTokenizer

END_OF_TEXT = "<|endoftext|>"
BYTES = 256
SMALLEST_VOCABULARY = BYTES + 1  # every byte and the end-of-text token, with no merges


def train_bpe(texts: Iterable[str], vocab_size: int) -> TextTokenizer:
    if vocab_size < SMALLEST_VOCABULARY:
        raise InvalidSettingError(
            f"--vocab-size must be at least {SMALLEST_VOCABULARY} (256 bytes and {END_OF_TEXT}), got {vocab_size}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return TextTokenizer(tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT)
