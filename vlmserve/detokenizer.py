"""Incremental detokenization and stop strings for streamed output.

Byte-level BPE tokens can end in the middle of a UTF-8 character; decoding such a prefix yields
U+FFFD. We hold those bytes back until the character is complete, as vLLM and TGI do, and we hold
back any tail that could still grow into a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        # Decode from a few tokens back so merges across token boundaries (spaces, bytes) are right.
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append tokens; return the text that is now final."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """At the end of generation, release held-back bytes (as U+FFFD if they never completed)."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text):]


class TokenBytes:
    """Each token's own bytes, as OpenAI's logprobs show them: a byte-level BPE token may hold part of
    a character, so its text alone can be U+FFFD while its bytes are exact. Special tokens, which the
    detokenizer leaves out of the text, have none."""

    def __init__(self, tokenizer) -> None:
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer = tokenizer
        self.byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self.special = set(tokenizer.all_special_ids)

    def __call__(self, token_id: int) -> bytes | None:
        if token_id in self.special:
            return None
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if all(char in self.byte_of for char in piece):
            return bytes(self.byte_of[char] for char in piece)
        return self.tokenizer.decode([token_id]).encode()  # not a byte-level token


class StopStringMatcher:
    """Finds the first stop string in streamed text, holding back tails that may start one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Return the text safe to emit now; after a match, `stopped` is True and the rest is dropped."""
        if self.stopped:
            return ""
        text = self.pending + delta
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return text[: min(hits)]
        hold = max((self._overlap(text, s) for s in self.stop), default=0)
        self.pending = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """At the end of generation, release whatever was held back."""
        rest, self.pending = self.pending, ""
        return "" if self.stopped else rest

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of stop."""
        for n in range(min(len(text), len(stop) - 1), 0, -1):
            if text.endswith(stop[:n]):
                return n
        return 0
