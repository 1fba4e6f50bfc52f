"""Server counters, readable as JSON or as Prometheus text exposition."""

from __future__ import annotations

import threading
import time
from collections import deque


class Metrics:
    """Counters updated by the engine thread and read by the HTTP server (a lock keeps them consistent)."""

    WINDOW_S = 10.0  # tokens/s is measured over the last WINDOW_S seconds

    def __init__(self):
        self._lock = threading.Lock()
        self.started = time.monotonic()
        self.requests_served = 0
        self.requests_failed = 0
        self.requests_cancelled = 0
        self.prompt_tokens = 0
        self.tokens_generated = 0
        self.queue_length = 0
        self.running = 0
        self.adapters_loaded = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) per engine step

    def step(self, tokens: int, queue_length: int, running: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens_generated += tokens
            self.queue_length, self.running = queue_length, running
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - self.WINDOW_S:
                self._recent.popleft()

    def finished(self, prompt_tokens: int, outcome: str = "served") -> None:
        """Count a request that ended: outcome "served", "failed" (an engine error) or "cancelled" (the
        client went away or aborted it)."""
        with self._lock:
            if outcome == "served":
                self.requests_served += 1
            elif outcome == "cancelled":
                self.requests_cancelled += 1
            else:
                self.requests_failed += 1
            self.prompt_tokens += prompt_tokens

    def snapshot(self) -> dict:
        now = time.monotonic()
        with self._lock:
            recent = [n for t, n in self._recent if t >= now - self.WINDOW_S]
            span = min(self.WINDOW_S, max(now - self.started, 1e-9))
            return {
                "requests_served": self.requests_served,
                "requests_failed": self.requests_failed,
                "requests_cancelled": self.requests_cancelled,
                "prompt_tokens": self.prompt_tokens,
                "tokens_generated": self.tokens_generated,
                "tokens_per_s": sum(recent) / span,
                "queue_length": self.queue_length,
                "running_batch_size": self.running,
                "adapters_loaded": self.adapters_loaded,
                "uptime_s": now - self.started,
            }

    def prometheus(self) -> str:
        help_ = {
            "requests_served": ("counter", "requests completed"),
            "requests_failed": ("counter", "requests that ended in an engine error"),
            "requests_cancelled": ("counter", "requests cancelled before the end (the client went away)"),
            "prompt_tokens": ("counter", "prompt tokens processed"),
            "tokens_generated": ("counter", "tokens generated"),
            "tokens_per_s": ("gauge", f"tokens generated per second over the last {self.WINDOW_S:g} s"),
            "queue_length": ("gauge", "requests waiting for a batch slot"),
            "running_batch_size": ("gauge", "sequences in the running batch"),
            "adapters_loaded": ("gauge", "adapters loaded"),
            "uptime_s": ("gauge", "seconds since the server started"),
        }
        lines = []
        for key, value in self.snapshot().items():
            kind, text = help_[key]
            name = f"loraforge_{key}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"
