"""Prefix tuning (Li & Liang 2021): learned keys and values placed before the first token in every layer.

    add_prefix(model, "pirate", PrefixConfig(num_virtual_tokens=20))   # trainable; the base stays frozen
    model(**with_active_prefix(model, batch))                           # training / eval forward
    generate(model, tok, prompts)                                       # picks up the active prefix itself

A prefix adapter lives in the model's one ``AdapterRegistry`` beside the LoRA adapters, so "the active
adapter" means the same thing for both: ``set_adapter`` switches to it, ``disable_adapter`` turns it off,
``delete_adapter`` removes it. Its weights sit in ``model.prefix_adapters[name]`` (a submodule, so ``.to()``
moves them and ``trainable_report`` counts them).

Layout (PEFT's): the flat prefix is [P, L * 2 * token_dim] with token_dim = Hkv * D; viewed as
[P, 2L, Hkv, D], slot 2i holds layer i's keys and slot 2i + 1 its values. The keys are used as they are
(no rotary embedding is applied to them) and the real tokens' positions start at P.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import LoraForgeError
from ..lora.model import registry
from ..model.cache import KVCache
from .config import PrefixConfig

Prefix = list[tuple[Tensor, Tensor]]  # per layer (k, v), each [B, Hkv, P, D]


class PrefixEncoder(nn.Module):
    """One adapter's prefix: a [P, L*2*Hkv*D] table, or a [P, Hkv*D] table fed through a two-layer MLP."""

    def __init__(self, num_virtual_tokens: int, n_layers: int, n_kv: int, head_dim: int,
                 encoder_hidden_size: int | None = None, device=None):
        super().__init__()
        self.num_virtual_tokens, self.n_layers, self.n_kv, self.head_dim = num_virtual_tokens, n_layers, n_kv, head_dim
        self.token_dim = n_kv * head_dim
        flat_dim = n_layers * 2 * self.token_dim
        # fp32 whatever the model's dtype: the prefix is small, and the attention casts it to the keys' dtype.
        if encoder_hidden_size is None:
            self.embedding = nn.Parameter(torch.zeros(num_virtual_tokens, flat_dim, device=device))
            self.transform = None
        else:
            self.embedding = nn.Parameter(torch.zeros(num_virtual_tokens, self.token_dim, device=device))
            self.transform = nn.Sequential(
                nn.Linear(self.token_dim, encoder_hidden_size, device=device),
                nn.Tanh(),
                nn.Linear(encoder_hidden_size, flat_dim, device=device),
            )

    def flat(self) -> Tensor:
        """The prefix in PEFT's saved layout: [P, L * 2 * Hkv * D] (the MLP's output when there is one)."""
        return self.embedding if self.transform is None else self.transform(self.embedding)

    def forward(self, batch_size: int) -> Prefix:
        P, L = self.num_virtual_tokens, self.n_layers
        kv = self.flat().view(P, 2 * L, self.n_kv, self.head_dim).permute(1, 2, 0, 3)  # [2L, Hkv, P, D]
        kv = kv[:, None].expand(-1, batch_size, -1, -1, -1)  # [2L, B, Hkv, P, D], a view: no copy per row
        return [(kv[2 * i], kv[2 * i + 1]) for i in range(L)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output (what gets saved); the prefix computed is unchanged."""
        if self.transform is not None:
            self.embedding = nn.Parameter(self.flat().detach().clone(), requires_grad=self.embedding.requires_grad)
            self.transform = None

    def extra_repr(self) -> str:
        mlp = "" if self.transform is None else f", mlp_hidden={self.transform[0].out_features}"
        return f"virtual_tokens={self.num_virtual_tokens}, layers={self.n_layers}, kv_heads={self.n_kv}, " \
               f"head_dim={self.head_dim}{mlp}"


def prefix_adapters(model: nn.Module, create: bool = False) -> nn.ModuleDict:
    """name -> PrefixEncoder. Entries whose registry record is gone (delete_adapter) are dropped here."""
    mods = getattr(model, "prefix_adapters", None)
    if mods is None:
        mods = nn.ModuleDict()
        if create:
            model.prefix_adapters = mods
    configs = registry(model).configs
    for name in [n for n in mods if not isinstance(configs.get(n), PrefixConfig)]:
        del mods[name]
    return mods


def is_prefix_adapter(model: nn.Module, name: str | None) -> bool:
    return name is not None and isinstance(registry(model).configs.get(name), PrefixConfig) \
        and name in prefix_adapters(model)


def add_prefix(model: nn.Module, name: str = "default", config: PrefixConfig | None = None,
               activate: bool = True) -> PrefixEncoder:
    """Add a trainable prefix adapter `name` (everything else keeps its requires_grad); returns its module."""
    config = config or PrefixConfig()
    reg = registry(model)
    reg.check_new_name(name)
    if activate and reg.merged is not None:
        raise LoraForgeError(f"adapter {reg.merged!r} is merged into the base weights; unmerge it before "
                             "activating a prefix adapter")
    cfg = model.config
    hidden = None
    if config.prefix_projection:
        hidden = config.encoder_hidden_size or cfg.num_key_value_heads * cfg.head_dim  # PEFT's default width
    enc = PrefixEncoder(config.num_virtual_tokens, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                        hidden, device=model.model.embed_tokens.weight.device)
    with torch.no_grad():
        if config.init == "vocab":
            enc.embedding.copy_(token_activations(model, random_token_ids(model, config.num_virtual_tokens)))
        elif config.init == "normal":
            enc.embedding.normal_()  # nn.Embedding's default, which PEFT uses
        if config.init == "zero" and enc.transform is not None:
            nn.init.zeros_(enc.transform[2].weight)
            nn.init.zeros_(enc.transform[2].bias)
    prefix_adapters(model, create=True)[name] = enc
    reg.names.append(name)
    reg.configs[name] = config
    if activate:
        reg.active = name
    return enc


def random_token_ids(model: nn.Module, n: int) -> Tensor:
    """[n] ids to initialise a prefix from: BOS (the model's usual first token), then uniform draws."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (n,), device=model.model.embed_tokens.weight.device)
    if cfg.bos_token_id is not None:
        ids[0] = cfg.bos_token_id
    return ids


@torch.no_grad()
def token_activations(model: nn.Module, ids: Tensor) -> Tensor:
    """[n, L*2*Hkv*D]: the keys/values the base model computes for the n tokens `ids` ([n] long).

    As a prefix they reproduce exactly what those tokens would be as a prompt before the real tokens
    (their keys are already rotated for positions 0..n-1, and the real tokens then start at position n).
    """
    n = ids.shape[0]
    cache = KVCache.for_model(model, 1, n, dtype=model.model.embed_tokens.weight.dtype, device=ids.device)
    reg = registry(model)
    prev, reg.active = reg.active, None  # the base model's own activations, not another adapter's
    try:
        model(ids[None], cache=cache, logits_to_keep=1)
    finally:
        reg.active = prev
    kv = torch.stack([cache.k[:, 0], cache.v[:, 0]], dim=1).float()  # [L, 2, Hkv, n, D]
    return kv.flatten(0, 1).permute(2, 0, 1, 3).reshape(n, -1)  # [n, 2L, Hkv, D] -> [n, L*2*Hkv*D]


def prefix_for(model: nn.Module, name: str, batch_size: int = 1) -> Prefix:
    """Per-layer (k, v) [B, Hkv, P, D] of prefix adapter `name`, for model(..., prefix=) or generate_ids."""
    if not is_prefix_adapter(model, name):
        raise LoraForgeError(f"no prefix adapter named {name!r}; prefix adapters: "
                             f"{', '.join(prefix_adapters(model)) or 'none'}")
    return prefix_adapters(model)[name](batch_size)


def active_prefix(model: nn.Module, batch_size: int, adapter_ids: Tensor | None = None) -> Prefix | None:
    """The prefix the model should run with when the caller passed none, or None.

    Without adapter_ids: the active adapter's prefix when the active adapter is a prefix adapter (None
    for a LoRA adapter, none at all, or inside disable_adapter). With adapter_ids (a mixed batch, where
    the LoRA layers ignore the active adapter too): the prefix when every row names the same prefix
    adapter. A batch mixing a prefix adapter with other rows is refused rather than silently run bare.
    """
    reg = registry(model)
    if not prefix_adapters(model):
        return None
    if adapter_ids is None:
        name = reg.active
    else:
        names = {reg.names[i] if i >= 0 else None for i in adapter_ids.tolist()}
        prefixed = {n for n in names if is_prefix_adapter(model, n)}
        if not prefixed:
            return None
        if len(names) > 1:
            raise LoraForgeError(f"a batch mixing prefix adapter(s) {sorted(prefixed)} with other adapters or the "
                                 "base model is not supported; run each prefix adapter's rows as their own batch")
        name = prefixed.pop()
    if not is_prefix_adapter(model, name):
        return None
    return prefix_adapters(model)[name](batch_size)


def prefix_kwargs(prefix: Prefix, positions: Tensor | None = None, attention_mask: Tensor | None = None) -> dict:
    """Keyword arguments that run model(...) with `prefix`: prefix=, and the given positions/mask adjusted.

    As PEFT does: given positions move up by P (the prefix holds positions 0..P-1), and every query may
    attend to all P prefix slots, so a [B, 1, S, T] mask gains P True columns in front. Packed rows
    (positions restarting per example, block-diagonal mask) stay exact: each example sees the prefix,
    then itself. Absent positions/mask stay absent: the model's defaults already start after the prefix.
    """
    P = prefix[0][0].shape[2]
    out: dict = {"prefix": prefix}
    if positions is not None:
        out["positions"] = positions + P
    if attention_mask is not None:
        out["attention_mask"] = torch.cat([attention_mask.new_ones(*attention_mask.shape[:-1], P), attention_mask], -1)
    return out


def with_active_prefix(model: nn.Module, inputs: dict) -> dict:
    """Forward kwargs (input_ids, positions, attention_mask, labels, ...) with the active prefix applied.

    Returns `inputs` unchanged when no prefix adapter is active or a prefix or KV cache is already given.
    """
    if inputs.get("prefix") is not None or inputs.get("cache") is not None:
        return inputs
    prefix = active_prefix(model, inputs["input_ids"].shape[0], inputs.get("adapter_ids"))
    if prefix is None:
        return inputs
    return {**inputs, **prefix_kwargs(prefix, inputs.get("positions"), inputs.get("attention_mask"))}


def get_prefix_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """{"prefix_adapters.<name>.<param>": parameter} for one prefix adapter."""
    if not is_prefix_adapter(model, name):
        raise LoraForgeError(f"no prefix adapter named {name!r}")
    return {f"prefix_adapters.{name}.{k}": p for k, p in prefix_adapters(model)[name].named_parameters()}


def set_trainable_prefix(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Freeze everything but prefix adapter `name`; returns the trainable parameters."""
    params = list(get_prefix_params(model, name).values())
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params
