"""Giving freed heap pages back to the OS during CPU training (glibc's malloc_trim).

A training step frees thousands of activation and gradient buffers of a dozen sizes, in an order unlike
the one they were allocated in. glibc keeps freed blocks mapped for reuse, and the holes between
long-lived tensors add up: ~0.25 GB at the end of a forward and more across steps (SmolLM2, 4 x 256
tokens, 30 layers), resident memory that no live tensor uses. Trimming before the forward and between
the forward and the backward returns them; the price is re-faulting the pages that are reused, about 1%
of the step. `loraforge bench` reports the peak RSS this buys (its LoRA rows call it as the trainer does).
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to release
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_free_heap() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
