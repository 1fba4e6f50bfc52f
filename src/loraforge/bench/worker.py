"""One measured system per process: `python -m loraforge.bench.worker NAME SETTING_JSON`.

A fresh process per system means its peak RSS (VmHWM) is its own and no allocator cache or thread pool
carries over from another system. The result is printed as one JSON line, last on stdout.
"""

from __future__ import annotations

import json
import sys
import traceback


def workers() -> dict:
    from . import floor, gen, quant, train

    return {
        "lora_ours": train.ours,
        "lora_peft": train.peft,
        "qlora_ours": train.ours_qlora,
        "qlora_peft_bnb": train.peft_qlora,
        "gen_ours": gen.ours,
        "gen_ours_merged": gen.ours_merged,
        "gen_peft": gen.peft,
        "quant_ours": quant.ours,
        "quant_bnb": quant.bnb,
        "matmul_rate": floor.matmul_rate,
    }


def main(argv: list[str]) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ..procstat import rss_bytes
    from .setting import Setting

    name, setting = argv[0], Setting.from_json(json.loads(argv[1]))
    try:
        result = workers()[name](setting)
    except Exception as e:  # noqa: BLE001 - a failing system is reported in the table, not fatal
        traceback.print_exc(file=sys.stderr)
        result = {"error": f"{type(e).__name__}: {e}"}
    result.setdefault("process_peak_rss", rss_bytes()["peak"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
