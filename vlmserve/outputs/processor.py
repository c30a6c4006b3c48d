"""One request's engine outputs -> the deltas its client's stream carries.

vLLM's output processing already made the text (incremental detokenization that never splits a UTF-8
character, stop strings matched and held back); what is ours is the rest of what an OpenAI response
holds: logprob entries with each token's exact bytes, the usage counts and the finish reason, each made
here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmserve.outputs.token_bytes import TokenBytes

# JSON has no -inf; OpenAI-compatible servers (vLLM) send this instead.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens the prefix cache served


@dataclass(frozen=True)
class Delta:
    """What a stream gets next: new text, with the logprob entries of its tokens when asked for; the last
    delta of a request has its finish reason and usage."""

    text: str
    logprobs: list[dict] | None = None  # OpenAI's entries: token, bytes, logprob, top_logprobs
    finish_reason: str | None = None  # "stop" | "length" on the last delta
    usage: Usage | None = None  # on the last delta

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def then(self, later: Delta) -> Delta:
        """This delta followed by a later one of the same request, as one."""
        logprobs = None if self.logprobs is None else self.logprobs + (later.logprobs or [])
        return Delta(self.text + later.text, logprobs, later.finish_reason, later.usage)


class RequestState:
    """The output state of one request: what its deltas need that the engine's outputs do not say each time."""

    def __init__(self, prompt_tokens: int, top_logprobs: int | None, token_bytes: TokenBytes) -> None:
        self.prompt_tokens = prompt_tokens
        self.top_logprobs = top_logprobs  # None: no logprobs asked for
        self.token_bytes = token_bytes
        self.completion_tokens = 0
        self.cached_tokens: int | None = None

    def process(self, output) -> Delta | None:
        """The delta of one vLLM RequestOutput (output kind DELTA), or None when it adds nothing to send."""
        completion = output.outputs[0]
        self.completion_tokens += len(completion.token_ids)
        if self.cached_tokens is None:
            self.cached_tokens = output.num_cached_tokens or 0
        logprobs = None
        if self.top_logprobs is not None:
            logprobs = self._entries(completion.token_ids, completion.logprobs or [])
        if not output.finished:
            return Delta(completion.text, logprobs) if completion.text or logprobs else None
        usage = Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        return Delta(completion.text, logprobs, completion.finish_reason or "stop", usage)

    def _entries(self, token_ids, positions) -> list[dict]:
        """OpenAI's logprob entries of the tokens that have text, from vLLM's {token id: Logprob} per position
        (the sampled token and the top ones)."""
        entries = []
        for token_id, position in zip(token_ids, positions):
            chosen = self._entry(token_id, position[token_id].logprob)
            if chosen is None:  # a special token: not in the text either
                continue
            ranked = sorted((lp.rank, tid, lp.logprob) for tid, lp in position.items()
                            if lp.rank is not None and lp.rank <= self.top_logprobs)
            tops = (self._entry(tid, value) for _, tid, value in ranked)
            entries.append({**chosen, "top_logprobs": [top for top in tops if top is not None]})
        return entries

    def _entry(self, token_id: int, logprob: float) -> dict | None:
        data = self.token_bytes(token_id)
        if data is None:
            return None
        return {"token": data.decode("utf-8", errors="replace"), "bytes": list(data),
                "logprob": max(float(logprob), MIN_LOGPROB)}
