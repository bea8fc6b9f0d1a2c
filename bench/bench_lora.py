#!/usr/bin/env python
"""LoRA layer benchmark: pefttorch vs the frozen base layer, HF PEFT and unfused PyTorch.
The same as `pefttorch bench lora`; see `pefttorch bench --help` for the options.

    python bench/bench_lora.py                 # default grid on the best device present
    python bench/bench_lora.py --quick
    python bench/bench_lora.py --shapes 8192x4096x4096r16p0.1 --json bench/results/lora-h100.json
"""

import sys

from pefttorch.bench.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("lora"))
