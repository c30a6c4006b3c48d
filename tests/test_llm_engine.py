"""The batching engine against transformers' own Qwen2-VL `generate`, on the tiny checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from vlmserve.engine import LLMEngine, Sampler, SamplingParams
from vlmserve.engine.sequence import Sequence
from vlmserve.errors import InvalidRequest
from vlmserve.mrope import mrope_positions

TEXT_VOCAB = 1500  # BPE ids of the tiny tokenizer; the special tokens come after
GREEDY = SamplingParams(max_tokens=16, temperature=0)
SEEDED = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, top_k=20, seed=1234)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matmuls are microseconds of work; with several threads the OpenMP
    hand-offs cost ~10x more than the math (worse on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def hf_model(checkpoint) -> Qwen2VLForConditionalGeneration:
    return Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


class Prompt:
    """input_ids plus what the `preprocess`/`vit` models would hand the engine for them."""

    def __init__(self, hf_model, text_lens: tuple[int, ...], grid: tuple[int, int, int] | None = None,
                 kind: str = "image", seed: int = 0) -> None:
        config = hf_model.config
        rng = np.random.default_rng(seed)
        pieces = [rng.integers(0, TEXT_VOCAB, text_lens[0])]
        self.hf_kwargs: dict = {}
        self.media = None
        grids = {"image": None, "video": None}
        if grid is not None:
            pad = config.image_token_id if kind == "image" else config.video_token_id
            num_pads = int(np.prod(grid)) // config.vision_config.spatial_merge_size**2
            pieces += [[config.vision_start_token_id], [pad] * num_pads, [config.vision_end_token_id]]
            grid_thw = torch.tensor([grid])
            generator = torch.Generator().manual_seed(seed)
            pixels = torch.randn(int(np.prod(grid)), 3 * 2 * 14 * 14, generator=generator)
            with torch.no_grad():
                self.media = hf_model.model.visual(pixels, grid_thw=grid_thw).pooler_output.numpy()
            grids[kind] = grid_thw.numpy()
            prefix = "pixel_values" if kind == "image" else "pixel_values_videos"
            self.hf_kwargs = {prefix: pixels, f"{kind}_grid_thw": grid_thw}
        pieces.append(rng.integers(0, TEXT_VOCAB, text_lens[1] if len(text_lens) > 1 else 0))
        self.ids = np.concatenate(pieces).astype(np.int64)
        self.positions, self.rope_delta = mrope_positions(self.ids, grids["image"], grids["video"], config)
        token_types = np.zeros_like(self.ids)
        token_types[self.ids == config.image_token_id] = 1
        token_types[self.ids == config.video_token_id] = 2
        self.hf_kwargs["mm_token_type_ids"] = torch.from_numpy(token_types)[None]

    def add_to(self, engine: LLMEngine, request_id: str, sampling: SamplingParams) -> None:
        engine.add_request(request_id, self.ids, self.positions, self.rope_delta, self.media, sampling)


class RecordingSampler(Sampler):
    """Keeps every logits row the engine samples from, per request."""

    def __init__(self) -> None:
        self.logits: dict[str, list[torch.Tensor]] = {}

    def __call__(self, logits, seqs):
        for row, seq in zip(logits, seqs):
            self.logits.setdefault(seq.request_id, []).append(row.clone())
        return super().__call__(logits, seqs)


def drain(engine: LLMEngine, arrivals: dict[int, list] = None, check_step=None) -> dict[str, list]:
    """Step until idle; arrivals[step] are callables run before that step. Returns the
    outputs per request; check_step(outputs) runs after every step."""
    arrivals = arrivals or {}
    outputs: dict[str, list] = {}
    step = 0
    while engine.has_unfinished() or any(s >= step for s in arrivals):
        for arrive in arrivals.get(step, []):
            arrive()
        step_outputs = engine.step()
        for out in step_outputs:
            assert not outputs.get(out.request_id) or not outputs[out.request_id][-1].finished
            outputs.setdefault(out.request_id, []).append(out)
        if check_step:
            check_step(step_outputs)
        step += 1
    return outputs


def tokens(outputs: list) -> list[int]:
    return [out.token_id for out in outputs]


def recording_engine(checkpoint, **kwargs) -> LLMEngine:
    engine = LLMEngine(checkpoint, **kwargs)
    engine.sampler = RecordingSampler()
    return engine


def alone(checkpoint, prompt: Prompt, sampling: SamplingParams) -> list[int]:
    return alone_with_logits(checkpoint, prompt, sampling)[0]


def alone_with_logits(checkpoint, prompt: Prompt, sampling: SamplingParams) -> tuple[list[int], list[torch.Tensor]]:
    engine = recording_engine(checkpoint)
    prompt.add_to(engine, "alone", sampling)
    return tokens(drain(engine)["alone"]), engine.sampler.logits["alone"]


def assert_same_run(engine: LLMEngine, request_id: str, got: list, checkpoint, prompt: Prompt,
                    sampling: SamplingParams) -> None:
    """Tokens identical and logits close to running the request alone (tokens alone barely
    depend on attention details in the tiny model; logits do)."""
    want_tokens, want_logits = alone_with_logits(checkpoint, prompt, sampling)
    assert tokens(got) == want_tokens
    for got_row, want_row in zip(engine.sampler.logits[request_id], want_logits, strict=True):
        torch.testing.assert_close(got_row, want_row, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "shape",
    [
        dict(text_lens=(23,)),
        dict(text_lens=(5, 7), grid=(1, 4, 6)),
        dict(text_lens=(4, 6), grid=(2, 4, 4), kind="video"),
    ],
    ids=["text", "image", "video"],
)
def test_greedy_matches_hf_generate(checkpoint, hf_model, shape):
    prompt = Prompt(hf_model, **shape)
    eos = list(hf_model.generation_config.eos_token_id)

    def generate(stop_ids: list[int]):
        with torch.no_grad():
            out = hf_model.generate(
                torch.from_numpy(prompt.ids)[None], do_sample=False, max_new_tokens=24, eos_token_id=stop_ids,
                output_logits=True, return_dict_in_generate=True, **prompt.hf_kwargs,
            )
        return out.sequences[0, len(prompt.ids):].tolist(), [step[0] for step in out.logits]

    # Random weights rarely hit the real EOS, so also stop at a token the output reaches after
    # some steps, to check that the engine stops where generate does (EOS included).
    free_run, _ = generate(eos)
    stop = next(t for i, t in enumerate(free_run) if i >= 8 and t not in free_run[:i])
    expected, expected_logits = generate(eos + [stop])
    assert expected[-1] == stop and len(expected) < 24

    engine = recording_engine(checkpoint)
    prompt.add_to(engine, "r", SamplingParams(max_tokens=24, temperature=0, stop_token_ids=eos + [stop]))
    outputs = drain(engine)["r"]

    assert tokens(outputs) == expected
    assert outputs[-1].finished and outputs[-1].finish_reason == "stop"
    assert all(not out.finished for out in outputs[:-1])
    assert outputs[-1].num_prompt_tokens == len(prompt.ids)
    # Logits, not only argmaxes: the tiny model's tokens hardly depend on positions, its logits do.
    for got, want in zip(engine.sampler.logits["r"], expected_logits, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_requests_join_running_batch(checkpoint, hf_model):
    specs = [  # (arrival step, prompt, max_tokens)
        (0, Prompt(hf_model, (3,), seed=1), 12),
        (0, Prompt(hf_model, (17,), seed=2), 20),
        (1, Prompt(hf_model, (6, 9), grid=(1, 4, 6), seed=3), 8),
        (2, Prompt(hf_model, (8,), seed=4), 16),
        (3, Prompt(hf_model, (25,), seed=5), 10),
        (5, Prompt(hf_model, (4, 3), grid=(2, 4, 4), kind="video", seed=6), 14),
        (5, Prompt(hf_model, (5,), seed=7), 18),
        (9, Prompt(hf_model, (40,), seed=8), 6),
    ]
    engine = recording_engine(checkpoint)
    arrivals: dict[int, list] = {}
    for i, (step, prompt, max_tokens) in enumerate(specs):
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0)
        arrivals.setdefault(step, []).append(lambda p=prompt, i=i, s=sampling: p.add_to(engine, f"r{i}", s))
    outputs = drain(engine, arrivals)

    for i, (_, prompt, max_tokens) in enumerate(specs):
        got = outputs[f"r{i}"]
        assert_same_run(engine, f"r{i}", got, checkpoint, prompt, SamplingParams(max_tokens=max_tokens, temperature=0))
        assert len(got) == max_tokens and got[-1].finish_reason == "length"
    stats = engine.stats
    assert stats.max_batch_size >= 4
    assert max(stats.batch_size_histogram) == stats.max_batch_size
    assert sum(stats.batch_size_histogram.values()) == stats.steps
    assert stats.batched_sequences == sum(size * n for size, n in stats.batch_size_histogram.items())
    prompt_tokens = sum(len(p.ids) for _, p, _ in specs)
    assert stats.scheduled_tokens == prompt_tokens + sum(m - 1 for _, _, m in specs)
    assert not engine.has_unfinished()


def test_chunked_prefill_keeps_decoding(checkpoint, hf_model):
    short = Prompt(hf_model, (6,), seed=11)
    long = Prompt(hf_model, (20, 30), grid=(1, 8, 8), seed=12)  # 16 image pads split over chunks
    budget = 8
    engine = recording_engine(checkpoint, max_num_seqs=4, max_num_batched_tokens=budget)
    seen: list[list[str]] = []

    def check(step_outputs):
        assert engine.stats.last_num_tokens <= budget
        seen.append([out.request_id for out in step_outputs])

    arrivals = {0: [lambda: short.add_to(engine, "short", SamplingParams(max_tokens=30, temperature=0))],
                2: [lambda: long.add_to(engine, "long", SamplingParams(max_tokens=10, temperature=0))]}
    outputs = drain(engine, arrivals, check)

    prefill_steps = seen[2:][: next(i for i, ids in enumerate(seen[2:]) if "long" in ids)]
    assert len(prefill_steps) >= len(long.ids) // budget  # the long prompt really was chunked ...
    assert all("short" in ids for ids in prefill_steps)  # ... while the short one kept decoding
    assert_same_run(engine, "short", outputs["short"], checkpoint, short, SamplingParams(max_tokens=30, temperature=0))
    assert_same_run(engine, "long", outputs["long"], checkpoint, long, SamplingParams(max_tokens=10, temperature=0))


def test_seeded_sampling_is_reproducible_and_batch_independent(checkpoint, hf_model):
    prompt = Prompt(hf_model, (5, 4), grid=(1, 4, 6), seed=21)
    first = alone(checkpoint, prompt, SEEDED)
    assert first == alone(checkpoint, prompt, SEEDED)
    assert first != alone(checkpoint, prompt, dataclasses.replace(SEEDED, seed=4321))

    engine = LLMEngine(checkpoint)
    others = [Prompt(hf_model, (n,), seed=30 + n) for n in (3, 11, 19)]
    arrivals = {
        0: [lambda: others[0].add_to(engine, "o0", SamplingParams(max_tokens=9, temperature=1.0, seed=7))],
        1: [lambda: others[1].add_to(engine, "o1", GREEDY)],
        3: [lambda: prompt.add_to(engine, "seeded", SEEDED)],
        5: [lambda: others[2].add_to(engine, "o2", SamplingParams(max_tokens=12, temperature=0.5, top_k=5))],
    }
    outputs = drain(engine, arrivals)
    assert tokens(outputs["seeded"]) == first
    assert engine.stats.max_batch_size >= 3


def test_abort_frees_the_sequence(checkpoint, hf_model):
    engine = LLMEngine(checkpoint, max_num_seqs=2, max_num_batched_tokens=64)
    prompts = {f"r{i}": Prompt(hf_model, (4 + i,), seed=40 + i) for i in range(3)}
    for request_id, prompt in prompts.items():
        prompt.add_to(engine, request_id, SamplingParams(max_tokens=20, temperature=0))
    engine.step()
    engine.step()
    running = {seq.request_id: seq for seq in engine.scheduler.running}
    assert set(running) == {"r0", "r1"} and [s.request_id for s in engine.scheduler.waiting] == ["r2"]

    engine.abort("r0")  # decoding
    engine.abort("r2")  # still waiting
    engine.abort("never-added")
    after = engine.step()
    assert {out.request_id for out in after} == {"r1"}
    assert [seq.request_id for seq in engine.scheduler.running] == ["r1"] and not engine.scheduler.waiting
    assert not running["r0"].block_table and engine.kv_blocks_used() == len(running["r1"].block_table)
    assert running["r0"].finish_reason == "abort"

    prompts["r0"].add_to(engine, "r0", GREEDY)  # an aborted id can be reused
    outputs = drain(engine)
    assert set(outputs) == {"r0", "r1"}
    assert not engine.has_unfinished() and not engine.scheduler.running
    assert engine.kv_blocks_used() == 0


def test_add_request_rejects_bad_inputs(checkpoint, hf_model):
    engine = LLMEngine(checkpoint)
    image = Prompt(hf_model, (3, 3), grid=(1, 4, 6))
    with pytest.raises(InvalidRequest, match="media embedding rows"):
        engine.add_request("a", image.ids, image.positions, image.rope_delta, None, GREEDY)
    with pytest.raises(InvalidRequest, match="position_ids"):
        engine.add_request("a", image.ids, image.positions[:, 1:], image.rope_delta, image.media, GREEDY)
    image.add_to(engine, "a", GREEDY)
    with pytest.raises(InvalidRequest, match="already running"):
        image.add_to(engine, "a", GREEDY)


@pytest.mark.parametrize(
    "kwargs",
    [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(min_p=-0.1),
     dict(min_p=1.5), dict(seed=-3),
     dict(stop_token_ids=[1, -2]), dict(frequency_penalty=3), dict(presence_penalty=-2.5),
     dict(repetition_penalty=0), dict(max_tokens=True)],
)
def test_sampling_params_validation(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_penalties_change_greedy_choice():
    def seq(params: SamplingParams, output: list[int]) -> Sequence:
        s = Sequence("p", np.array([0, 1]), np.zeros((3, 2), np.int64), 0, None, np.zeros(0, np.int64), [], params)
        for token in output:
            s.append_token(token)
        return s

    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0]]).repeat(4, 1)
    seqs = [
        seq(SamplingParams(temperature=0), [1]),
        seq(SamplingParams(temperature=0, presence_penalty=0.5), [1]),
        seq(SamplingParams(temperature=0, frequency_penalty=0.1), [1, 1]),
        seq(SamplingParams(temperature=0, repetition_penalty=1.2), []),  # token 1 is in the prompt
    ]
    assert Sampler()(logits, seqs) == [1, 2, 2, 2]


def test_min_p_drops_unlikely_tokens():
    def picks(min_p: float) -> set[int]:
        params = SamplingParams(temperature=1.0, min_p=min_p, seed=0)
        seq = Sequence("m", np.array([0]), np.zeros((3, 1), np.int64), 0, None, np.zeros(0, np.int64), [], params)
        logits = torch.tensor([[0.0, 3.0, 2.9, 1.0]])
        return {Sampler()(logits, [seq])[0] for _ in range(200)}

    # exp(-0.1) = 0.905 and exp(-2) = 0.135 of the top token's probability.
    assert picks(0.0) == {0, 1, 2, 3}
    assert picks(0.5) == {1, 2}
    assert picks(0.95) == {1}


def test_mrope_positions():
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig(image_token_id=7, video_token_id=8, vision_start_token_id=5, vision_end_token_id=6)
    text = np.array([1, 2, 3, 4])
    positions, delta = mrope_positions(text, None, None, config)
    assert (positions == np.arange(4)).all() and positions.shape == (3, 4) and delta == 0

    ids = np.array([1, 5] + [7] * 6 + [6, 2])
    positions, delta = mrope_positions(ids, np.array([[1, 4, 6]]), None, config)
    assert positions[:, 2:8].tolist() == [[2] * 6, [2, 2, 2, 3, 3, 3], [2, 3, 4, 2, 3, 4]]
    assert positions[:, -1].tolist() == [6, 6, 6] and delta == 7 - len(ids)
    with pytest.raises(ValueError, match="image pad tokens"):
        mrope_positions(ids, np.array([[1, 4, 4]]), None, config)
