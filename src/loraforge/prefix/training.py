"""`loraforge train --method prefix`: the prefix-tuning branch of train.methods.prepare."""

from __future__ import annotations

from torch import nn

from .config import PrefixConfig
from .module import add_prefix, get_prefix_params, prefix_for, prefix_kwargs, set_trainable_prefix
from .peft_io import save_prefix_adapter


def prepare_prefix_training(model: nn.Module, cfg):
    """Add a trainable prefix adapter (cfg.num_virtual_tokens, cfg.prefix_projection) and freeze the rest."""
    from ..train.methods import ADAPTER, Trainable  # noqa: PLC0415 - the trainer imports us, not the reverse

    config = PrefixConfig(num_virtual_tokens=cfg.num_virtual_tokens,
                          prefix_projection=bool(getattr(cfg, "prefix_projection", False)),
                          encoder_hidden_size=getattr(cfg, "encoder_hidden_size", None))
    add_prefix(model, ADAPTER, config)
    set_trainable_prefix(model, ADAPTER)

    def batch_kwargs(batch: dict) -> dict:
        # Recomputed every step: with the MLP reparameterisation the prefix is a function of the weights.
        prefix = prefix_for(model, ADAPTER, batch["input_ids"].shape[0])
        return prefix_kwargs(prefix, batch.get("positions"), batch.get("attention_mask"))

    return Trainable(
        method=cfg.method,
        params=get_prefix_params(model, ADAPTER),
        save=lambda out: save_prefix_adapter(model, ADAPTER, out),
        batch_kwargs=batch_kwargs,
    )
