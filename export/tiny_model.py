"""Build a tiny, random-weight Qwen2-VL checkpoint for tests and local runs.

``python -m export.tiny_model OUT_DIR [--seed 0]`` writes a directory laid out like
Qwen2-VL-2B-Instruct (config, generation config, safetensors weights, Qwen2 byte-level BPE
tokenizer with the Qwen2-VL special tokens, the real chat template, image and video
preprocessor configs), small enough to build in seconds on a CPU and with no download.

The architecture is real (``Qwen2VLForConditionalGeneration``, M-RoPE, 2x2 patch merger), only
the sizes are tiny. The weights are random but shaped for testing a serving stack:

* ``lm_head`` is scaled up (x30) so logits are large (std ~5) and the top two are typically
  more than 0.5 apart: greedy picks are clear-cut and sampling is peaked. (A uniform scale does
  not change the gap relative to float noise; at float32 the gaps stay far above it, and greedy
  output is the same batched and unbatched.)
* the ``lm_head`` rows of special tokens other than the two EOS tokens are zeroed, so greedy
  decoding never emits ``<|image_pad|>`` and friends (which would break multi-turn prompts).

The build is deterministic for a given seed: same weight bytes, same tokenizer.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

import torch
import transformers
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

# In the order (and so with the relative ids) of the real Qwen2-VL tokenizer, appended after the BPE vocab.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
PAD_TOKEN = "<|endoftext|>"

# Qwen2-VL-7B/2B-Instruct chat template, verbatim.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

BPE_VOCAB_SIZE = 1500  # below what the corpus saturates at (~1800), so the size is exact
LM_HEAD_SCALE = 30.0  # init std 0.02 -> 0.6: logit std ~5, median top1-top2 gap ~0.9

TEXT_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,  # head_dim = 128 / 4 = 32, the smallest vLLM's CPU attention serves
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},  # sums to head_dim / 2
    "use_sliding_window": False,
    "max_window_layers": 2,
}
VISION_CONFIG = {
    "depth": 2,
    "embed_dim": 32,
    "num_heads": 2,
    "mlp_ratio": 2,
    "hidden_size": 128,  # merger output = text hidden_size
    "hidden_act": "quick_gelu",
    "in_channels": 3,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "spatial_merge_size": 2,
}
# Qwen2-VL-2B-Instruct's preprocessor_config.json.
_PATCHING = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
IMAGE_PROCESSOR = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384, **_PATCHING}
# Qwen2-VL video values: the pixel bounds of Qwen2VLVideoProcessor, frames sampled at 2 fps.
VIDEO_PROCESSOR = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28, "fps": 2.0, **_PATCHING}

_NOUNS = """cat dog bird fish horse cow sheep goat mouse rabbit lion tiger bear wolf fox deer duck owl frog snake
tree flower grass leaf forest garden field farm park beach ocean sea lake river mountain hill valley island desert
house home room kitchen door window wall roof floor table chair bed lamp clock book paper pen phone computer screen
car bus train plane boat ship bike road street bridge city town village market shop school office hospital station
sky sun moon star cloud rain snow wind storm light shadow fire water stone rock sand ice air smoke
man woman child boy girl baby friend teacher doctor farmer driver player artist king queen family people crowd
apple bread cake cheese coffee tea milk soup rice egg orange banana lemon pizza sugar salt
picture image photo video frame camera color shape line circle square corner edge center side part group number
morning evening night day week year season summer winter spring autumn hour minute moment time
ball game song music story letter word question answer idea plan problem reason example result""".split()
_ADJECTIVES = """red blue green yellow black white brown gray pink purple orange golden silver dark bright pale
small large big tiny huge tall short long wide narrow round flat thin thick heavy light soft hard
old new young ancient modern happy sad angry calm quiet loud busy lazy quick slow fast early late
warm cold hot cool wet dry clean dirty empty full rich poor strong weak simple strange beautiful ugly
clear cloudy sunny rainy snowy windy wooden metal plastic glass open closed distant nearby""".split()
_VERBS = """runs walks jumps sits stands sleeps eats drinks reads writes sings plays watches holds carries throws
catches finds sees looks shows contains covers crosses follows leaves enters opens closes builds paints draws
moves turns waits grows falls flies swims climbs rides drives pushes pulls touches brings takes gives
makes""".split()
_PREPOSITIONS = """in on under over near behind beside between above below across through around along
inside outside""".split()
_EXTRA_TEXT = [
    "Describe this image.",
    "What is in the picture?",
    "How many animals are there?",
    "What color is the car?",
    "Where was this photo taken?",
    "Summarize the video in one sentence.",
    "Is it day or night?",
    "You are a helpful assistant.",
    "café naïve résumé jalapeño über",
    "中文 你好 世界 日本語",
    "😀 🐱 🌲 → — …",
]


def _corpus() -> list[str]:
    """Deterministic English-like sentences (plus a few non-ASCII lines) to train the BPE on."""
    rng = random.Random(0)
    pick = rng.choice

    def sentence() -> str:
        noun, plural, place = pick(_NOUNS), pick(_NOUNS) + "s", pick(_NOUNS)
        verb = pick(_VERBS)
        adjective, other_adjective, preposition = pick(_ADJECTIVES), pick(_ADJECTIVES), pick(_PREPOSITIONS)
        return pick([
            f"The {adjective} {noun} {verb} the {other_adjective} {plural} {preposition} the {place}.",
            f"{adjective.capitalize()} {plural} are {preposition} the {place}, "
            f"and {rng.randint(2, 99)} {plural} {verb[:-1]}!",
            f"{noun.capitalize()}s {verb[:-1]} {preposition} a {adjective} {place}?",
        ])

    return [sentence() for _ in range(1500)] + _EXTRA_TEXT


def _train_backend_tokenizer() -> Tokenizer:
    """Qwen2-style byte-level BPE (same normalizer, split regex and byte-level stages) trained in-process."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_corpus(), trainer)
    # Added after training so they get the ids right after the BPE vocab, as in the real tokenizer.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_tokenizer() -> Qwen2Tokenizer:
    """The transformers tokenizer, configured like Qwen2-VL-Instruct's tokenizer_config.json."""
    return Qwen2Tokenizer(
        tokenizer_object=_train_backend_tokenizer(),
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        unk_token=None,
        bos_token=None,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer: Qwen2Tokenizer) -> Qwen2VLConfig:
    """Tiny Qwen2-VL config whose token ids all point at the tokenizer's special tokens."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    token_ids = {
        "bos_token_id": ids[PAD_TOKEN],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids[PAD_TOKEN],
    }
    return Qwen2VLConfig(
        text_config={**TEXT_CONFIG, **token_ids, "vocab_size": len(tokenizer)},
        vision_config=dict(VISION_CONFIG),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"],
        tie_word_embeddings=False,
        dtype="float32",
        **token_ids,  # also at the top level, where Qwen2-VL's own config.json has them
    )


def build_generation_config(tokenizer: Qwen2Tokenizer) -> GenerationConfig:
    """Qwen2-VL-Instruct's stop tokens, with plain greedy decoding.

    The real file samples with top_k=1 and repetition_penalty=1.05; plain greedy keeps HF ``generate``
    comparable with a server's greedy path.
    """
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    return GenerationConfig(
        bos_token_id=pad_id,
        pad_token_id=pad_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(t) for t in EOS_TOKENS],
        do_sample=False,
    )


def build_model(config: Qwen2VLConfig, tokenizer: Qwen2Tokenizer, seed: int) -> Qwen2VLForConditionalGeneration:
    """Seeded random weights, with the lm_head reshaped for stable greedy decoding (see module docstring)."""
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    never_generated = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS if t not in EOS_TOKENS]
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
        # A zero row gives logit 0, far below the top logits (~10+), so greedy never picks these tokens.
        model.lm_head.weight[never_generated] = 0.0
    return model


def _write_processor_configs(out_dir: pathlib.Path) -> None:
    """preprocessor_config.json via the PIL image processor, video_preprocessor_config.json as JSON.

    The video processor class needs torchvision to be instantiated, so its config is written by hand
    with the fields ``Qwen2VLVideoProcessor`` reads.
    """
    Qwen2VLImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(out_dir)
    image_file = out_dir / "preprocessor_config.json"
    image_cfg = json.loads(image_file.read_text())
    image_cfg.update(IMAGE_PROCESSOR, processor_class="Qwen2VLProcessor")
    image_file.write_text(json.dumps(image_cfg, indent=2, sort_keys=True) + "\n")

    video_cfg = {
        key: image_cfg[key]
        for key in ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean", "image_std",
                    "resample", "rescale_factor")
    }
    video_cfg.update(
        VIDEO_PROCESSOR,
        size={"shortest_edge": VIDEO_PROCESSOR["min_pixels"], "longest_edge": VIDEO_PROCESSOR["max_pixels"]},
        do_sample_frames=False,
        video_processor_type="Qwen2VLVideoProcessor",
        processor_class="Qwen2VLProcessor",
    )
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2, sort_keys=True) + "\n")


def save_checkpoint(out_dir: pathlib.Path, model: Qwen2VLForConditionalGeneration,
                    tokenizer: Qwen2Tokenizer) -> pathlib.Path:
    """Write `model` with the generation config, tokenizer and processor configs into ``out_dir``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = build_generation_config(tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)  # also writes chat_template.jinja, shared with the processor
    _write_processor_configs(out_dir)
    return out_dir


def build_tiny_checkpoint(out_dir: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """Write the whole checkpoint directory into ``out_dir`` and return it."""
    tokenizer = build_tokenizer()
    return save_checkpoint(out_dir, build_model(build_config(tokenizer), tokenizer, seed), tokenizer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    print(build_tiny_checkpoint(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
