"""The one list of C++/CUDA sources, read by setup.py and CMakeLists.txt.

Sources are found by folder, so a new kernel file needs no edit here:
  csrc/*.cpp, csrc/common/*.cpp   device-independent op bodies and registration
  csrc/cpu/*.cpp                  CPU kernels
  csrc/cuda/*.cu                  CUDA kernels (built only with CUDA)

`python tools/sources.py cpu|cuda` prints that list, `;`-separated, for CMake.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _glob(*patterns: str) -> list[str]:
    files: list[Path] = []
    for pattern in patterns:
        files.extend(CSRC.glob(pattern))
    return sorted(str(f.relative_to(ROOT)) for f in files)


def cpu_sources() -> list[str]:
    return _glob("*.cpp", "common/*.cpp", "cpu/*.cpp")


def cuda_sources() -> list[str]:
    return _glob("cuda/*.cu")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    print(";".join({"cpu": cpu_sources, "cuda": cuda_sources}[which]()), end="")
