"""Token ids to text as they are generated: incremental decoding, stop strings, no half characters."""

from __future__ import annotations

from typing import Any


class TextStream:
    """Turns one request's generated tokens into text deltas; finds its stop strings.

    The whole generated text is decoded again after each token, so byte-level tokens that split a character
    join up correctly; text that may be the start of a stop string is held back until it is known not to be.
    """

    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string was reached) after one more token."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            return self._take(text[:cut]), True
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest of it
            return "", False
        return self._take(text[: len(text) - self._held_back(text)]), False

    def finish(self) -> str:
        """What was held back, when generation ends without a stop string."""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of `text` that starts some stop string."""
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def _take(self, text: str) -> str:
        delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text if text.startswith(self.sent) else self.sent
        return delta
