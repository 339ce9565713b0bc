"""`PartialRecomputeConnector`: vLLM's V1 KV-connector API over a scheduler half and a worker half.

As vLLM's own `OffloadingConnector` does, the class vLLM instantiates (once per role) only hands
each call to the half of its role: `scheduler.PartialKVScheduler` (which blocks are on the host,
which to store and restore) or `worker.PartialKVWorker` (the copies and the recompute). The
halves share nothing but the step's `PartialKVMetadata`.
"""

from __future__ import annotations

from typing import Any

from vllm_partial_kv import compat
from vllm_partial_kv.config import ConfigError, parse_config
from vllm_partial_kv.deployment import activations_wanted, check_storage_parallelism, extra_config
from vllm_partial_kv.metadata import PartialKVMetadata  # noqa: F401  (vLLM pickles it by this path too)
from vllm_partial_kv.metrics import PartialKVStats
from vllm_partial_kv.scheduler import PartialKVScheduler
from vllm_partial_kv.worker import PartialKVWorker


class PartialRecomputeConnector(compat.KVConnectorBase_V1):
    def __init__(self, vllm_config, role, kv_cache_config=None, **kwargs) -> None:
        super().__init__(vllm_config, role, kv_cache_config, **kwargs)
        cfg = parse_config(extra_config(vllm_config))
        with_act = activations_wanted(vllm_config)
        block_size = vllm_config.cache_config.block_size
        if with_act and cfg.max_recompute_tokens < block_size:
            raise ConfigError(
                f"max_recompute_tokens={cfg.max_recompute_tokens} is less than one block "
                f"({block_size} tokens): nothing could be recomputed; raise it or set recompute_ratio 0"
            )
        check_storage_parallelism(vllm_config, cfg)
        self.scheduler: PartialKVScheduler | None = None
        self.worker: PartialKVWorker | None = None
        if role == compat.KVConnectorRole.SCHEDULER:
            self.scheduler = PartialKVScheduler(vllm_config, kv_cache_config, cfg, with_act)
        else:
            self.worker = PartialKVWorker(vllm_config, cfg, with_act)

    # ========================================================================== scheduler half
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def may_load_async(self, request) -> bool:  # vLLM >= 0.34 asks; older ones never do
        return self.scheduler.may_load_async(request)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> PartialKVMetadata:
        return self.scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self.scheduler.update_connector_output(connector_output)

    def request_finished(self, request, block_ids=None) -> tuple[bool, dict | None]:
        return self.scheduler.request_finished(request, block_ids)

    def reset_cache(self) -> bool:
        return self.scheduler.reset_cache()

    # ============================================================================= worker half
    def register_kv_caches(self, kv_caches) -> None:
        self.worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata) -> None:
        self.worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        self.worker.start_load_kv(self._get_connector_metadata(), forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs) -> None:
        return  # blocks are stored whole after the forward, in wait_for_save

    def wait_for_save(self) -> None:
        self.worker.wait_for_save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self.worker.get_finished(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.get_block_ids_with_load_errors()

    # ============================================================================= both halves
    def get_kv_connector_stats(self):
        if self.scheduler is not None:
            return self.scheduler.store_gauges()
        return self.worker.get_kv_connector_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return PartialKVStats(data=data) if data is not None else PartialKVStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm_partial_kv.metrics import PartialKVPromMetrics

        return PartialKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
