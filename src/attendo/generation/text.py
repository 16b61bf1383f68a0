"""Token ids → text pieces that are safe to show as they arrive."""

from __future__ import annotations

from collections.abc import Sequence

from attendo.tokenizer import TextTokenizer

_INCOMPLETE = "\ufffd"  # what decoding yields for the first bytes of an unfinished UTF-8 character


class TextStream:
    """Incremental detokenization of one sequence, aware of stop strings.

    ``push`` returns only text that can no longer change: it holds back a trailing partial UTF-8
    character and any tail that could be the start of a stop string. When a stop string appears,
    the text before it is the last piece and ``stopped`` becomes true. The pieces joined are the
    sequence's final text.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decoded = self.tokenizer.decode(self.ids).rstrip(_INCOMPLETE)
        if not decoded.startswith(self.text):
            return ""  # a tokenizer that rewrote earlier text: wait until it settles again
        end = self._stop_at(decoded)
        if end is not None:
            self.stopped = True
        else:
            end = len(decoded) - self._held_back(decoded)
        return self._emit(decoded[:end])

    def flush(self) -> str:
        """At the end of generation: everything not yet shown, unless a stop string ended it."""
        if self.stopped:
            return ""
        decoded = self.tokenizer.decode(self.ids)
        return self._emit(decoded) if decoded.startswith(self.text) else ""

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.text) :]
        self.text = upto
        return piece

    def _stop_at(self, decoded: str) -> int | None:
        """Where the earliest stop string starts in the text not yet shown."""
        found = [i for s in self.stop if (i := decoded.find(s, len(self.text))) >= 0]
        return min(found) if found else None

    def _held_back(self, decoded: str) -> int:
        """Length of the longest tail of decoded that begins some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(decoded) - len(self.text)), longest, -1):
                if decoded.endswith(s[:n]):
                    longest = n
                    break
        return longest
