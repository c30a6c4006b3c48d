"""Each token's own bytes, as OpenAI's logprobs show them."""

from __future__ import annotations


class TokenBytes:
    """A byte-level BPE token may hold part of a character, so its text alone can be U+FFFD while its bytes
    are exact. Special tokens, which the detokenizer leaves out of the text, have none."""

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
