"""The `vlm` model's own settings, as the repository generator writes them into its config.pbtxt.

Its media limits travel in the same parameters, as vlmserve.media.settings.MediaSettings (the
`preprocess` model gets the same ones, so both resolve a medium alike); its engine's settings in
`vlm/1/engine.json` (vlmserve.engine.config). The proxy reads these parameters from Triton, so each
has one owner: the repository.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlmserve.model_parameters import ModelParameters
from vlmserve.vit.packing import MAX_PATCHES_PER_CALL


@dataclass(frozen=True)
class VlmSettings(ModelParameters):
    checkpoint_dir: str
    served_model_name: str  # the model name of the OpenAI API
    max_model_len: int = 0  # the engine's context length (vlm/1/engine.json's), for the proxy's /v1/models
    max_media_per_request: int = 16
    vit_max_patches: int = MAX_PATCHES_PER_CALL  # packing budget per `vit` call
    vit_cache: bool = True  # whether a `vit_cache` model is there to ask
    # gRPC host:port of ViT servers, comma-separated (vlmserve.vit.pool); empty: this server's own
    # `preprocess` and `vit` models.
    vit_endpoints: str = ""
    # Threads that send responses (each send is a round trip to tritonserver); 0: the event loop that runs the
    # engine sends them itself, and while it sends, the tokens of later steps merge into fewer, fuller responses.
    # Interleaved A/Bs on 2 cores (perf/README.md, "Response threads"): against one thread, +11-17% output
    # tokens/s at 32-64 glue-bound streams with 18-27% less CPU per token; 3-5% fewer requests/s on the reference
    # workload, where nothing merges.
    response_threads: int = 0
    # How much lower than its engine's the priority (nice) of this model's own threads is: on a host with few
    # cores, vLLM's engine core and worker then never wait for the threads that only carry its output, which
    # catch up with several tokens per response instead. The engine keeps the priority the model started with.
    frontend_niceness: int = 10
