"""Triton `vit_cache`: the server's one ViT embedding cache.

Why a model of its own: `vlm` may run several instances, each its own stub process, so a cache
inside `vlm` would exist once per process and miss what the other instances encoded. This model
has exactly one instance (the generator writes `count: 1`), so every `vlm` instance reaches the
same entries through BLS calls; execute runs one request at a time, so the cache needs no lock.

A request is a lookup or a store: see vlmserve.contracts.VIT_CACHE.
Counters are Triton custom metrics on /metrics (vlm_vit_cache_*).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from vlmserve.contracts import VIT_CACHE
from vlmserve.triton_utils import model_parameters, optional_input, required_input, triton_error
from vlmserve.vit.cache import CacheStats, EmbeddingCache
from vlmserve.vit.settings import VitCacheSettings


class CacheMetrics:
    """CacheStats published as Triton metrics."""

    def __init__(self):
        self.families = []  # a Metric only works while its MetricFamily object is alive
        self.published = CacheStats()

        def metric(name, kind, description):
            self.families.append(pb_utils.MetricFamily(name=name, description=description, kind=kind))
            return self.families[-1].Metric(labels={})

        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self.counters = {
            "hits": metric("vlm_vit_cache_hits_total", counter, "Lookups answered from the cache"),
            "misses": metric("vlm_vit_cache_misses_total", counter, "Lookups that had to run the ViT"),
            "evictions": metric("vlm_vit_cache_evictions_total", counter, "Entries dropped to stay within budget"),
        }
        self.gauges = {
            "bytes": metric("vlm_vit_cache_bytes", gauge, "Bytes of embeddings held"),
            "entries": metric("vlm_vit_cache_entries", gauge, "Media held"),
        }

    def publish(self, stats: CacheStats) -> None:
        for name, metric in self.counters.items():  # counters only go up: add what changed
            metric.increment(getattr(stats, name) - getattr(self.published, name))
        for name, metric in self.gauges.items():
            metric.set(getattr(stats, name))
        self.published = CacheStats(**vars(stats))


class TritonPythonModel:
    def initialize(self, args):
        self.cache = EmbeddingCache(VitCacheSettings.from_parameters(model_parameters(args)).max_bytes)
        self.metrics = CacheMetrics()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(self._run(request)))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=triton_error(exc)))
        self.metrics.publish(self.cache.stats)
        return responses

    def _run(self, request) -> list:
        key = required_input(request, VIT_CACHE.KEY.name).reshape(-1)[0].decode()
        embeds = optional_input(request, VIT_CACHE.EMBEDS.name)
        if embeds is not None:
            stored = self.cache.put(key, embeds, required_input(request, VIT_CACHE.GRID_THW.name))
            return [pb_utils.Tensor(VIT_CACHE.FOUND.name, np.asarray([stored]))]
        entry = self.cache.get(key)
        if entry is None:
            return [pb_utils.Tensor(VIT_CACHE.FOUND.name, np.asarray([False])),
                    pb_utils.Tensor(VIT_CACHE.EMBEDS.name, np.zeros((0, 0), np.float32)),
                    pb_utils.Tensor(VIT_CACHE.GRID_THW.name, np.zeros(3, np.int64))]
        return [pb_utils.Tensor(VIT_CACHE.FOUND.name, np.asarray([True])),
                pb_utils.Tensor(VIT_CACHE.EMBEDS.name, entry.embeds),
                pb_utils.Tensor(VIT_CACHE.GRID_THW.name, entry.grid_thw)]
