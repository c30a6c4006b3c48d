"""Export the Qwen2-VL vision tower to ONNX with a dynamic patch dimension.

A plain trace of ``model.model.visual`` bakes the example's ``grid_thw`` into
the graph (position ids and per-image attention splits are computed in Python).
``VisionTowerForExport`` instead takes everything that depends on ``grid_thw``
as tensor inputs (see ``vlmserve.vision_inputs``) and keeps images apart with a
block-diagonal attention mask built in the graph from ``segment_ids``.

CLI: ``python -m export.vision_onnx CHECKPOINT_DIR OUT.onnx``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from safetensors import safe_open
from transformers import Qwen2VLConfig
from transformers.initialization import no_init_weights
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    apply_rotary_pos_emb_vision,
)

from vlmserve.vision_inputs import vit_inputs

INPUT_NAMES = ("pixel_values", "position_ids", "segment_ids")
OUTPUT_NAME = "image_embeds"


def _masked_attention(
    attn: nn.Module,
    hidden: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """HF ``VisionAttention`` over all patches at once, ``allowed`` [N, N] masking other frames."""
    n = hidden.shape[0]
    q, k, v = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))  # [heads, N, head_dim]
    scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
    # -inf rather than a large negative constant: it exists in fp16/bf16, so a
    # TensorRT half-precision build keeps the mask exact. Each row keeps at
    # least its own patch, so softmax never sees an all -inf row.
    scores = torch.where(allowed, scores, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = torch.matmul(probs, v).transpose(0, 1).reshape(n, -1)
    return attn.proj(out)


class VisionTowerForExport(nn.Module):
    """Graph-friendly forward of a Qwen2-VL vision tower, sharing its weights.

    forward(pixel_values [N, C*T*P*P] float, position_ids [N, 2] int64,
    segment_ids [N] int64) -> image_embeds [N / merge**2, hidden_size].
    """

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

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
        allowed = segment_ids[:, None] == segment_ids[None, :]
        for block in visual.blocks:
            hidden = hidden + _masked_attention(block.attn, block.norm1(hidden), cos, sin, allowed)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return visual.merger(hidden)


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


def _move_model(tmp_path: Path, out_path: Path) -> None:
    """Move the exported model to ``out_path``.

    Past the 2 GiB protobuf limit (the 2B tower is ~2.7 GB in fp32) the exporter
    writes one external file per weight; regroup them into ``<name>.data``.
    """
    data_path = out_path.with_name(out_path.name + ".data")
    data_path.unlink(missing_ok=True)  # onnx appends to an existing data file
    model = onnx.load(str(tmp_path), load_external_data=False)
    if not _uses_external_data(model):
        shutil.move(tmp_path, out_path)
        return
    onnx.load_external_data_for_model(model, str(tmp_path.parent))
    onnx.save_model(
        model,
        str(out_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_path.name,
    )


def export_vision_onnx(checkpoint_dir: str | Path, out_path: str | Path, opset: int = 17) -> Path:
    """Export the checkpoint's vision tower to ``out_path`` and check it with onnx.checker."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    visual = load_vision_tower(checkpoint_dir)
    wrapper = VisionTowerForExport(visual).eval()
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
            dynamic_axes={
                "pixel_values": patches,
                "position_ids": patches,
                "segment_ids": patches,
                OUTPUT_NAME: {0: "num_tokens"},
            },
        )
        _move_model(tmp_path, out_path)
    # Path-based check: also valid for models stored with external data.
    onnx.checker.check_model(str(out_path), full_check=True)
    return out_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("out_path", type=Path)
    parser.add_argument("--opset", type=int, default=17)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = export_vision_onnx(args.checkpoint_dir, args.out_path, args.opset)
    print(f"wrote {path} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
