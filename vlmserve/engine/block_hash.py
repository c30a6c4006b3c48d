"""Content keys of full KV blocks, for the prefix cache.

The KV of a token depends on everything before it, its own input embedding and its rotary
position. A block's key therefore chains its parent's key with the block's token ids, their
M-RoPE position ids (for multimodal prompts these differ from the token index, so equal tokens at
other positions must not share KV) and the content hashes of the media rows behind its
image/video pad tokens (every pad token has the same id).
"""

from __future__ import annotations

import hashlib

import numpy as np

from vlmserve.engine.sequence import Sequence


def block_hash(parent: bytes, token_ids: list[int], positions: np.ndarray, media_keys: list[str]) -> bytes:
    digest = hashlib.blake2b(parent, digest_size=16)
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(positions, dtype=np.int64).tobytes())
    for key in media_keys:
        digest.update(key.encode())
        digest.update(b"\0")
    return digest.digest()


def extend_block_hashes(seq: Sequence, num_blocks: int, block_size: int) -> None:
    """Make seq.block_hashes cover its first num_blocks blocks (all full)."""
    for index in range(len(seq.block_hashes), num_blocks):
        start, end = index * block_size, (index + 1) * block_size
        parent = seq.block_hashes[-1] if seq.block_hashes else b""
        seq.block_hashes.append(
            block_hash(parent, seq.token_ids[start:end], seq.positions(start, end), seq.media_keys(start, end))
        )


def media_content_hash(rows: np.ndarray) -> str:
    """Key of a medium when the request names none: the bytes of its embedding rows."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((rows.dtype.str, rows.shape)).encode())
    digest.update(np.ascontiguousarray(rows).tobytes())
    return digest.hexdigest()
