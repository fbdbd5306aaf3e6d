"""Weight-sparse transformers (Gao et al. 2025) as Hugging Face models, and circuit tools for them."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .model.configuration_csp import CSPConfig
from .model.modeling_csp import CSPForCausalLM, CSPModel

# With the package imported, the Auto classes use its code for model_type "csp" and never ask about
# running a folder's remote code (which is the same code).
AutoConfig.register("csp", CSPConfig, exist_ok=True)
AutoModel.register(CSPConfig, CSPModel, exist_ok=True)
AutoModelForCausalLM.register(CSPConfig, CSPForCausalLM, exist_ok=True)

__all__ = ["CSPConfig", "CSPForCausalLM", "CSPModel"]
