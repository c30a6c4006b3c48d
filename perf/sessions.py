"""Sessions (one-turn requests or multi-turn conversations) sent to a server, and what came back.

A session is the user turns of one conversation, each an OpenAI `content` list, and the assistant
answers the history carries between them. Turns of a session go one after another, each with the
whole conversation so far; sessions run concurrently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import openai

from perf.stats import RequestRecord, percentile
from perf.stream_client import Target, stream_chat, stream_chat_async

HISTORIES = ("dataset", "model")


@dataclass(frozen=True)
class Session:
    id: str
    user_turns: tuple[list[dict], ...]
    # The assistant turn after each user turn but the last, as the history carries it (`--history
    # dataset`): fixed text, so every server gets byte-identical prompts whatever it answered.
    answers: tuple[str, ...] = ()


@dataclass(frozen=True)
class TurnResult:
    session_id: str
    round: int  # 0 for the first turn of a session
    record: RequestRecord
    text: str


def run_session(client: openai.OpenAI, target: Target, session: Session, max_tokens: int,
                history: str = "dataset") -> list[TurnResult]:
    messages: list[dict] = []
    results = []
    for index, content in enumerate(session.user_turns):
        messages.append({"role": "user", "content": content})
        record, answer = stream_chat(client, target, messages, max_tokens)
        results.append(TurnResult(session.id, index, record, answer))
        if not record.ok:
            break  # the rest of this conversation would build on an answer that never came
        if index + 1 < len(session.user_turns):
            previous = answer if history == "model" else session.answers[index]
            messages.append({"role": "assistant", "content": previous})
    return results


def run_sessions(target: Target, sessions: Sequence[Session], workers: int, max_tokens: int,
                 history: str = "dataset") -> tuple[list[TurnResult], float]:
    """Every turn's result, in session order, and the wall time of the whole run."""
    client = target.client()
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        per_session = list(pool.map(lambda s: run_session(client, target, s, max_tokens, history), sessions))
    return [t for turns in per_session for t in turns], time.perf_counter() - start


def ttft_by_round(turns: Sequence[TurnResult]) -> dict[int, float]:
    """Median TTFT of each round index: where caches pay off, later rounds stay as fast as the first."""
    rounds: dict[int, list[float]] = {}
    for t in turns:
        if t.record.ok:
            rounds.setdefault(t.round, []).append(t.record.ttft_s)
    return {index: percentile(values, 50) for index, values in sorted(rounds.items())}


def identical_answers(ours: Sequence[TurnResult], peer: Sequence[TurnResult]) -> tuple[int, int]:
    """(identical, compared): the turns both servers answered, and how many of those have the same text."""
    theirs = {(t.session_id, t.round): t.text for t in peer if t.record.ok}
    compared = [(t.text, theirs[t.session_id, t.round]) for t in ours
                if t.record.ok and (t.session_id, t.round) in theirs]
    return sum(a == b for a, b in compared), len(compared)


def run_streams(target: Target, sessions: Sequence[Session], workers: int, max_tokens: int,
                ignore_eos: bool = False) -> tuple[list[TurnResult], float]:
    """`run_sessions` for one-turn sessions from one asyncio client: `workers` streams open at once."""
    async def run() -> list[TurnResult]:
        slots = asyncio.Semaphore(workers)
        limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            async def one(session: Session) -> TurnResult:
                async with slots:
                    record, text = await stream_chat_async(client, target, [
                        {"role": "user", "content": session.user_turns[0]}], max_tokens, ignore_eos)
                return TurnResult(session.id, 0, record, text)

            return await asyncio.gather(*map(one, sessions))

    start = time.perf_counter()
    turns = asyncio.run(run())
    return turns, time.perf_counter() - start
