"""vLLM general-plugin entry point. vLLM calls it in every process, sometimes more than once."""

from __future__ import annotations

from vllm_partial_kv import CONNECTOR_NAME


def register() -> None:
    from vllm_partial_kv import compat

    compat.check_version()
    compat.register_connector(CONNECTOR_NAME, "vllm_partial_kv.connector", CONNECTOR_NAME)
    install_capture_hook()


def install_capture_hook() -> None:
    """Hook activation capture into model loading (a no-op unless our connector is configured)."""
    from vllm_partial_kv import capture, compat

    compat.wrap_model_loader(capture.install)
