"""loraforge: LoRA, QLoRA and prefix tuning for Llama-family models, with PEFT-format adapters.

    import loraforge as lf
    model, tok = lf.load_model()                       # the embedded SmolLM2-135M-Instruct
    lf.add_lora(model, "pirate", lf.LoraConfig(r=16, alpha=32))
    lf.save_adapter(model, "pirate", "runs/pirate")    # PEFT's format
"""

from .adapters import attach_adapter
from .errors import LoraForgeError
from .generate import SamplingParams, generate
from .lora import (
    LoraConfig,
    adapter_ids_for,
    add_lora,
    delete_adapter,
    disable_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    save_merged,
    set_adapter,
    set_trainable_params,
    trainable_report,
    unmerge_adapter,
)
from .model import load_model, load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "LoraForgeError", "SamplingParams", "add_lora", "adapter_ids_for", "attach_adapter",
    "delete_adapter", "disable_adapter", "generate", "load_adapter", "load_model", "load_tokenizer",
    "merge_adapter", "save_adapter", "save_merged", "set_adapter", "set_trainable_params", "trainable_report",
    "unmerge_adapter",
]
