"""vLLM general-plugin entry point. vLLM calls it in every process, sometimes more than once."""

from __future__ import annotations

from vllm_partial_kv import CONNECTOR_NAME


def register() -> None:
    try:
        from vllm_partial_kv import compat
    except ImportError as exc:  # compat imports vLLM's modules: a release that moved one
        raise SystemExit(f"error: vllm-partial-kv cannot load beside this vLLM: {exc}") from None

    compat.check_version()
    compat.register_connector(CONNECTOR_NAME, "vllm_partial_kv.connector", CONNECTOR_NAME)
    compat.wrap_model_loader(_after_model_load)


def _after_model_load(model, vllm_config) -> None:
    """In the worker, after the model is built and before vLLM profiles memory and sizes the KV
    cache: hook activation capture in, and leave room for its buffers (both no-ops unless our
    connector is configured)."""
    from vllm_partial_kv import capture, compat, deployment

    if deployment.activations_wanted(vllm_config):
        capture.install(model, vllm_config)
    compat.wrap_kv_budget(deployment.kv_budget_with_activations)
