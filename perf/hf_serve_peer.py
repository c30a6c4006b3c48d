"""`transformers serve` for a Qwen2-VL checkpoint on a host without torchvision: the peer of perf.run_all.

    python -m perf.hf_serve_peer CHECKPOINT --host 127.0.0.1 --port 8100 --device cpu --continuous-batching

Everything after the module name goes to `transformers serve` as it is. One thing is replaced:
`transformers serve` loads `AutoProcessor`, whose Qwen2-VL video processor needs torchvision, and
the only torchvision built for torch 2.13 on the package index is a CUDA build that does not import
next to the CPU torch. So the processor here is Qwen2VLProcessor without its video part, built from
the checkpoint's tokenizer and transformers' own PIL image processor (the class our stack's
preprocessing uses too, so both servers feed the model the same pixels). Model loading, the chat
template, request handling, generation and streaming are `transformers serve`'s own code. Video
requests fail here; the benchmark sends none.
"""

from __future__ import annotations

import sys

from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.cli.serving.model_manager import ModelManager
from transformers.cli.transformers import main as transformers_cli
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor with no video processor (the processor's attributes come from this signature)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def _load_image_only_processor(self: ModelManager, model_id_and_revision: str,
                               gguf_file: str | None = None) -> ImageOnlyQwen2VLProcessor:
    checkpoint = model_id_and_revision.split("@", 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil.from_pretrained(checkpoint), tokenizer,
                                     chat_template=tokenizer.chat_template)


def main(argv: list[str] | None = None) -> int:
    ModelManager._load_processor = _load_image_only_processor
    sys.argv = ["transformers", "serve", *(sys.argv[1:] if argv is None else argv)]
    return transformers_cli()


if __name__ == "__main__":
    sys.exit(main())
