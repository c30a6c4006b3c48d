"""The llm model's serving loop and engines, without Triton."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from transformers import AutoConfig

from vlmserve.errors import InvalidRequest
from vlmserve.llm_serving.engine_config import EngineConfig
from vlmserve.llm_serving.request import GenerationRequest, MediaInput, TokenChunk, media_runs, split_media
from vlmserve.llm_serving.server import LLMServer, merge_chunks

IMAGE, VIDEO = 100, 101


def chunk(rid: str, *tokens: int, finish: str | None = None) -> TokenChunk:
    return TokenChunk(rid, list(tokens), finish)


def test_merge_chunks_joins_what_is_queued_together_per_request():
    merged = merge_chunks([chunk("a", 1), chunk("b", 7), chunk("a", 2), chunk("a", 3, finish="stop"), chunk("b", 8)])
    assert merged == [chunk("a", 1, 2, 3, finish="stop"), chunk("b", 7, 8)]
    # Nothing is merged past a request's end: a later request under the same id keeps its own chunk.
    assert merge_chunks([chunk("a", 1, finish="length"), chunk("a", 5)]) == [chunk("a", 1, finish="length"),
                                                                               chunk("a", 5)]


def test_media_runs_and_split_media():
    ids = np.array([1, IMAGE, IMAGE, 2, 3, VIDEO, VIDEO, VIDEO, 4, IMAGE, 5])
    assert media_runs(ids, (IMAGE, VIDEO)) == [(1, 2), (5, 3), (9, 1)]
    embeds = np.arange(6 * 4, dtype=np.float32).reshape(6, 4)
    grids = np.array([[1, 2, 4], [2, 2, 6], [1, 2, 2]])
    media = split_media(ids, embeds, ["k1", "k2", "k3"], grids, (IMAGE, VIDEO))
    assert [m.kind for m in media] == ["image", "video", "image"]
    assert [m.key for m in media] == ["k1", "k2", "k3"]
    np.testing.assert_array_equal(media[1].embeds, embeds[2:5])
    np.testing.assert_array_equal(media[2].grid_thw, [1, 2, 2])
    with pytest.raises(InvalidRequest, match="6 image/video pad tokens but 5 media embedding rows"):
        split_media(ids, embeds[:5], ["k1", "k2", "k3"], grids, (IMAGE, VIDEO))
    with pytest.raises(InvalidRequest, match="3 media in the prompt but 2 keys"):
        split_media(ids, embeds, ["k1", "k2"], grids, (IMAGE, VIDEO))


def test_vllm_prompt_has_one_pad_per_medium_and_embeddings_by_modality():
    pytest.importorskip("vllm")
    from vlmserve.llm_serving.vllm_engine import vllm_prompt

    ids = np.array([1, IMAGE, IMAGE, 2, VIDEO, VIDEO, VIDEO, 4, IMAGE, 5])
    rows = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    media = [MediaInput("image", "a", np.array([1, 2, 4]), rows[0:2]),
             MediaInput("video", "v", np.array([2, 2, 3]), rows[2:5]),
             MediaInput("image", "b", np.array([1, 2, 2]), rows[5:6])]
    request = GenerationRequest("r", ids, {}, media)
    prompt = vllm_prompt(request, (IMAGE, VIDEO))
    assert prompt["prompt_token_ids"] == [1, IMAGE, 2, VIDEO, 4, IMAGE, 5]
    assert prompt["multi_modal_uuids"] == {"image": ["a", "b"], "video": ["v"]}
    image = prompt["multi_modal_data"]["image"]
    np.testing.assert_array_equal(image["image_embeds"].numpy(), rows[[0, 1, 5]])
    assert image["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]
    assert prompt["multi_modal_data"]["video"]["video_grid_thw"].tolist() == [[2, 2, 3]]
    wrong = GenerationRequest("r", ids, {}, [media[1], media[0], media[2]])
    with pytest.raises(InvalidRequest, match="a run of image pad tokens carries a video"):
        vllm_prompt(wrong, (IMAGE, VIDEO))


class FakeEngine:
    """Emits `per_request` tokens for each request from a thread of its own, as engines do."""

    media_token_ids = (IMAGE, VIDEO)

    def __init__(self, on_output, per_request: int = 5, delay_s: float = 0.0) -> None:
        self.on_output, self.per_request, self.delay_s = on_output, per_request, delay_s
        self.aborted: list[str] = []
        self.stopped = threading.Event()

    def add(self, request: GenerationRequest) -> None:
        if request.sampling.get("bad"):
            raise InvalidRequest("bad sampling parameters")
        threading.Thread(target=self._run, args=(request.request_id,), daemon=True).start()

    def _run(self, request_id: str) -> None:
        for i in range(self.per_request):
            if request_id in self.aborted or self.stopped.is_set():
                return
            time.sleep(self.delay_s)
            last = i == self.per_request - 1
            self.on_output(TokenChunk(request_id, [i], "length" if last else None))

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def shutdown(self) -> None:
        self.stopped.set()


class FakeStream:
    def __init__(self) -> None:
        self.chunks: list[TokenChunk] = []
        self.closed = threading.Event()
        self.cancelled = False

    def send(self, chunk: TokenChunk) -> None:
        self.chunks.append(chunk)
        if chunk.finished:
            self.closed.set()

    def close(self) -> None:
        self.closed.set()

    def is_cancelled(self) -> bool:
        return self.cancelled


def request(rid: str, **sampling) -> GenerationRequest:
    return GenerationRequest(rid, np.array([1, 2, 3]), sampling)


def test_server_streams_every_token_and_ends_each_stream_once():
    server = LLMServer(lambda on_output: FakeEngine(on_output, per_request=50))
    streams = {f"r{i}": FakeStream() for i in range(8)}
    for rid, stream in streams.items():
        server.submit(request(rid), stream)
    for stream in streams.values():
        assert stream.closed.wait(10)
    server.shutdown()
    for stream in streams.values():
        assert sum((c.token_ids for c in stream.chunks), []) == list(range(50))
        assert [c.finished for c in stream.chunks].count(True) == 1 and stream.chunks[-1].finish_reason == "length"
    assert server.active_requests == 0


def test_server_aborts_cancelled_streams_and_refuses_bad_requests():
    server = LLMServer(lambda on_output: FakeEngine(on_output, per_request=10_000, delay_s=0.001))
    stream = FakeStream()
    server.submit(request("long"), stream)
    time.sleep(0.1)
    stream.cancelled = True  # the client went away
    assert stream.closed.wait(5)
    assert server.engine.aborted == ["long"] and server.active_requests == 0
    assert not any(c.finished for c in stream.chunks)
    with pytest.raises(InvalidRequest):
        server.submit(request("bad", bad=True), FakeStream())
    assert server.active_requests == 0
    server.abort("long")  # already gone: nothing happens
    server.shutdown()


def greedy_tokens(engine: str, checkpoint, request: GenerationRequest) -> list[int]:
    args = {"vllm": {"enforce_eager": True, "kv_cache_memory_bytes": 128 * 2**20, "dtype": "float32"},
            "native": {"torch_threads": 1}}[engine]
    server = LLMServer(EngineConfig(engine, str(checkpoint), args).engine_factory())
    stream = FakeStream()
    server.submit(request, stream)
    try:
        assert stream.closed.wait(120)
    finally:
        server.shutdown()
    assert stream.chunks[-1].finish_reason == "length"
    return sum((c.token_ids for c in stream.chunks), [])


def test_vllm_and_native_engines_give_the_same_greedy_tokens_without_triton(tiny_checkpoint):
    pytest.importorskip("vllm")
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    grid = np.array([1, 4, 6])
    pads = int(grid.prod()) // config.vision_config.spatial_merge_size**2
    ids = np.array([11, 12, config.vision_start_token_id] + [config.image_token_id] * pads
                   + [config.vision_end_token_id, 13, 14])
    embeds = np.random.default_rng(1).standard_normal((pads, config.text_config.hidden_size)).astype(np.float32)
    request = GenerationRequest("r", ids, {"max_tokens": 12, "temperature": 0},
                                [MediaInput("image", "k", grid, embeds)])
    native = greedy_tokens("native", tiny_checkpoint, request)
    assert len(native) == 12
    assert greedy_tokens("vllm", tiny_checkpoint, request) == native


def test_native_engine_refuses_a_grid_that_does_not_fit_the_pad_tokens(tiny_checkpoint):
    # The native engine computes the prompt's M-RoPE positions from the grids: they must agree with the prompt.
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    ids = np.array([11, config.vision_start_token_id] + [config.image_token_id] * 6 + [config.vision_end_token_id])
    embeds = np.zeros((6, config.text_config.hidden_size), np.float32)
    request = GenerationRequest("r", ids, {"max_tokens": 2}, [MediaInput("image", "k", np.array([1, 4, 4]), embeds)])
    engine = EngineConfig("native", str(tiny_checkpoint), {"torch_threads": 1}).engine_factory()(lambda chunk: None)
    try:
        with pytest.raises(InvalidRequest, match="6 image pad tokens but the image grids need 4"):
            engine.add(request)
    finally:
        engine.shutdown()
