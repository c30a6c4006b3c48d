"""The LLM engine: vLLM's async engine in the `vlm` model's process, fed with our ViT's embeddings, as
Triton's own vllm_backend runs it. Its settings are one object (`config.py`, `vlm/1/engine.json`)."""
