#!/usr/bin/env python
"""LoRA layer benchmark: pefttorch vs the frozen base layer, HF PEFT and unfused PyTorch.

    python bench/bench_lora.py                 # default grid on the best device present
    python bench/bench_lora.py --quick
    python bench/bench_lora.py --shapes 8192x4096x4096r16p0.1 --json bench/results/lora-h100.json

Rows that do not match the reference are flagged and the exit status is 1.
"""

import sys

from pefttorch.bench.cli_lora import main

if __name__ == "__main__":
    sys.exit(main())
