"""The benchmarks' data side, no server: the InternVL JSONL format, synthetic data, sampling, history, workloads."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from PIL import Image

from perf import sessions
from perf.dataset_bench import WORKLOADS, assign, to_session
from perf.internvl_data import Conversation, Round, load_jsonl, parse_conversation, user_contents, write_jsonl
from perf.perf_analyzer_inputs import serialized_bytes_tensor
from perf.sessions import run_session, ttft_by_round
from perf.stats import RequestRecord
from perf.stream_client import Target, video_fps
from perf.synthetic_data import MULTI_IMAGE, MULTI_ROUND, synthesize
from perf.workloads import (
    HD_SIZE,
    MULTI_ROUND_TURNS,
    PATCH_SIDE,
    VIDEO_FPS,
    VIDEO_FRAMES,
    VIDEO_SIZE,
    VIDEO_SOURCE_FPS,
    Sizes,
    draw_warmup,
    draw_workloads,
    sweep_points,
)
from vlmserve.media.decode import FPS_MAX_FRAMES, FPS_MIN_FRAMES, sample_indices


def url(path: str) -> str:
    return f"http://media/{path}"


def test_single_image_multi_round_record():
    record = {"id": 7, "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A bus."},
        {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Red."}]}
    conversation = parse_conversation(record)
    assert conversation == Conversation("7", ("coco/1.jpg",), (Round("<image>\nWhat is this?", "A bus."),
                                                               Round("What color?", "Red.")))
    assert user_contents(conversation, url) == [
        [{"type": "image_url", "image_url": {"url": "http://media/coco/1.jpg"}},
         {"type": "text", "text": "What is this?"}],
        [{"type": "text", "text": "What color?"}],
    ]


def test_multi_image_tags_take_images_in_order():
    conversation = parse_conversation({"id": "m", "image": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nSame?"}, {"from": "gpt", "value": "No."}]})
    assert user_contents(conversation, url) == [[
        {"type": "text", "text": "Image-1: "}, {"type": "image_url", "image_url": {"url": "http://media/a.jpg"}},
        {"type": "text", "text": "Image-2: "}, {"type": "image_url", "image_url": {"url": "http://media/b.jpg"}},
        {"type": "text", "text": "Same?"}]]


def test_untagged_images_open_the_first_turn_and_text_only_records_load():
    untagged = parse_conversation({"image": "x.jpg", "conversations": [
        {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Ok."}]})
    assert user_contents(untagged, url)[0][0] == {"type": "image_url", "image_url": {"url": "http://media/x.jpg"}}
    text_only = parse_conversation({"id": 1, "conversations": [{"from": "human", "value": "Hi"},
                                                               {"from": "gpt", "value": "Hello"}]})
    assert text_only.images == () and user_contents(text_only, url) == [[{"type": "text", "text": "Hi"}]]


@pytest.mark.parametrize("record", [
    {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": ""}]},
    {"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
    {"conversations": [{"from": "human", "value": "x"}]},
])
def test_malformed_records_are_refused(record):
    with pytest.raises(ValueError):
        parse_conversation(record)


def test_synthetic_data_has_the_three_shapes_and_round_trips(tmp_path):
    jsonl = synthesize(tmp_path, per_shape=4, seed=3)
    conversations = list(load_jsonl(jsonl))
    assert len(conversations) == 12
    singles = [c for c in conversations if len(c.images) == 1 and len(c.rounds) == 1]
    rounds = [c for c in conversations if len(c.rounds) > 1]
    multis = [c for c in conversations if len(c.images) > 1]
    assert len(singles) == len(rounds) == len(multis) == 4
    assert all(MULTI_ROUND[0] <= len(c.rounds) <= MULTI_ROUND[1] and len(c.images) == 1 for c in rounds)
    assert all(MULTI_IMAGE[0] <= len(c.images) <= MULTI_IMAGE[1] and len(c.rounds) == 1 for c in multis)
    for c in conversations:
        for path in c.images:
            with Image.open(tmp_path / path) as image:
                assert 224 <= min(image.size) and max(image.size) <= 640
        parts = [p for content in user_contents(c, url) for p in content if p["type"] == "image_url"]
        assert len(parts) == len(c.images)
    write_jsonl(tmp_path / "again.jsonl", conversations)
    assert list(load_jsonl(tmp_path / "again.jsonl")) == conversations
    assert (tmp_path / "again.jsonl").read_text() == jsonl.read_text()
    assert synthesize(tmp_path / "b", per_shape=4, seed=3).read_text() == jsonl.read_text()  # seeded


def test_assign_draws_disjoint_samples_per_workload(tmp_path):
    conversations = list(load_jsonl(synthesize(tmp_path, per_shape=6)))
    order = [WORKLOADS[w] for w in ("multi-round", "multi-image", "single-image")]
    plan = assign(conversations, order, count=3)
    drawn = [c.id for sample in plan.values() for c in sample]
    assert len(drawn) == len(set(drawn)) == 9
    for workload in order:
        assert len(plan[workload.name]) == 3 and all(workload.accepts(c) for c in plan[workload.name])
    assert assign(conversations, order, count=3) == plan  # every server gets the same draw


def test_multi_round_history(monkeypatch):
    conversation = Conversation("c", ("a.jpg",), (Round("<image>\nQ1", "A1"), Round("Q2", "A2"), Round("Q3", "A3")))
    sent = []

    def fake_stream_chat(client, target, messages, max_tokens):
        sent.append(json.loads(json.dumps(messages)))  # a copy: the runner extends the list afterwards
        return RequestRecord(0.1 * len(sent), 0.5, 4), f"model answer {len(sent)}"

    monkeypatch.setattr(sessions, "stream_chat", fake_stream_chat)
    target = Target("t", "http://x/v1", "m")
    session = to_session(conversation, WORKLOADS["multi-round"], url)
    turns = run_session(None, target, session, 8, history="dataset")
    assert [t.round for t in turns] == [0, 1, 2]
    assert [t.text for t in turns] == ["model answer 1", "model answer 2", "model answer 3"]
    assert [m["content"] for m in sent[2] if m["role"] == "assistant"] == ["A1", "A2"]
    assert [m["role"] for m in sent[2]] == ["user", "assistant", "user", "assistant", "user"]
    assert ttft_by_round(turns) == pytest.approx({0: 0.1, 1: 0.2, 2: 0.3})

    sent.clear()
    run_session(None, target, session, 8, history="model")
    assert [m["content"] for m in sent[2] if m["role"] == "assistant"] == ["model answer 1", "model answer 2"]

    sent.clear()
    turns = run_session(None, target, to_session(conversation, WORKLOADS["single-image"], url), 8)
    assert len(turns) == 1 and len(sent[0]) == 1  # single-image workloads send the first round only


def media_parts(session: sessions.Session) -> list[dict]:
    return [p for content in session.user_turns for p in content if p["type"] != "text"]


def local_path(root, part: dict):
    media = part.get("image_url") or part["video_url"]
    return root / media["url"].removeprefix("http://media/")


def test_workloads_draw_new_media_per_seed(tmp_path):
    sizes = Sizes(reference_requests=3, two_image_requests=2, multi_round_conversations=2, hd_requests=1,
                  video_requests=1, sweep=(1, 4), sweep_min_requests=2)
    workloads = {w.name: w for w in draw_workloads(tmp_path, url, 7, sizes)}
    assert list(workloads) == ["reference", "sweep c=1", "sweep c=4", "two-images", "multi-round", "1080p", "video"]
    assert [w.workers for w in sweep_points(workloads.values())] == [1, 4, 10]
    assert [len(w.sessions) for w in workloads.values()] == [3, 2, 8, 2, 2, 1, 1]
    pair = {json.dumps(media_parts(s)) for name in ("reference", "sweep c=1", "sweep c=4")
            for s in workloads[name].sessions}
    assert len(pair) == 1  # the reference workload and its sweep repeat one pair of images
    for session in workloads["multi-round"].sessions:  # a new image every turn, the dataset's answers between
        assert len(session.user_turns) == MULTI_ROUND_TURNS and len(session.answers) == MULTI_ROUND_TURNS - 1
        assert all(len(media_parts(sessions.Session("", (turn,)))) == 1 for turn in session.user_turns)
    (video,) = media_parts(workloads["video"].sessions[0])
    assert video["video_url"]["fps"] == VIDEO_FPS == video_fps([{"role": "user", "content": [video]}])
    paths = [local_path(tmp_path, p) for w in workloads.values() for s in w.sessions for p in media_parts(s)]
    images = sorted({p for p in paths if p.suffix == ".jpg"})
    assert len(images) == 2 + 2 * 2 + 2 * MULTI_ROUND_TURNS + 1
    for path in images:
        with Image.open(path) as image:
            assert image.size == HD_SIZE or all(side % PATCH_SIDE == 0 for side in image.size), image.size
    warmup = [local_path(tmp_path, p) for s in draw_warmup(tmp_path, url, 7) for p in media_parts(s)]
    assert not set(warmup) & set(paths)
    again = tmp_path / "again"
    redrawn = {w.name: w for w in draw_workloads(again, url, 7, sizes)}
    assert redrawn["two-images"].sessions == workloads["two-images"].sessions  # seeded ...
    first = local_path(tmp_path, media_parts(workloads["two-images"].sessions[0])[0])
    assert local_path(again, media_parts(redrawn["two-images"].sessions[0])[0]).read_bytes() == first.read_bytes()
    other = draw_workloads(tmp_path / "other", url, 8, sizes)[3]  # ... and new for another seed
    assert local_path(tmp_path / "other", media_parts(other.sessions[0])[0]).read_bytes() != first.read_bytes()


def test_the_video_workload_gives_both_servers_the_same_frames():
    from vllm.multimodal.video import Qwen2VLVideoBackend, VideoSourceMetadata, VideoTargetMetadata

    ours = sample_indices(VIDEO_FRAMES, VIDEO_SOURCE_FPS, VIDEO_FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES).tolist()
    source = VideoSourceMetadata(VIDEO_FRAMES, VIDEO_SOURCE_FPS, VIDEO_FRAMES / VIDEO_SOURCE_FPS)
    vllm = Qwen2VLVideoBackend.compute_frames_index_to_sample(source, VideoTargetMetadata(-1, VIDEO_FPS, 300))
    assert ours == vllm and len(ours) == 8
    assert all(side % PATCH_SIDE == 0 for side in VIDEO_SIZE)


def test_perf_analyzer_bytes_input_is_a_serialized_tensor():
    decoded = base64.b64decode(serialized_bytes_tensor(b"\x89PNG..."))
    assert struct.unpack("<I", decoded[:4]) == (7,) and decoded[4:] == b"\x89PNG..."
