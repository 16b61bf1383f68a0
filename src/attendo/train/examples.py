"""Fine-tuning examples: JSONL records in, token ids with a loss mask out (train/data.py Example).

Two record shapes, one per line:
  {"prompt": "...", "completion": "..."}   the model reads the prompt and learns the completion;
  {"messages": [{"role": ..., "content": ...}, ...]}   a conversation rendered with the model's chat
                                           template; the model learns every assistant turn.
Only completion / assistant tokens take loss (the model is taught to answer, not to write
questions), and an answer ends with the end-of-sequence token, so the model learns to stop.

The pieces are tokenized separately and joined (prompt, then completion; each stretch of the
template between assistant turns, then the turn), which is how generation sees them: the prompt
is tokenized on its own and the answer continues from its last token.

An encoder-decoder model (T5, BART) takes prompt/completion records: the prompt is the encoder's
input, the completion the decoder's target.

Every record is checked before anything is tokenized: a malformed one is an error naming the file
and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attendo.datafiles import read_jsonl
from attendo.errors import AttendoError, DataError
from attendo.tokenizer import TextTokenizer
from attendo.train.data import Example

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Record:
    where: str  # "file:line", for errors
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict[str, Any]] | None = None


def _check(record: dict[str, Any], where: str) -> Record:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f'{where}: "messages" must be a non-empty list')
        for number, message in enumerate(messages, 1):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DataError(f"{where}: message {number} needs a string \"content\"")
            if message.get("role") not in ROLES:
                raise DataError(f"{where}: message {number} has role {message.get('role')!r} (use {', '.join(ROLES)})")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant message to learn")
        if messages[0]["role"] == "assistant":
            raise DataError(f"{where}: the conversation starts with the assistant; start with a system or user message")
        return Record(where, messages=messages)
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise DataError(f'{where}: expected {{"prompt": string, "completion": string}} or {{"messages": [...]}}')
    if not completion:
        raise DataError(f"{where}: the completion is empty: nothing to learn")
    return Record(where, prompt=prompt, completion=completion)


def read_records(path: Path) -> list[Record]:
    """Every record of a JSONL file, each checked; an empty file is an error."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = [_check(record, f"{path}:{number}") for number, record in read_jsonl(path)]
    if not records:
        raise DataError(f"{path}: no examples in this file")
    return records


def end_of_sequence(tokenizer: TextTokenizer, eos_ids: list[int]) -> int | None:
    named = tokenizer.token_to_id(tokenizer.eos_token) if tokenizer.eos_token else None
    return named if named is not None else (eos_ids[0] if eos_ids else None)


class ExampleMaker:
    """Turns records into Examples for one model: its tokenizer, chat template and stop token."""

    def __init__(self, tokenizer: TextTokenizer, eos_id: int | None, seq2seq: bool, chat: bool) -> None:
        self.tokenizer, self.eos_id, self.seq2seq, self.chat = tokenizer, eos_id, seq2seq, chat

    def __call__(self, record: Record) -> Example:
        if self.seq2seq:
            return self._seq2seq(record)
        if record.messages is not None or self.chat:
            messages = record.messages or [
                {"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.completion},
            ]  # fmt: skip
            return self._conversation(messages, record.where)
        prompt = self.tokenizer.encode(record.prompt)
        answer = self.tokenizer.encode(record.completion, add_special_tokens=False) + self._eos()
        return Example(prompt + answer, [False] * len(prompt) + [True] * len(answer))

    def _eos(self) -> list[int]:
        return [self.eos_id] if self.eos_id is not None else []

    def _conversation(self, messages: list[dict[str, Any]], where: str) -> Example:
        """The rendered conversation in pieces: the template's text up to each assistant turn
        (no loss), then the turn itself as the template writes it, end-of-turn marker included
        (loss)."""
        pieces: list[tuple[str, bool]] = []
        done = ""
        try:
            for index, message in enumerate(messages):
                if message["role"] != "assistant":
                    continue
                asked = self.tokenizer.apply_chat_template(messages[:index], add_generation_prompt=True)
                answered = self.tokenizer.apply_chat_template(messages[: index + 1], add_generation_prompt=False)
                if not asked.startswith(done) or not answered.startswith(asked):
                    raise DataError(
                        f"{where}: the chat template does not render this conversation turn by turn, "
                        "so the assistant's tokens cannot be told apart"
                    )
                pieces += [(asked[len(done) :], False), (answered[len(asked) :], True)]
                done = answered
        except DataError:
            raise
        except AttendoError as e:  # no template, or the template refused the conversation
            raise DataError(f"{where}: {e}") from None
        ids: list[int] = []
        targets: list[bool] = []
        for text, learned in pieces:
            piece = self.tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            targets += [learned] * len(piece)
        return Example(ids, targets)

    def _seq2seq(self, record: Record) -> Example:
        if record.messages is not None:
            raise DataError(f"{record.where}: an encoder-decoder model takes prompt/completion records, not messages")
        target = self.tokenizer.encode(record.completion)
        if self.eos_id is not None and target[-1:] != [self.eos_id]:
            target.append(self.eos_id)
        return Example(target, [True] * len(target), source=self.tokenizer.encode(record.prompt))


def truncate(example: Example, max_len: int) -> Example | None:
    """The example cut to max_len tokens (decoder sequence and source each); None when no token
    to learn is left."""
    ids, targets = example.ids[:max_len], example.targets[:max_len]
    if example.source is None and not any(targets[1:]):  # a decoder predicts from position 1 on
        return None
    if example.source is not None and not any(targets):
        return None
    source = example.source[:max_len] if example.source is not None else None
    return Example(ids, targets, source)
