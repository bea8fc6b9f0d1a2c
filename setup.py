"""Builds pefttorch._C: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

No GPU is needed to build the CUDA kernels (CI compiles them without one). Switches, by environment:
  PEFTTORCH_CUDA=0|1      force the CUDA kernels off / on (default: on when possible)
  TORCH_CUDA_ARCH_LIST    GPU targets (default "8.0+PTX;9.0a": A100-class, H100 with wgmma, PTX for newer)
  MAX_JOBS                parallel compile jobs (ninja)
  DEBUG=1                 -O0 -g (and -G for device code)
The extension is built against the torch installed in the environment, so build with
`pip install --no-build-isolation .`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"
DEFAULT_CUDA_ARCHS = "8.0+PTX;9.0a"

sys.path.insert(0, str(ROOT / "tools"))
import sources  # noqa: E402


def _find_cuda_home() -> None:
    """Sets CUDA_HOME to a real toolkit when it is unset.

    torch guesses it from the directory of `nvcc` on PATH, which is wrong when `nvcc` is a wrapper
    script (e.g. /usr/local/bin/nvcc): look for a folder holding both bin/nvcc and the CUDA headers.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "bin" / "nvcc").exists() and (home / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


_find_cuda_home()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "pefttorch compiles against the torch in your environment, and none is installed.\n"
        "Install torch first (pip install torch==2.11.0), then: pip install --no-build-isolation ."
    )


def _flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        sys.exit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _with_cuda() -> bool:
    forced = _flag("PEFTTORCH_CUDA")
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if forced and not possible:
        sys.exit(
            "PEFTTORCH_CUDA=1 but the CUDA kernels cannot be built: "
            + ("this torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)")
        )
    return possible if forced is None else forced


def _pip_cuda_includes() -> list[str]:
    # torch's CUDA headers include cuBLAS etc.; with a pip-installed torch those headers come with the
    # nvidia-* wheels (site-packages/nvidia/cu13/include), not necessarily with the local toolkit.
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += [str(p) for p in sorted(Path(base).glob("cu*/include")) if (p / "cublas_v2.h").exists()]
    return found


def _build_config(generated: Path, with_cuda: bool, archs: str) -> None:
    values = {
        "PEFTTORCH_VERSION": VERSION,
        "PEFTTORCH_TORCH_VERSION": torch.__version__,
        "PEFTTORCH_CUDA_ARCHS": archs if with_cuda else "",
        "PEFTTORCH_CUDA_VERSION": (torch.version.cuda or "") if with_cuda else "",
    }
    text = (ROOT / "csrc" / "build_config.h.in").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    generated.mkdir(parents=True, exist_ok=True)
    target = generated / "build_config.h"
    if not target.exists() or target.read_text() != text:  # keep the timestamp: no needless rebuilds
        target.write_text(text)


def extensions():
    with_cuda = _with_cuda()
    debug = _flag("DEBUG") or False
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    if with_cuda:
        # Read by torch.utils.cpp_extension to pick -gencode flags; without it and without a visible
        # GPU it has nothing to go on.
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    generated = ROOT / "build" / "generated"
    _build_config(generated, with_cuda, archs)

    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = [*opt, "-std=c++17", "-DPEFTTORCH_PYTHON_MODULE"]
    nvcc = [*opt, "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DPEFTTORCH_WITH_CUDA"]
    if debug:
        nvcc.append("-G")
    srcs = sources.cpu_sources()
    include_dirs = [str(ROOT / "csrc"), str(generated)]
    if with_cuda:
        srcs += sources.cuda_sources()
        include_dirs += _pip_cuda_includes()
        cxx.append("-DPEFTTORCH_WITH_CUDA")
        ext = cpp_extension.CUDAExtension
        compile_args = {"cxx": cxx, "nvcc": nvcc}
    else:
        ext = cpp_extension.CppExtension
        compile_args = {"cxx": cxx}
    return [
        ext(
            name="pefttorch._C",
            sources=srcs,
            include_dirs=include_dirs,
            extra_compile_args=compile_args,
            py_limited_api=False,
        )
    ]


class BuildExt(cpp_extension.BuildExtension):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, use_ninja=True, **kwargs)

    def finalize_options(self):
        super().finalize_options()
        # One object folder for every build (pip installs and `setup.py build_ext --inplace` alike), so
        # ninja recompiles only what changed.
        self.build_temp = str(ROOT / "build" / "temp")


def requirements() -> list[str]:
    """The torch the extension is compiled against, exactly: its C++ ABI changes between releases, so the compiled
    pefttorch._C loads under no other (pip would otherwise let an upgrade of torch break the installed package)."""
    import torch

    return [f"torch=={torch.__version__.split('+')[0]}", "numpy", "safetensors>=0.4"]


setup(version=VERSION, install_requires=requirements(), ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
