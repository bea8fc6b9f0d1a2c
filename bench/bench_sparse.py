#!/usr/bin/env python
"""Sparse-activation MLP (DEFT inference) at decode: pefttorch.functional.sparse_mlp vs the dense MLP in
plain PyTorch (the bound) and the masked reference, over token counts and activation densities
(Llama-style 4096->11008->4096 gated SiLU and BERT-style 1024->4096->1024 GELU with biases, bf16 on a GPU;
smaller MLPs on the CPU). The same as `pefttorch bench sparse`.

    python bench/bench_sparse.py --json bench/results/sparse-h100.json
    python bench/bench_sparse.py --device cpu --shapes 1024x2752:silu:gated --tokens 1 --densities 0.1,0.5
"""

import sys

from pefttorch.bench.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("sparse"))
