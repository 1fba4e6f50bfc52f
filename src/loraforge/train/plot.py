"""DIR/loss.png: training loss (raw and smoothed) and validation loss against the step."""

from __future__ import annotations

import io
from pathlib import Path

from ..paths import atomic_write_bytes


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled towards 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_losses(path: Path, train: tuple[list[int], list[float]], val: tuple[list[int], list[float]],
                title: str = "") -> None:
    # The object API with the Agg canvas, not pyplot: no global figure state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps, losses = train
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1)
        ax.plot(steps, smooth(losses), color="tab:blue", linewidth=1.8, label="train (smoothed)")
    vsteps, vlosses = val
    if vsteps:
        ax.plot(vsteps, vlosses, "o-", color="tab:orange", linewidth=1.8, markersize=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if steps or vsteps:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
