"""Token ids to text as they are generated: incremental decoding, stop strings, no half characters; a token's own
bytes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
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


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback: one byte a token


def token_bytes(tokenizer: Any) -> Callable[[int], bytes]:
    """A function from a token id to the token's own bytes, which chat logprobs list: joined, the pieces of a character
    split across tokens give its UTF-8 bytes back (each piece's text alone is U+FFFD). Byte-level vocabularies (GPT-2,
    Llama 3, SmolLM) map a token's characters back to bytes, a SentencePiece byte token (<0xE4>) is its byte; added
    tokens and any other tokenizer's tokens are their text's UTF-8."""
    kinds = _decoder_kinds(tokenizer)
    from_char = {c: b for b, c in _byte_level_alphabet().items()} if "ByteLevel" in kinds else {}
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))

    def bytes_of(token: int) -> bytes:
        if token not in added:
            piece = tokenizer.convert_ids_to_tokens(token)
            if from_char and isinstance(piece, str) and all(c in from_char for c in piece):
                return bytes(from_char[c] for c in piece)
            if "ByteFallback" in kinds and isinstance(piece, str) and (byte := _BYTE_TOKEN.fullmatch(piece)):
                return bytes([int(byte[1], 16)])
        return tokenizer.decode([token]).encode()

    return bytes_of


def _decoder_kinds(tokenizer: Any) -> set[str]:
    """The "type"s of a fast tokenizer's decoder and of the decoders in it (a Sequence); none for other tokenizers."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    kinds, todo = set(), [json.loads(decoder.__getstate__())]
    while todo:
        spec = todo.pop()
        kinds.add(spec.get("type"))
        todo.extend(spec.get("decoders") or [])
    return kinds


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes stand for themselves, the others for characters from 256 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}
