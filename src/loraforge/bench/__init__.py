"""`loraforge bench`: loraforge against PEFT and bitsandbytes on this machine, one table and one JSON.

    setting.py  the configuration, shared data, LoRA init, memory and timing helpers
    train.py    LoRA / QLoRA training-step workers (loraforge, PEFT, PEFT + bitsandbytes)
    gen.py      greedy generation workers (adapter live, merged, PEFT)
    quant.py    NF4 quantize / dequantize throughput and error (loraforge.quant, bitsandbytes)
    floor.py    the step's matmul FLOPs and the machine's fp32 matmul rate
    worker.py   one system per process: `python -m loraforge.bench.worker NAME SETTING_JSON`
    runner.py   runs the plan, writes results.json; report.py builds the JSON and the table
"""
