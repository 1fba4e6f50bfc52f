from .cache import KVCache
from .config import ModelConfig
from .llama import Linear, LlamaForCausalLM
from .loading import count_parameters, load_model, load_tokenizer, resolve_source

__all__ = ["KVCache", "Linear", "LlamaForCausalLM", "ModelConfig", "count_parameters", "load_model",
           "load_tokenizer", "resolve_source"]
