"""Export the Qwen2-VL vision tower to ONNX with a dynamic patch dimension.

A plain trace of ``model.model.visual`` bakes the example's ``grid_thw`` into
the graph (position ids and per-image attention splits are computed in Python).
``VisionTowerForExport`` instead takes everything that depends on ``grid_thw``
as tensor inputs (see ``vlmserve.vit.inputs``) and keeps the frames of a
call apart by ``segment_ids``, in one of two ways (``--attention``):

- ``segments`` (default, ONNX Runtime): each block runs an ONNX ``Loop`` over
  the call's segments, one unmasked ``com.microsoft.MultiHeadAttention`` per
  segment. Without a mask ONNX Runtime's CPU kernel is memory-efficient (it
  never holds a segment's [heads, S, S] scores), so memory is linear in the
  patches and time is quadratic only within each frame, not over the call.
- ``masked`` (TensorRT): plain MatMul/Softmax/MatMul over the whole call with a
  block-diagonal mask built from ``segment_ids``. TensorRT parses neither
  ``com.microsoft`` ops nor loops whose body shapes change per iteration; this
  graph materializes [heads, N, N] scores per call (bounded on GPU by the
  packing budget and the engine profile).

Both graphs have the same inputs and output.

CLI: ``python -m export.vision_onnx CHECKPOINT_DIR OUT.onnx [--attention segments|masked]``
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn
from safetensors import safe_open
from transformers import Qwen2VLConfig
from transformers.initialization import no_init_weights
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)

from vlmserve.contracts import VIT
from vlmserve.vit.inputs import vit_inputs

# The `vit` model's tensors: Triton binds the TensorRT plan's inputs and output by these names.
INPUT_NAMES = tuple(spec.name for spec in VIT.inputs)
OUTPUT_NAME = VIT.IMAGE_EMBEDS.name
ATTENTION_MODES = ("segments", "masked")
# Domain of the placeholder node the trace emits for per-segment attention; replaced before saving.
_PLACEHOLDER_DOMAIN = "vlmserve"


def _qkv_with_rotary(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF ``VisionAttention``'s q, k, v [N, heads, head_dim], rotary applied to q and k."""
    n = hidden.shape[0]
    q, k, v = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    return q, k, v


def _masked_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """HF ``VisionAttention`` over all patches at once, ``allowed`` [N, N] masking other frames."""
    n = hidden.shape[0]
    q, k, v = (x.transpose(0, 1) for x in _qkv_with_rotary(attn, hidden, cos, sin))  # [heads, N, head_dim]
    scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
    # -inf rather than a large negative constant: it exists in fp16/bf16, so a
    # TensorRT half-precision build keeps the mask exact. Each row keeps at
    # least its own patch, so softmax never sees an all -inf row.
    scores = torch.where(allowed, scores, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
    return attn.proj(out)


def segment_bounds(segment_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) rows of each run of equal ids; ``vlmserve.vit.packing`` numbers segments in row order."""
    starts = (torch.nonzero(segment_ids[1:] != segment_ids[:-1]).flatten() + 1).tolist()
    edges = [0, *starts, segment_ids.shape[0]]
    return list(zip(edges[:-1], edges[1:]))


class _SegmentAttention(torch.autograd.Function):
    """Attention within each segment of q, k, v [N, hidden] (rotary applied), scaled by head_dim**-0.5.

    The trace records only the placeholder node of ``symbolic``; ``_lower_segment_attention``
    turns it into a Loop of unmasked MultiHeadAttention. ``forward`` gives the trace its values.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_ids: torch.Tensor,
                num_heads: int) -> torch.Tensor:
        out = torch.empty_like(q)
        with warnings.catch_warnings():
            # The trace keeps only symbolic's node, so these Python-side bounds are not baked into it.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            bounds = segment_bounds(segment_ids)
        for start, stop in bounds:
            q_s, k_s, v_s = (x[start:stop].reshape(stop - start, num_heads, -1).transpose(0, 1) for x in (q, k, v))
            attended = nn.functional.scaled_dot_product_attention(q_s, k_s, v_s)
            out[start:stop] = attended.transpose(0, 1).reshape(stop - start, -1)
        return out

    @staticmethod
    def symbolic(g, q, k, v, segment_ids, num_heads: int):
        return g.op(f"{_PLACEHOLDER_DOMAIN}::SegmentAttention", q, k, v, segment_ids,
                    num_heads_i=num_heads).setType(q.type())


def _segment_attention(
    attn: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segment_ids: torch.Tensor
) -> torch.Tensor:
    """HF ``VisionAttention`` with one attention per segment, as its own per-``cu_seqlens`` split does."""
    n = hidden.shape[0]
    q, k, v = (x.reshape(n, -1) for x in _qkv_with_rotary(attn, hidden, cos, sin))
    return attn.proj(_SegmentAttention.apply(q, k, v, segment_ids, attn.num_heads))


class VisionTowerForExport(nn.Module):
    """Graph-friendly forward of a Qwen2-VL vision tower, sharing its weights.

    forward(pixel_values [N, C*T*P*P] float, position_ids [N, 2] int64,
    segment_ids [N] int64) -> image_embeds [N / merge**2, hidden_size].
    ``attention`` is one of ATTENTION_MODES (see the module docstring).
    """

    def __init__(self, visual: nn.Module, attention: str = "segments") -> None:
        super().__init__()
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        self.visual = visual
        self.attention = attention

    def _embed_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The Conv3d's kernel equals its stride and the whole patch, so it is a
        # GEMM on the flattened (C, T, P, P) patch: export one Gemm instead of a
        # 5-D reshape + Conv3d.
        proj = self.visual.patch_embed.proj
        weight = proj.weight.reshape(proj.weight.shape[0], -1)
        return nn.functional.linear(pixel_values.to(weight.dtype), weight)

    def forward(
        self, pixel_values: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor
    ) -> torch.Tensor:
        visual = self.visual
        hidden = self._embed_patches(pixel_values)
        cos, sin = visual.rotary_pos_emb(hidden, position_ids)
        if self.attention == "masked":
            allowed = segment_ids[:, None] == segment_ids[None, :]
        for block in visual.blocks:
            normed = block.norm1(hidden)
            if self.attention == "masked":
                hidden = hidden + _masked_attention(block.attn, normed, cos, sin, allowed)
            else:
                hidden = hidden + _segment_attention(block.attn, normed, cos, sin, segment_ids)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)],
                                                                             values))


def _cu_seqlens_nodes(segment_ids: str, prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing [0, segment starts..., N] (int64) from the sorted ``segment_ids``, and its name."""
    p = prefix
    nodes = [
        _const(f"{p}zero", [0]), _const(f"{p}one", [1]), _const(f"{p}minus_one", [-1]),
        _const(f"{p}int_max", [2**63 - 1]),
        helper.make_node("Shape", [segment_ids], [f"{p}n"]),
        helper.make_node("Slice", [segment_ids, f"{p}one", f"{p}int_max"], [f"{p}next"]),
        helper.make_node("Slice", [segment_ids, f"{p}zero", f"{p}minus_one"], [f"{p}prev"]),
        helper.make_node("Equal", [f"{p}next", f"{p}prev"], [f"{p}same"]),
        helper.make_node("Not", [f"{p}same"], [f"{p}changes"]),
        helper.make_node("NonZero", [f"{p}changes"], [f"{p}change_at"]),
        helper.make_node("Reshape", [f"{p}change_at", f"{p}minus_one"], [f"{p}change_flat"]),
        helper.make_node("Add", [f"{p}change_flat", f"{p}one"], [f"{p}starts"]),
        helper.make_node("Concat", [f"{p}zero", f"{p}starts", f"{p}n"], [f"{p}cu_seqlens"], axis=0),
    ]
    return nodes, f"{p}cu_seqlens"


def _segment_loop_nodes(node: onnx.NodeProto, cu_seqlens: str, trips: str, prefix: str) -> list[onnx.NodeProto]:
    """``node`` (the placeholder) as a Loop over segments of unmasked MultiHeadAttention, concatenated."""
    q, k, v = node.input[:3]
    num_heads = next(a.i for a in node.attribute if a.name == "num_heads")
    p = prefix
    body_nodes = [
        _const(f"{p}b_one", [1]), _const(f"{p}b_axis0", [0]),
        helper.make_node("Unsqueeze", [f"{p}i", f"{p}b_axis0"], [f"{p}i1"]),
        helper.make_node("Add", [f"{p}i1", f"{p}b_one"], [f"{p}i2"]),
        helper.make_node("Gather", [cu_seqlens, f"{p}i1"], [f"{p}start"]),
        helper.make_node("Gather", [cu_seqlens, f"{p}i2"], [f"{p}stop"]),
    ]
    sliced = []
    for x in (q, k, v):
        body_nodes += [
            helper.make_node("Slice", [x, f"{p}start", f"{p}stop", f"{p}b_axis0"], [f"{p}{x}_seg"]),
            helper.make_node("Unsqueeze", [f"{p}{x}_seg", f"{p}b_axis0"], [f"{p}{x}_seg3"]),
        ]
        sliced.append(f"{p}{x}_seg3")
    body_nodes += [
        # Default scale 1/sqrt(head_dim), as HF's VisionAttention.scaling.
        helper.make_node("MultiHeadAttention", sliced, [f"{p}attended3"], domain="com.microsoft",
                         num_heads=num_heads),
        helper.make_node("Squeeze", [f"{p}attended3", f"{p}b_axis0"], [f"{p}attended"]),
        helper.make_node("SequenceInsert", [f"{p}acc_in", f"{p}attended"], [f"{p}acc_out"]),
        helper.make_node("Identity", [f"{p}cond_in"], [f"{p}cond_out"]),
    ]
    float_seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, None))
    body = helper.make_graph(
        body_nodes, f"{p}body",
        [helper.make_tensor_value_info(f"{p}i", TensorProto.INT64, []),
         helper.make_tensor_value_info(f"{p}cond_in", TensorProto.BOOL, []),
         helper.make_value_info(f"{p}acc_in", float_seq)],
        [helper.make_tensor_value_info(f"{p}cond_out", TensorProto.BOOL, []),
         helper.make_value_info(f"{p}acc_out", float_seq)],
    )
    return [
        helper.make_node("SequenceEmpty", [], [f"{p}acc0"], dtype=TensorProto.FLOAT),
        helper.make_node("Loop", [trips, "", f"{p}acc0"], [f"{p}acc"], body=body),
        helper.make_node("ConcatFromSequence", [f"{p}acc"], [node.output[0]], axis=0),
    ]


def _lower_segment_attention(model: onnx.ModelProto) -> None:
    """Replace the trace's SegmentAttention placeholders by Loops over segments (in place)."""
    graph = model.graph
    placeholders = [n for n in graph.node if n.domain == _PLACEHOLDER_DOMAIN]
    if not placeholders:
        return
    # Every block attends over the same segments: compute their bounds once.
    nodes, cu_seqlens = _cu_seqlens_nodes(placeholders[0].input[3], "segments/")
    nodes += [helper.make_node("Size", [cu_seqlens], ["segments/count_plus_one"]),
              _const("segments/one_scalar_1d", [1]),
              helper.make_node("Sub", ["segments/count_plus_one", "segments/one_scalar_1d"], ["segments/count_1d"]),
              helper.make_node("Squeeze", ["segments/count_1d"], ["segments/count"])]
    lowered: list[onnx.NodeProto] = []
    for index, node in enumerate(graph.node):
        if node.domain == _PLACEHOLDER_DOMAIN:
            lowered += _segment_loop_nodes(node, cu_seqlens, "segments/count", f"attention{index}/")
        else:
            lowered.append(node)
    # Topological order: the bounds need only a graph input, so they can go first.
    del graph.node[:]
    graph.node.extend(nodes + lowered)
    kept = [o for o in model.opset_import if o.domain not in (_PLACEHOLDER_DOMAIN, "com.microsoft")]
    del model.opset_import[:]
    model.opset_import.extend([*kept, helper.make_opsetid("com.microsoft", 1)])


def load_vision_tower(checkpoint_dir: str | Path) -> nn.Module:
    """The checkpoint's vision tower alone, fp32, eval mode (TensorRT picks the precision later).

    Reads only the ``visual`` tensors from the safetensors files, so exporting a 7B
    checkpoint does not load its 7B language model.
    """
    config = Qwen2VLConfig.from_pretrained(checkpoint_dir)
    with no_init_weights():  # every weight is loaded below; random init of 2B's tower takes ~30 s
        visual = Qwen2VisionTransformerPretrainedModel(config.vision_config)
    state = {}
    for file in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(file, framework="pt") as tensors:
            for key in tensors.keys():
                # Qwen2-VL checkpoints (and transformers 5's save_pretrained) use "visual.";
                # some re-saved ones use the in-memory module path "model.visual.".
                for prefix in ("model.visual.", "visual."):
                    if key.startswith(prefix):
                        state[key.removeprefix(prefix)] = tensors.get_tensor(key)
    if not state:
        raise FileNotFoundError(f"no vision tower weights in {checkpoint_dir}/*.safetensors")
    visual.load_state_dict(state, strict=True)
    return visual.float().eval()


def example_inputs(vision_config) -> tuple[torch.Tensor, ...]:
    """Two images of different sizes, so the trace sees a real multi-segment mask."""
    m = vision_config.spatial_merge_size
    grid = np.array([[1, 2 * m, 3 * m], [1, 3 * m, 2 * m]])
    row = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size**2
    pixels = np.random.default_rng(0).standard_normal((int(grid.prod(axis=1).sum()), row))
    inputs = vit_inputs(pixels, grid, m)
    return tuple(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer
    )


def _finish_model(tmp_path: Path, out_path: Path) -> None:
    """Lower the trace's placeholders (``_lower_segment_attention``) and write the model to ``out_path``.

    Past the 2 GiB protobuf limit (the 2B tower is ~2.7 GB in fp32) the exporter
    writes one external file per weight; regroup them into ``<name>.data``.
    """
    data_path = out_path.with_name(out_path.name + ".data")
    data_path.unlink(missing_ok=True)  # onnx appends to an existing data file
    model = onnx.load(str(tmp_path), load_external_data=False)
    _lower_segment_attention(model)
    if not _uses_external_data(model):
        onnx.save_model(model, str(out_path))
        return
    onnx.load_external_data_for_model(model, str(tmp_path.parent))
    onnx.save_model(
        model,
        str(out_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_path.name,
    )


def export_vision_onnx(
    checkpoint_dir: str | Path, out_path: str | Path, opset: int = 17, attention: str = "segments",
    report: Callable[[str], None] = lambda _: None,
) -> Path:
    """Export the checkpoint's vision tower to ``out_path`` and check it with onnx.checker.

    ``attention``: "segments" for ONNX Runtime, "masked" for TensorRT (see the module docstring).
    ``report`` hears of each step as it ends (a large tower takes minutes).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    visual = load_vision_tower(checkpoint_dir)
    report("vision tower: weights loaded")
    wrapper = VisionTowerForExport(visual, attention).eval()
    patches = {0: "num_patches"}
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp, torch.no_grad():
        tmp_path = Path(tmp) / out_path.name
        # TorchScript exporter: dynamic_axes handle the patch dimension, it
        # exports opset 17 directly and takes well under a second for the tiny
        # tower (the dynamo exporter also works but is ~20x slower here).
        torch.onnx.export(
            wrapper,
            example_inputs(visual.config),
            str(tmp_path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={**dict.fromkeys(INPUT_NAMES, patches), OUTPUT_NAME: {0: "num_tokens"}},
            custom_opsets={_PLACEHOLDER_DOMAIN: 1},
        )
        report("vision tower: traced to ONNX")
        _finish_model(tmp_path, out_path)
    # Path-based check: also valid for models stored with external data.
    onnx.checker.check_model(str(out_path), full_check=True)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("out_path", type=Path)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--attention", choices=ATTENTION_MODES, default="segments",
                        help="segments: ONNX Runtime (default); masked: TensorRT")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = export_vision_onnx(args.checkpoint_dir, args.out_path, args.opset, args.attention)
    print(f"wrote {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
