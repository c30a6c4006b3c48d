"""Per-request sampling parameters and the batched sampler that applies them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vlmserve.engine.sequence import Sequence


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens (OpenAI / vLLM semantics).

    temperature 0 is greedy (exact argmax); top_k 0, top_p 1 and min_p 0 turn those filters off
    (min_p drops tokens less likely than min_p times the most likely one); seed None draws from
    a random seed. Penalties: repetition as in HF (divides positive / multiplies negative
    logits of every token seen in prompt or output), frequency and presence as in OpenAI
    (subtract count * frequency + presence from logits of generated tokens).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be null or an integer in [0, 2**63), got {self.seed!r}")
        stop = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in stop):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {list(stop)!r}")
        object.__setattr__(self, "stop_token_ids", stop)  # accept any iterable, keep it hashable
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place; rows without penalties are left bit-for-bit untouched."""
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        params = seq.sampling
        if params.repetition_penalty != 1.0:
            seen = torch.as_tensor(sorted(set(seq.token_ids)), device=logits.device)
            values = logits[row, seen]
            penalized = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
            logits[row, seen] = penalized
        if (params.frequency_penalty or params.presence_penalty) and seq.output_ids:
            counts = torch.bincount(torch.as_tensor(seq.output_ids, device=logits.device), minlength=vocab)
            counts = counts[:vocab].to(logits.dtype)
            logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)


class Sampler:
    """Picks the next token of each row of a logits batch with that row's own parameters."""

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits [B, V] of each sequence's last token -> one token id per sequence."""
        logits = logits.float().clone()  # sampling math in fp32 whatever the model dtype
        _apply_penalties(logits, seqs)
        tokens = logits.argmax(dim=-1)
        sampled = [row for row, seq in enumerate(seqs) if not seq.sampling.greedy]
        if sampled:
            rows = torch.as_tensor(sampled, device=logits.device)
            tokens[rows] = self._sample(logits[rows], [seqs[row] for row in sampled])
        return tokens.tolist()

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[-1]
        temperature = torch.tensor([s.sampling.temperature for s in seqs], device=device)
        top_k = torch.tensor([s.sampling.top_k or vocab for s in seqs], device=device)
        top_p = torch.tensor([s.sampling.top_p for s in seqs], device=device)
        min_p = torch.tensor([s.sampling.min_p for s in seqs], device=device)

        sorted_logits, order = (logits / temperature[:, None]).sort(dim=-1, descending=True)
        sorted_logits.masked_fill_(torch.arange(vocab, device=device) >= top_k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass, or when it
        # is below min_p of the top probability; the first token always stays.
        drop = (probs.cumsum(dim=-1) - probs > top_p[:, None]) | (probs < min_p[:, None] * probs[:, :1])
        sorted_logits.masked_fill_(drop, float("-inf"))
        cdf = sorted_logits.softmax(dim=-1).cumsum(dim=-1)

        # One uniform per row from the row's own CPU generator: a request's draws depend only on
        # its seed and its own logits, never on which other requests share the batch.
        uniform = torch.stack([torch.rand((), generator=s.generator) for s in seqs]).to(device)
        picks = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)
        return order.gather(-1, picks).squeeze(-1)
