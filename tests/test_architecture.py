"""The shape of the tree: which package may import which, and where inter-model tensors are named."""

from __future__ import annotations

import ast
from pathlib import Path

from vlmserve import contracts

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vlmserve", "launcher", "export", "client", "openai_proxy", "model_repository", "perf")


def _package_of(path: Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _sources(*packages: str) -> list[Path]:
    return [path for package in packages for path in sorted((ROOT / package).rglob("*.py"))]


def import_graph() -> dict[str, set[str]]:
    """Top-level package -> the other top-level packages its modules import."""
    graph: dict[str, set[str]] = {package: set() for package in PACKAGES}
    for path in _sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                target = name.split(".")[0]
                if target in graph and target != _package_of(path):
                    graph[_package_of(path)].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between packages, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [node])):
                return cycle
        state[node] = "done"
        return None

    for node in graph:
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_no_import_cycle_between_packages():
    graph = import_graph()
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
    # What runs inside the models depends on nothing that launches or exports them, nor on the proxy.
    assert graph["vlmserve"] <= set(), graph["vlmserve"]
    assert graph["model_repository"] <= {"vlmserve"}, graph["model_repository"]


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


# The same word with another meaning: the HF image processor's output key.
NOT_OUR_TENSORS = {"vlmserve/media/preprocessing.py": {"pixel_values"}}


def test_each_inter_model_tensor_and_model_is_named_in_the_contracts_module_only():
    models = (contracts.PREPROCESS, contracts.VIT, contracts.VIT_CACHE, contracts.VLM, contracts.ENCODE)
    names = {spec.name for model in models for spec in (*model.inputs, *model.outputs)}
    names |= {model.NAME for model in models} - {"vit_cache"}  # also the vlm model's parameter of that name
    assert len(names) > 20
    elsewhere = {}
    for path in _sources(*PACKAGES):
        relative = str(path.relative_to(ROOT))
        if path == Path(contracts.__file__).resolve():
            continue
        literals = {node.value for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.Constant) and isinstance(node.value, str)}
        if found := (literals & names) - NOT_OUR_TENSORS.get(relative, set()):
            elsewhere[relative] = sorted(found)
    assert not elsewhere, f"tensor or model names spelled outside vlmserve/contracts.py: {elsewhere}"


def test_no_model_relays_another_s_stream():
    """A generated token crosses one model: the one clients call, which owns the engine. Models call each
    other only for one answer each (a decoupled BLS call would stream one model's responses through another)."""
    for path in _sources("vlmserve", "model_repository"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("exec", "async_exec"):
                decoupled = [k for k in node.keywords if k.arg == "decoupled"]
                assert not any(isinstance(k.value, ast.Constant) and k.value.value for k in decoupled), path
    assert sorted(p.name for p in (ROOT / "model_repository").iterdir() if p.is_dir()) == \
        ["encode", "preprocess", "vit", "vit_cache", "vlm"]
