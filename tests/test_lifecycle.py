"""Without Triton: what the proxy answers while a model is down, and how a deployment finds and removes
what it started (processes that left its process group and tree, shm regions)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from client.triton_vlm import TritonError, UnavailableError, _error
from tests.proxy_helpers import MODEL, FakeTriton, assert_openai_error, client_with, user
from launcher.lifecycle import SHM_DIR, Deployment, descendants, mapped_shm, parent_pids


@pytest.mark.parametrize("message", [
    "internal error: RuntimeError: vit: Stub process 'vit_0_0' is not healthy.",
    "vit: Model vit - Error when running inference: Failed for execute the inference request. "
    "Model 'vit' is not ready.",
    "Request for unknown model: 'vlm' is not found",
])
def test_triton_words_for_a_model_being_down_are_unavailable(message):
    assert isinstance(_error(message), UnavailableError)


def test_a_part_the_model_misses_is_unavailable_and_named_to_the_client():
    error = _error("internal error: unavailable: no ViT server can encode images or videos now")
    assert isinstance(error, UnavailableError) and error.reason == "no ViT server can encode images or videos now"
    with client_with(FakeTriton([], error)) as http:
        response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": [user("hi")]})
    assert_openai_error(response, 503, "no ViT server can encode images or videos now; retry the request")


def test_other_triton_errors_stay_internal():
    error = _error("internal error: ValueError: bad tensor")
    assert isinstance(error, TritonError) and not isinstance(error, UnavailableError)


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_being_down_is_a_503_with_retry_after(stream):
    fake = FakeTriton([], UnavailableError("Stub process 'vlm_0_0' is not healthy."))
    with client_with(fake) as http:
        response = http.post("/v1/chat/completions", json={"model": MODEL, "stream": stream, "messages": [user("hi")]})
    assert_openai_error(response, 503, "retry")
    assert response.headers["retry-after"] == "5"


# A child that starts a grandchild in a session of its own, then exits: the grandchild is orphaned and has
# left the group, as a process that calls setsid() after its parent died would have.
_ESCAPE = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
"""


def test_remove_all_finds_tagged_processes_outside_the_tree_and_removes_regions(tmp_path):
    deployment = Deployment.of(tmp_path)
    other = Deployment.of(tmp_path / "other")
    env = deployment.environment(dict(os.environ))
    subprocess.run([sys.executable, "-c", _ESCAPE], env=env, check=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                               env=other.environment(dict(os.environ)))
    region = SHM_DIR / f"{deployment.shm_prefix}{uuid.uuid4()}"
    region.write_bytes(b"x")
    try:
        deadline = time.monotonic() + 10
        while not deployment.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        (escaped,) = deployment.pids()
        assert escaped not in descendants(os.getpid(), parent_pids())
        deployment.remove_all()
        assert not deployment.pids() and not region.exists()
        assert sleeper.poll() is None, "another deployment's process was killed"
    finally:
        sleeper.kill()
        region.unlink(missing_ok=True)


# Maps a file in /dev/shm with no prefix of ours, as vLLM's message queues are.
_MAPPER = """
import mmap, sys, time
with open(sys.argv[1], "w+b") as f:
    f.truncate(4096)
    region = mmap.mmap(f.fileno(), 4096)
print("mapped", flush=True)
time.sleep(120)
"""


def test_remove_all_removes_the_shm_files_the_deployments_processes_mapped(tmp_path):
    deployment = Deployment.of(tmp_path)
    other = Deployment.of(tmp_path / "other")
    ours, theirs = (SHM_DIR / f"lifecycle-test-{uuid.uuid4()}" for _ in range(2))
    mappers = [subprocess.Popen([sys.executable, "-c", _MAPPER, str(path)], stdout=subprocess.PIPE,
                                env=owner.environment(dict(os.environ)))
               for owner, path in ((deployment, ours), (other, theirs))]
    try:
        assert all(mapper.stdout.readline() == b"mapped\n" for mapper in mappers)
        assert mapped_shm([mappers[0].pid]) == {ours}
        deployment.remove_all()
        assert not ours.exists()
        assert theirs.exists() and mappers[1].poll() is None, "another deployment's file was removed"
    finally:
        for mapper in mappers:
            mapper.kill()
            mapper.wait()
        ours.unlink(missing_ok=True)
        theirs.unlink(missing_ok=True)


def test_kill_orphans_keeps_what_is_below_the_roots(tmp_path):
    deployment = Deployment.of(tmp_path)
    env = deployment.environment(dict(os.environ))
    kept = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    subprocess.run([sys.executable, "-c", _ESCAPE], env=env, check=True)
    try:
        deadline = time.monotonic() + 10
        while len(deployment.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        killed = deployment.kill_orphans([kept.pid])
        assert len(killed) == 1 and kept.pid not in killed
        assert deployment.pids() == {kept.pid}
    finally:
        kept.kill()
