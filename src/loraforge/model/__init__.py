from .cache import KVCache
from .config import ModelConfig
from .decoder import CausalLM
from .linear import Linear
from .loading import count_parameters, load_model, load_tokenizer, resolve_source

LlamaForCausalLM = CausalLM  # its name from before every family shared one decoder

__all__ = ["CausalLM", "KVCache", "Linear", "LlamaForCausalLM", "ModelConfig", "count_parameters", "load_model",
           "load_tokenizer", "resolve_source"]
