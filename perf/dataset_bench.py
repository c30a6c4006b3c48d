"""The dataset benchmark: single-image, multi-image and multi-round conversations through the OpenAI API.

    python -m perf.dataset_bench --base-url http://127.0.0.1:8000/v1 --model tiny-qwen2-vl \
        --workload multi-round --jsonl internvl_sft.jsonl --image-root /data/InternVL-Chat-V1-2-SFT-Data
    python -m perf.dataset_bench --workload single-image            # seeded synthetic data (perf.synthetic_data)

Workloads pick conversations from the data by shape:
  single-image: exactly one image; its first round is sent;
  multi-image:  two images or more; its first round is sent;
  multi-round:  two rounds or more; every round is sent, each with the whole conversation so far,
                as chat clients do. The assistant turns of that history are the dataset's gpt answers
                (`--history dataset`, the default: every server then gets byte-identical prompts) or the
                server's own previous answers (`--history model`).
`--workers` conversations run at once; the rounds of one conversation run one after another.
Images are served to the server over HTTP from a local server this script starts.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from perf.internvl_data import Conversation, load_jsonl, user_contents
from perf.media_server import MediaServer
from perf.stats import RequestRecord, percentile, summarize
from perf.stream_client import Target, stream_chat
from perf.synthetic_data import synthesize


@dataclass(frozen=True)
class Workload:
    name: str
    accepts: Callable[[Conversation], bool]
    all_rounds: bool


WORKLOADS = {
    w.name: w for w in (
        Workload("single-image", lambda c: len(c.images) == 1, all_rounds=False),
        Workload("multi-image", lambda c: len(c.images) >= 2, all_rounds=False),
        Workload("multi-round", lambda c: len(c.rounds) >= 2, all_rounds=True),
    )
}
HISTORIES = ("dataset", "model")


@dataclass(frozen=True)
class TurnResult:
    conversation_id: str
    round: int  # 0 for the first turn of a conversation
    record: RequestRecord


def assign(conversations: Sequence[Conversation], workloads: Sequence[Workload], count: int,
           repeats: int = 1, seed: int = 0) -> dict[str, list[list[Conversation]]]:
    """`count` conversations per workload and repeat, a seeded draw so every server gets the same ones.

    No conversation is drawn twice, so no run finds its images or prompts in a cache that an earlier
    run filled (the data may still share images between conversations, as real data does).
    Workloads are served in the order given: put the pickiest first.
    """
    pool = list(conversations)
    random.Random(seed).shuffle(pool)
    used: set[int] = set()
    plan = {}
    for workload in workloads:
        picked = [i for i, c in enumerate(pool) if i not in used and workload.accepts(c)][:count * repeats]
        if not picked:
            raise ValueError(f"no conversation in the data fits the {workload.name} workload")
        used.update(picked)
        per_repeat = max(1, len(picked) // repeats)
        plan[workload.name] = [[pool[i] for i in picked[r * per_repeat:(r + 1) * per_repeat]] for r in range(repeats)]
    return plan


def run_conversation(client, target: Target, conversation: Conversation, workload: Workload,
                     image_url: Callable[[str], str], max_tokens: int, history: str) -> list[TurnResult]:
    contents = user_contents(conversation, image_url)
    messages: list[dict] = []
    results = []
    for index in range(len(contents) if workload.all_rounds else 1):
        messages.append({"role": "user", "content": contents[index]})
        record, answer = stream_chat(client, target, messages, max_tokens)
        results.append(TurnResult(conversation.id, index, record))
        if not record.ok:
            break  # the rest of this conversation would build on an answer that never came
        previous = answer if history == "model" else conversation.rounds[index].gpt
        messages.append({"role": "assistant", "content": previous})
    return results


def run_workload(target: Target, conversations: Sequence[Conversation], workload: Workload,
                 image_url: Callable[[str], str], workers: int, max_tokens: int,
                 history: str = "dataset") -> tuple[list[TurnResult], float]:
    """Every turn's result and the wall time of the whole run."""
    client = target.client()
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        per_conversation = list(pool.map(
            lambda c: run_conversation(client, target, c, workload, image_url, max_tokens, history), conversations))
    return [t for turns in per_conversation for t in turns], time.perf_counter() - start


def ttft_by_round(turns: Sequence[TurnResult]) -> dict[int, float]:
    """Median TTFT of each round index: where caches pay off, later rounds stay as fast as the first."""
    rounds: dict[int, list[float]] = {}
    for t in turns:
        if t.record.ok:
            rounds.setdefault(t.round, []).append(t.record.ttft_s)
    return {index: percentile(values, 50) for index, values in sorted(rounds.items())}


def workload_report(turns: Sequence[TurnResult], wall_s: float) -> dict:
    return {"summary": summarize([t.record for t in turns], wall_s),
            "ttft_p50_by_round_s": ttft_by_round(turns),
            "turns": [asdict(t) for t in turns]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tiny-qwen2-vl")
    parser.add_argument("--no-stream-options", action="store_true",
                        help="do not send stream_options (for servers that reject it, e.g. `transformers serve`)")
    parser.add_argument("--workload", choices=WORKLOADS, required=True)
    parser.add_argument("--jsonl", type=Path, help="InternVL-Chat-V1-2-SFT-Data style JSONL (default: synthetic data)")
    parser.add_argument("--image-root", type=Path, help="directory the JSONL's image paths are relative to")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--history", choices=HISTORIES, default="dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the summary and every turn here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        jsonl, image_root = args.jsonl, args.image_root
        if jsonl is None:
            jsonl = synthesize(Path(scratch), per_shape=args.conversations, seed=args.seed)
            image_root = jsonl.parent
        elif image_root is None:
            image_root = jsonl.parent
        workload = WORKLOADS[args.workload]
        plan = assign(list(load_jsonl(jsonl)), [workload], args.conversations, seed=args.seed)
        (conversations,) = plan[workload.name]
        target = Target(args.base_url, args.base_url, args.model, stream_options=not args.no_stream_options)
        with MediaServer(image_root) as media:
            turns, wall_s = run_workload(target, conversations, workload, media.url,
                                         args.workers, args.max_tokens, args.history)
    report = workload_report(turns, wall_s)
    for key, value in report["summary"].items():
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
