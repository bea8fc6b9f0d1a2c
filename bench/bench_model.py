#!/usr/bin/env python
"""Whole-model training step: full fine-tuning vs HF PEFT LoRA vs HF PEFT + pefttorch.accelerate vs
pefttorch LoRA (Llama-style hidden 2048 / 16 layers / MLP 5632 / vocab 32000, 8 x 1024 tokens, bf16 on a
GPU; a small model on the CPU). The same as `pefttorch bench model`.

    python bench/bench_model.py --json bench/results/model-h100.json
"""

import sys

from pefttorch.bench.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("model"))
