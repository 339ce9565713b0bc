"""vllm-partial-kv: restore offloaded KV blocks by recomputing a leading token range from
stored activations while the rest streams over PCIe (KVPR, arXiv 2411.17089)."""

__version__ = "0.2.0"

CONNECTOR_NAME = "PartialRecomputeConnector"
