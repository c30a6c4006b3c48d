"""Continuous-batching engine for the Qwen2-VL language model: scheduler with chunked prefill and
preemption, paged KV cache with a prefix cache, model runner, sampler."""

from vlmserve.engine.llm_engine import LLMEngine, StepOutput
from vlmserve.engine.sampling import Sampler, SamplingParams
from vlmserve.engine.stats import EngineStats

__all__ = ["EngineStats", "LLMEngine", "Sampler", "SamplingParams", "StepOutput"]
