"""Weight-sparse transformers (Gao et al. 2025) as Hugging Face models, and circuit tools for them."""

from .configuration_csp import CSPConfig
from .modeling_csp import CSPForCausalLM

__all__ = ["CSPConfig", "CSPForCausalLM"]
