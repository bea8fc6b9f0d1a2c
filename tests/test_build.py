"""The compiled extension: what it reports about itself, and what it says when it cannot load."""

from __future__ import annotations

import torch

import pefttorch
from pefttorch import _extension


def test_build_info():
    info = pefttorch.build_info()
    assert info["version"] == pefttorch.__version__
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert "cpu" in info["devices"]
    assert info["cuda"] == bool(info["cuda_archs"])


def test_cuda_kernels_registered_when_built_with_cuda():
    info = pefttorch.build_info()
    # every op the dispatcher knows under our namespace, so a new op cannot be left out of build_info's list
    registered = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("pefttorch::"))
    assert sorted(info["ops"]) == registered
    for op in registered:
        has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"pefttorch::{op}", "CUDA")
        assert has_cuda == info["cuda"], op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pefttorch::{op}", "CPU"), op


def test_cuda_kernels_built_when_torch_and_nvcc_have_cuda():
    # CI has nvcc and a CUDA build of torch: the .cu files must have been compiled there, even with
    # no GPU, so that a CUDA compile error fails CI. (PEFTTORCH_CUDA=0 builds opt out explicitly.)
    import os
    import shutil

    if os.environ.get("PEFTTORCH_CUDA") == "0" or torch.version.cuda is None or not (
        shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    ):
        return
    assert pefttorch.build_info()["cuda"]


def test_load_error_messages():
    e = _extension.explain_load_error
    assert "not built" in e(ModuleNotFoundError("No module named 'pefttorch._C'"))
    msg = e(ImportError("/x/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi"), "2.99.0")
    assert "different torch" in msg and "2.99.0" in msg and "--no-build-isolation" in msg
    msg = e(ImportError("libcudart.so.13: cannot open shared object file: No such file or directory"))
    assert "CUDA runtime" in msg and "libcudart.so.13" in msg
    msg = e(ImportError("libc10.so: cannot open shared object file: No such file or directory"))
    assert "different torch" in msg
    assert "failed to load" in e(ImportError("something else"))
