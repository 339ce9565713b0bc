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
    """In the worker, after the model is built and before vLLM profiles memory, compiles, warms up
    or records CUDA graphs (all before it creates the connector, on vLLM 0.34): hook activation
    capture in and allocate the plugin's device buffers, bound to the capture op at once, so that
    every recorded graph writes activations and vLLM's profiling counts the buffers (no-ops unless
    our connector keeps activations)."""
    from vllm_partial_kv import capture, deployment, device_buffers

    if deployment.activations_wanted(vllm_config):
        capture.install(model, vllm_config)
        layers = capture.layers()
        if layers:  # else the structural match refused the model: this worker never recomputes
            device = next(iter(layers.values())).qkv_proj.weight.device
            device_buffers.allocate(vllm_config, list(layers), device)
            return
    device_buffers.release()  # an earlier engine's, in this process
