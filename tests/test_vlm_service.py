"""The `vlm` model's code without Triton: the engine's prompt, the output side, the response writer, and the
whole service with vLLM and in-process stand-ins for the vision models."""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pytest
from PIL import Image

from transformers import AutoConfig, AutoTokenizer

from tests.hf_reference import hf_generate
from tests.test_end_to_end import png_bytes
from tests.test_vit_media_encoder import FakeModels, onnx_path  # noqa: F401 (a fixture)
from vlmserve.engine.config import EngineConfig
from vlmserve.engine.request import EngineRequest, MediaInput, media_runs
from vlmserve.errors import InvalidRequest
from vlmserve.outputs.processor import MIN_LOGPROB, Delta, RequestState, Usage
from vlmserve.outputs.token_bytes import TokenBytes
from vlmserve.outputs.writer import ResponseWriter
from vlmserve.vlm_settings import VlmSettings

IMAGE, VIDEO = 100, 101


def test_media_runs():
    ids = np.array([1, IMAGE, IMAGE, 2, 3, VIDEO, VIDEO, VIDEO, 4, IMAGE, 5])
    assert media_runs(ids, (IMAGE, VIDEO)) == [(1, 2), (5, 3), (9, 1)]
    assert media_runs(np.array([1, 2]), (IMAGE, VIDEO)) == []


def test_vllm_prompt_has_one_pad_per_medium_and_embeddings_by_modality():
    from vlmserve.engine.vllm_engine import vllm_prompt

    ids = np.array([1, IMAGE, IMAGE, 2, VIDEO, VIDEO, VIDEO, 4, IMAGE, 5])
    rows = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    media = [MediaInput("image", "a", np.array([1, 2, 4]), rows[0:2]),
             MediaInput("video", "v", np.array([2, 2, 3]), rows[2:5]),
             MediaInput("image", "b", np.array([1, 2, 2]), rows[5:6])]
    prompt = vllm_prompt(EngineRequest(ids, {}, media), (IMAGE, VIDEO))
    assert prompt["prompt_token_ids"] == [1, IMAGE, 2, VIDEO, 4, IMAGE, 5]
    assert prompt["multi_modal_uuids"] == {"image": ["a", "b"], "video": ["v"]}
    image = prompt["multi_modal_data"]["image"]
    np.testing.assert_array_equal(image["image_embeds"].numpy(), rows[[0, 1, 5]])
    assert image["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]
    assert prompt["multi_modal_data"]["video"]["video_grid_thw"].tolist() == [[2, 2, 3]]
    with pytest.raises(InvalidRequest, match="a run of image pad tokens carries a video"):
        vllm_prompt(EngineRequest(ids, {}, [media[1], media[0], media[2]]), (IMAGE, VIDEO))
    with pytest.raises(InvalidRequest, match="2 image pad tokens but 1 embedding rows"):
        vllm_prompt(EngineRequest(ids, {}, [MediaInput("image", "a", np.array([1, 2, 4]), rows[0:1]), *media[1:]]),
                    (IMAGE, VIDEO))


@dataclass
class Logprob:  # vLLM's, as RequestOutput carries it
    logprob: float
    rank: int | None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[dict] | None = None
    finish_reason: str | None = None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool = False
    num_cached_tokens: int | None = None


def test_request_state_makes_deltas_usage_and_logprob_entries_with_exact_bytes(tiny_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    token_bytes = TokenBytes(tokenizer)
    # A token that holds the first of the two bytes of "é": its text is U+FFFD, its bytes exact.
    partial = next(t for t in range(tokenizer.vocab_size) if token_bytes(t) == b"\xc3")
    word = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" the"))[0]
    eos = tokenizer.eos_token_id

    state = RequestState(prompt_tokens=7, top_logprobs=1, token_bytes=token_bytes)
    positions = [{word: Logprob(-0.5, 1), partial: Logprob(-2.0, 2)}, {partial: Logprob(-float("inf"), 3),
                                                                       word: Logprob(-0.1, 1)}]
    first = state.process(Output([Completion(" the", [word, partial], positions)], num_cached_tokens=4))
    assert first.text == " the" and first.finish_reason is None and first.usage is None
    assert [e["token"] for e in first.logprobs] == [" the", "\ufffd"]
    assert first.logprobs[1]["bytes"] == [0xC3] and first.logprobs[1]["logprob"] == MIN_LOGPROB
    assert first.logprobs[0]["top_logprobs"] == [{"token": " the", "bytes": list(b" the"), "logprob": -0.5}]
    # Nothing new to send (text held back by vLLM's detokenizer, no logprobs asked): no delta.
    quiet = RequestState(prompt_tokens=7, top_logprobs=None, token_bytes=token_bytes)
    assert quiet.process(Output([Completion("", [partial])], num_cached_tokens=0)) is None
    # The end: eos has no bytes, hence no entry; usage counts every token, cached tokens from the first output.
    last = state.process(Output([Completion("", [eos], [{eos: Logprob(-0.2, 1)}], "stop")], finished=True,
                                num_cached_tokens=0))
    assert last == Delta("", [], "stop", Usage(prompt_tokens=7, completion_tokens=3, cached_tokens=4))


@dataclass
class SlowStream:
    """A ResponseStream whose sends take `send_s` and record what they got, from which thread, in order."""

    send_s: float = 0.0
    sent: list = field(default_factory=list)
    cancelled: bool = False
    ended: threading.Event = field(default_factory=threading.Event)
    overlapping: int = 0
    senders: set = field(default_factory=set)  # the threads that sent
    _in_send: bool = False

    def send(self, delta: Delta) -> None:
        self.senders.add(threading.get_ident())
        self.overlapping += self._in_send
        self._in_send = True
        time.sleep(self.send_s)
        self.sent.append(delta)
        self._in_send = False
        if delta.finished:
            self.ended.set()

    def fail(self, error: Exception) -> None:
        self.sent.append(error)
        self.ended.set()

    def close(self) -> None:
        self.sent.append("closed")
        self.ended.set()

    def is_cancelled(self) -> bool:
        return self.cancelled


def test_the_writer_merges_what_comes_during_a_send_and_never_sends_one_stream_twice_at_once():
    writer = ResponseWriter(threads=4)
    slow, fast = SlowStream(send_s=0.2), SlowStream()
    slow_box, fast_box = writer.open(slow), writer.open(fast)
    started = time.monotonic()
    slow_box.push(Delta("a"))
    time.sleep(0.05)  # the first send is under way: the next ones wait and merge
    for piece in "bcd":
        slow_box.push(Delta(piece))
    slow_box.push(Delta("e", finish_reason="stop", usage=Usage(1, 5, 0)))
    fast_box.push(Delta("x", finish_reason="length", usage=Usage(1, 1, 0)))
    assert fast.ended.wait(5) and time.monotonic() - started < 0.15, "one slow stream does not hold up another"
    assert slow.ended.wait(5)
    assert [d.text for d in slow.sent] == ["a", "bcde"] and slow.sent[-1].usage == Usage(1, 5, 0)
    assert slow.overlapping == 0
    slow_box.push(Delta("late"))  # nothing after the end
    time.sleep(0.05)
    assert len(slow.sent) == 2 and writer.open_streams == 0
    writer.shutdown()


def test_the_writer_without_threads_sends_before_push_returns_on_the_pushing_thread():
    writer = ResponseWriter(threads=0, cancel_poll_s=0.01)
    stream = SlowStream()
    box = writer.open(stream)
    box.push(Delta("a"))
    assert [d.text for d in stream.sent] == ["a"] and stream.senders == {threading.get_ident()}
    box.push(Delta("b", finish_reason="stop", usage=Usage(1, 2, 0)))
    assert stream.ended.is_set() and writer.open_streams == 0
    box.push(Delta("late"))  # nothing after the end
    assert [d.text for d in stream.sent] == ["a", "b"]
    # The watch for clients that have gone runs as with sender threads.
    gone, calls = SlowStream(), []
    gone_box = writer.open(gone)
    gone_box.on_cancel(lambda: calls.append("cancelled"))
    gone.cancelled = True
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls == ["cancelled"]
    gone_box.close()
    assert gone.sent == ["closed"]
    writer.shutdown()


def test_the_writer_tells_once_that_a_client_has_gone_and_ends_streams_as_told():
    writer = ResponseWriter(threads=2, cancel_poll_s=0.01)
    gone, failing = SlowStream(), SlowStream()
    calls = []
    box = writer.open(gone)
    box.on_cancel(lambda: calls.append("cancelled"))
    box.push(Delta("partial"))
    gone.cancelled = True
    time.sleep(0.1)
    assert calls == ["cancelled"]
    # A client gone before whoever runs its request has said how to cancel it: told as soon as it says so.
    early = SlowStream()
    early.cancelled = True
    early_box = writer.open(early)
    time.sleep(0.1)
    early_box.on_cancel(lambda: calls.append("cancelled early"))
    assert calls == ["cancelled", "cancelled early"]
    early_box.close()
    box.close()
    assert gone.ended.wait(5) and gone.sent[-1] == "closed"
    error = InvalidRequest("bad")
    writer.open(failing).fail(error)
    assert failing.ended.wait(5) and failing.sent == [error]
    writer.shutdown()


@pytest.fixture(scope="module")
def service(tiny_checkpoint, onnx_path):  # noqa: F811
    """The service on vLLM, its vision models in-process."""
    from vlmserve.engine.vllm_engine import START_METHOD_ENV
    from vlmserve.service import VlmService

    models = FakeModels(tiny_checkpoint, onnx_path)
    # Niceness 0: the service lowers the priority of the process it runs in, here pytest's, and every server a
    # later test starts would inherit it.
    settings = VlmSettings(checkpoint_dir=str(tiny_checkpoint), served_model_name="tiny", vit_max_patches=4096,
                           frontend_niceness=0)
    config = EngineConfig(str(tiny_checkpoint), {"enforce_eager": True, "dtype": "float32",
                                                 "kv_cache_memory_bytes": 128 * 2**20, "max_model_len": 2048})
    # Spawned engine processes: pytest's process holds the threads of every earlier test, and a fork taken while
    # one of them holds a lock can leave the engine core waiting on it for good (seen once in CI); the `vlm` stub
    # forks them from a process that is only starting.
    with pytest.MonkeyPatch.context() as env:
        env.setenv(START_METHOD_ENV, "spawn")
        running = VlmService(settings, models.settings.parameters(), config, models.infer)
    yield running
    running.shutdown()


def serve(service, body: str, media: list[bytes] = (), stream: SlowStream | None = None) -> SlowStream:
    stream = stream or SlowStream()
    service.submit(body.encode(), list(media), stream)
    assert stream.ended.wait(120)
    return stream


def test_an_image_chat_matches_transformers_without_triton(service, tiny_checkpoint):
    image = png_bytes(84, 56, seed=11)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    stream = serve(service, json.dumps({"messages": messages, "sampling": {"max_tokens": 12, "temperature": 0}}),
                   [image])
    text = "".join(d.text for d in stream.sent)
    reference, count = hf_generate(tiny_checkpoint, messages, [Image.open(io.BytesIO(image)).convert("RGB")],
                                   max_new_tokens=12)
    assert text == reference
    assert stream.sent[-1].usage.completion_tokens == count and stream.sent[-1].finish_reason in ("stop", "length")


def test_stop_strings_and_bad_requests_without_triton(service):
    whole = serve(service, json.dumps({"prompt": "Once upon a time",
                                       "sampling": {"max_tokens": 40, "temperature": 0, "ignore_eos": True}}))
    text = "".join(d.text for d in whole.sent)
    stop = text[10:12]
    cut = serve(service, json.dumps({"prompt": "Once upon a time",
                                     "sampling": {"max_tokens": 40, "temperature": 0, "ignore_eos": True,
                                                  "stop": [stop]}}))
    assert "".join(d.text for d in cut.sent) == text[:text.index(stop)] and cut.sent[-1].finish_reason == "stop"
    for body, message in [("{", "not valid JSON"), ('{"prompt": "x", "sampling": {"top_q": 1}}', "top_q"),
                          (json.dumps({"prompt": "x" * 5000}), "maximum context length"),
                          (json.dumps({"prompt": "x", "sampling": {"temperature": -1}}), "temperature")]:
        failed = serve(service, body)
        assert isinstance(failed.sent[-1], InvalidRequest) and message in str(failed.sent[-1]), (body, failed.sent)


def test_a_client_that_goes_away_aborts_its_request_in_the_engine(service):
    stream = SlowStream()
    service.submit(json.dumps({"prompt": "Tell me everything", "sampling": {"max_tokens": 1500, "ignore_eos": True}})
                   .encode(), [], stream)
    deadline = time.monotonic() + 60
    while not stream.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    stream.cancelled = True
    assert stream.ended.wait(10) and stream.sent[-1] == "closed"
    assert not any(isinstance(d, Delta) and d.finished for d in stream.sent)
    while (service.active_requests or service.engine.stats.num_running) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.active_requests == 0 and service.engine.stats.num_running == 0


def test_the_prefix_cache_matches_media_by_their_content_keys(service, tiny_checkpoint):
    """Each medium's content key goes to vLLM as its multimodal UUID: the prefix cache matches media by it rather
    than by their embedding rows, which a GPU ViT need not reproduce bit for bit."""
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    grid = np.asarray([1, 32, 32])  # 256 image tokens: two full KV blocks of vLLM's 128 on CPU
    pads = int(grid.prod()) // config.vision_config.spatial_merge_size**2
    prompt = np.asarray([11, 12, 13] + [config.image_token_id] * pads + [14, 15], dtype=np.int64)
    rows = np.random.default_rng(0).standard_normal((2, pads, config.text_config.hidden_size)).astype(np.float32)

    def cached_tokens(embeds: np.ndarray, key: str) -> int:
        async def first_output():
            request = EngineRequest(prompt, {"max_tokens": 1}, [MediaInput("image", key, grid, embeds)])
            outputs = [output async for output in service.engine.generate(request, uuid.uuid4().hex)]
            return outputs[0].num_cached_tokens

        return service.run_on_loop(first_output())

    key = uuid.uuid4().hex
    assert cached_tokens(rows[0], key) == 0
    assert cached_tokens(rows[1], key) == 256  # other rows, same key: every full block is reused
    assert cached_tokens(rows[0], uuid.uuid4().hex) == 0  # the first rows under a new key: nothing
