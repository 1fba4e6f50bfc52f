"""PrefixConfig: what a prefix-tuning adapter is (Li & Liang 2021), validated when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoraForgeError

INITS = ("vocab", "normal", "zero")


@dataclass
class PrefixConfig:
    # Learned key/value slots placed before the first real token in every attention layer.
    num_virtual_tokens: int = 20
    # Train the prefix through a two-layer MLP (Li & Liang's reparameterisation: optimising the keys and
    # values directly is unstable). The MLP is folded away on save: only its output is kept.
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None  # the MLP's width; default token_dim (Hkv * head_dim), as PEFT
    # "vocab": the keys/values the frozen model itself computes for real tokens (Li & Liang's initialisation
    # from real words' activations), so training starts from "the model as prompted with P tokens";
    # "normal": N(0, 1) entries (PEFT's default); "zero": all zeros. None = "vocab", or "normal" with the MLP.
    init: str | None = None

    def __post_init__(self):
        P = self.num_virtual_tokens
        if isinstance(P, bool) or not isinstance(P, int) or P < 1:
            raise LoraForgeError(f"num_virtual_tokens must be a positive integer, got {P!r}")
        if not isinstance(self.prefix_projection, bool):
            raise LoraForgeError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        h = self.encoder_hidden_size
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise LoraForgeError(f"encoder_hidden_size must be a positive integer, got {h!r}")
        if h is not None and not self.prefix_projection:
            raise LoraForgeError("encoder_hidden_size is the width of the prefix MLP; set prefix_projection=True "
                                 "to use it")
        if self.init is None:
            self.init = "normal" if self.prefix_projection else "vocab"
        if self.init not in INITS:
            raise LoraForgeError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "vocab" and self.prefix_projection:
            raise LoraForgeError("init='vocab' sets the keys/values themselves, which the prefix MLP computes; "
                                 "use init='normal' or 'zero' with prefix_projection=True")
