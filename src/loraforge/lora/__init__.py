from .config import LoraConfig
from .layer import LoraLinear
from .model import (
    adapter_ids_for,
    add_lora,
    delete_adapter,
    disable_adapter,
    get_adapter_params,
    lora_layers,
    merge_adapter,
    registry,
    set_adapter,
    set_trainable_params,
    trainable_report,
    unmerge_adapter,
)
from .peft_io import adapter_info, load_adapter, read_adapter_config, save_adapter, save_merged

__all__ = [
    "LoraConfig", "LoraLinear", "add_lora", "adapter_ids_for", "adapter_info", "delete_adapter", "disable_adapter",
    "get_adapter_params", "load_adapter", "lora_layers", "merge_adapter", "read_adapter_config", "registry",
    "save_adapter", "save_merged", "set_adapter", "set_trainable_params", "trainable_report", "unmerge_adapter",
]
