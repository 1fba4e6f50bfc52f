"""`loraforge compare`: train LoRA, QLoRA and prefix tuning on the same data and step budget, plus full
fine-tuning as a reference when it fits, and report what each costs and buys, measured.

    config.py   CompareConfig: the shared settings, per-method learning rates, the TrainConfig per method
    worker.py   one row per process (`python -m loraforge.compare.worker`), so each peak RSS is its own
    measure.py  parameters, bytes held and on disk, peak RSS, step times, the shared validation split
    full.py     the full fine-tuning row: memory estimate, and a loop that trains every weight
    runner.py   runs the rows, writes DIR/compare.json, DIR/report.md, DIR/compare.png, prints the table
    report.py   the markdown table, the trade-off sentences and the figure
"""

from .config import DEFAULT_LR, CompareConfig
from .runner import compare

__all__ = ["DEFAULT_LR", "CompareConfig", "compare"]
