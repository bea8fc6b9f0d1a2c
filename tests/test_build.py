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
    assert "--no-deps" in msg  # --force-reinstall alone reinstalls torch too


def test_not_built_says_where_it_looked_and_why(tmp_path):
    """The message named no directory and always said "not built": also for a _C built for another Python, and for
    an unbuilt source tree that, run from its root, hides an installed copy."""
    package = tmp_path / "src" / "pefttorch"
    package.mkdir(parents=True)
    assert str(package) in _extension._not_built(package) and "not built" in _extension._not_built(package)
    (tmp_path / "src" / "setup.py").write_text("")
    assert "source tree that was not built" in _extension._not_built(package)
    (package / "_C.cpython-399-x86_64-linux-gnu.so").write_bytes(b"")
    assert "_C.cpython-399-x86_64-linux-gnu.so, built for another Python" in _extension._not_built(package)


def test_a_stale_extension_lacking_an_op_is_named(monkeypatch):
    """A _C built from older sources (an in-place build not redone) failed inside torch.library with "operator
    pefttorch::... does not exist"; load() names the missing ops and the rebuild."""
    import pytest

    assert _extension.load() is pefttorch.ops._C  # the list matches what this build registers
    monkeypatch.setattr(_extension, "OPS", (*_extension.OPS, "an_op_from_newer_sources"))
    with pytest.raises(ImportError, match="older than pefttorch's Python sources: it lacks the op.s. "
                                          "an_op_from_newer_sources"):
        _extension.load()


def test_info_knows_which_gpus_a_build_runs_on():
    from pefttorch.cli import runs_on

    default = ["8.0+PTX", "9.0a"]
    assert runs_on(default, 8, 0) and runs_on(default, 8, 6) and runs_on(default, 9, 0) and runs_on(default, 12, 0)
    assert not runs_on(default, 7, 5)  # PTX for 8.0 cannot be compiled for an older GPU
    assert not runs_on(["8.6"], 8, 0) and runs_on(["8.6"], 8, 9) and not runs_on(["8.6"], 9, 0)
    assert not runs_on(["9.0a"], 10, 0) and runs_on(["10.0f"], 10, 3) and not runs_on(["9.0a+PTX"], 10, 0)
    assert runs_on(["Hopper"], 9, 0) and runs_on(["native"], 8, 0)  # names torch expands: no telling, no warning


def test_the_source_distribution_carries_what_the_build_needs(tmp_path):
    """The sdist once held only the .cpp/.cu files and the package: setup.py's tools/sources.py, the headers, the
    build-config template, CMakeLists.txt, the test helpers and the licence were missing, and it did not build.
    Every file of those folders in this checkout must be in it (the file list is read, nothing is compiled)."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist",
                             "--dist-dir", str(tmp_path)], cwd=root,
                            capture_output=True, text=True, env={**__import__("os").environ, "PEFTTORCH_CUDA": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    (archive,) = tmp_path.glob("pefttorch-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"LICENSE", "README.md", "CMakeLists.txt", "setup.py", "pyproject.toml"}
    for folder, pattern in (("csrc", "**/*"), ("tools", "*.py"), ("tests", "*.py")):
        wanted |= {str(p.relative_to(root)) for p in (root / folder).glob(pattern)
                   if p.is_file() and "__pycache__" not in p.parts}
    assert not wanted - names, sorted(wanted - names)
    assert not any(name.endswith(".so") for name in names)


def test_import_leaves_transformers_and_dynamo_unloaded():
    """`import pefttorch` costs about what `import torch` does: the Trainer callbacks (transformers' Trainer pulls in
    peft) and torch.compiler.disable (dynamo) load on first use; together they took ~6 s of ~10 s."""
    import subprocess
    import sys

    code = ("import sys, pefttorch; heavy = ('transformers', 'peft', 'torch._dynamo'); "
            "print([m for m in heavy if m in sys.modules]); "
            "print(pefttorch.RankAllocationCallback.__mro__[1].__name__, pefttorch.DensityLossCallback.__name__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:2] == ["[]", "TrainerCallback DensityLossCallback"]


def test_the_lazy_callbacks_are_listed_only_where_they_load():
    """With transformers installed they show in dir() and `import *`; without it (the hf extra is optional)
    `import *` listed them and raised, and asking for one says what to install."""
    import subprocess
    import sys

    code = ("import sys{block}; import pefttorch; names = {{}}; exec('from pefttorch import *', names); "
            "print('RankAllocationCallback' in names, 'DensityLossCallback' in dir(pefttorch))\n"
            "try:\n    pefttorch.DensityLossCallback; print('loaded')\n"
            "except ImportError as e:\n    print(e)")
    needs = "pefttorch's Trainer callbacks need transformers: pip install 'pefttorch[hf]'"
    without = "; sys.modules['transformers'] = None"
    for block, want in (("", ["True True", "loaded"]), (without, ["False False", needs])):
        result = subprocess.run([sys.executable, "-c", code.format(block=block)], capture_output=True, text=True,
                                check=True)
        assert result.stdout.split("\n")[:2] == want
