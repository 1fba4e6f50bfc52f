"""Prefix tuning (Li & Liang 2021) in PEFT's PREFIX_TUNING format: config, module, save/load."""

from .config import PrefixConfig
from .module import (
    PrefixEncoder,
    active_prefix,
    add_prefix,
    get_prefix_params,
    is_prefix_adapter,
    prefix_adapters,
    prefix_for,
    prefix_kwargs,
    set_trainable_prefix,
    with_active_prefix,
)
from .peft_io import load_prefix_adapter, save_prefix_adapter
from .training import prepare_prefix_training

__all__ = [
    "PrefixConfig", "PrefixEncoder", "active_prefix", "add_prefix", "get_prefix_params", "is_prefix_adapter",
    "load_prefix_adapter", "prefix_adapters", "prefix_for", "prefix_kwargs",
    "prepare_prefix_training", "save_prefix_adapter", "set_trainable_prefix",
    "with_active_prefix",
]
