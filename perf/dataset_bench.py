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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from perf.internvl_data import Conversation, load_jsonl, user_contents
from perf.media_server import MediaServer
from perf.sessions import HISTORIES, Session, TurnResult, run_sessions, ttft_by_round
from perf.stats import summarize
from perf.stream_client import Target
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


def assign(conversations: Sequence[Conversation], workloads: Sequence[Workload], count: int,
           seed: int = 0) -> dict[str, list[Conversation]]:
    """`count` conversations per workload, a seeded draw so every server gets the same ones.

    No conversation is drawn twice, so no workload finds its images or prompts in a cache that another
    one filled (the data may still share images between conversations, as real data does).
    Workloads are served in the order given: put the pickiest first.
    """
    pool = list(conversations)
    random.Random(seed).shuffle(pool)
    used: set[int] = set()
    plan = {}
    for workload in workloads:
        picked = [i for i, c in enumerate(pool) if i not in used and workload.accepts(c)][:count]
        if not picked:
            raise ValueError(f"no conversation in the data fits the {workload.name} workload")
        used.update(picked)
        plan[workload.name] = [pool[i] for i in picked]
    return plan


def to_session(conversation: Conversation, workload: Workload, image_url: Callable[[str], str]) -> Session:
    """The turns `workload` sends of `conversation`, with the dataset's answers as their history."""
    contents = user_contents(conversation, image_url)
    return Session(conversation.id, tuple(contents if workload.all_rounds else contents[:1]),
                   tuple(r.gpt for r in conversation.rounds))


def workload_report(turns: Sequence[TurnResult], wall_s: float) -> dict:
    return {"summary": summarize([t.record for t in turns], wall_s),
            "ttft_p50_by_round_s": ttft_by_round(turns),
            "turns": [asdict(t) for t in turns]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="tiny-qwen2-vl")
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
        conversations = plan[workload.name]
        target = Target(args.base_url, args.base_url, args.model)
        with MediaServer(image_root) as media:
            sessions = [to_session(c, workload, media.url) for c in conversations]
            turns, wall_s = run_sessions(target, sessions, args.workers, args.max_tokens, args.history)
    report = workload_report(turns, wall_s)
    for key, value in report["summary"].items():
        print(f"{key:>22}: {value:.4f}" if isinstance(value, float) else f"{key:>22}: {value}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
