"""The LoRA benchmark harness: rows, ratios, mismatch flagging, JSON, --compare (tiny shapes, CPU)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

import pefttorch
from pefttorch.bench import adapter, lora, model, rank, sparse
from pefttorch.bench.model import ModelShape
from pefttorch.cli import main

TINY = lora.Shape(32, 24, 16, 4, 0.1)



def usage_error(argv, capsys) -> str:
    """Runs the command, which must stop as argparse stops on a bad value (status 2, the message on stderr; status 1
    is a failed check of a benchmark's); returns what it printed there."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err

def test_rows_ratios_and_accuracy():
    rows = lora.run_shape(TINY, ["base", "torch", "pefttorch"], torch.float32, torch.device("cpu"), repeat=1)
    assert {(r.impl, r.mode) for r in rows} == {(i, m) for i in ("base", "torch", "pefttorch") for m in lora.MODES}
    for r in rows:
        assert r.ok, r.note
        assert r.ms > 0 and r.tokens_per_s > 0
        assert r.ratio_to_base == pytest.approx(r.ms / next(
            b.ms for b in rows if b.impl == "base" and b.mode == r.mode))


def test_wrong_implementation_is_flagged_not_reported_as_a_win(monkeypatch):
    real_build = lora.build

    def wrong_build(impl, shape, w, dtype, device):
        layer = real_build(impl, shape, w, dtype, device)
        if impl == "torch":  # drops the low-rank update: fast, and wrong
            lin = real_build("base", shape, w, dtype, device)
            layer.call = layer.eval_call = lin.call
        return layer

    monkeypatch.setattr(lora, "build", wrong_build)
    rows = lora.run_shape(TINY, ["base", "torch"], torch.float32, torch.device("cpu"), repeat=1)
    wrong = [r for r in rows if r.impl == "torch"]
    assert wrong and all(not r.ok for r in wrong)
    assert any(r.note.startswith("y:") for r in wrong)  # the accuracy check names what differs


def test_shape_parsing():
    assert lora.Shape.parse("8192x4096x11008r64p0.1") == lora.Shape(8192, 4096, 11008, 64, 0.1)
    assert lora.Shape.parse("16x8x8r2").dropout == 0.0
    with pytest.raises(ValueError, match="TOKENSxINxOUTrRANK"):
        lora.Shape.parse("8192x4096")


def test_cli_json_plot_and_compare(tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["bench", "lora", "--device", "cpu", "--shapes", "16x20x12r3p0.2", "--impls", "base,pefttorch",
            "--repeat", "1", "--json", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert {"date", "device", "torch", "pefttorch", "peft", "commit", "build", "dtype"} <= set(data["meta"])
    rows = data["suites"]["lora"]["rows"]
    assert {r["impl"] for r in rows} == {"base", "pefttorch"}
    assert all({"shape", "mode", "ms", "ratio_to_base", "ok", "tokens_per_s", "peak_mib"} <= set(r) for r in rows)
    assert (tmp_path / "r-lora.png").stat().st_size > 0
    assert main([*args, "--json", str(tmp_path / "r2.json"), "--compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "change against" in printed and "pefttorch" in printed and "%" in printed


def test_cli_rejects_unknown_suite_and_impl(capsys):
    assert "unknown suite(s) ['nope']" in usage_error(["bench", "nope", "--device", "cpu"], capsys)
    assert "unknown implementations" in usage_error(["bench", "lora", "--device", "cpu", "--impls", "nope", "--quick"],
                                                    capsys)
    # a bad shape is a message, not a traceback
    assert re.search(r"lora: bad shape 'bogus': expected TOKENSxINxOUTrRANK",
                     usage_error(["bench", "lora", "--device", "cpu", "--shapes", "bogus"], capsys))


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "lora", "--device", "gpu"], "not a device: 'gpu'"),
    (["bench", "lora", "--device", "cuda:99"], "cuda:99"),
    (["bench", "lora", "--device", "cpu", "--repeat", "0"], "--repeat: must be >= 1, got 0"),
    (["bench", "sparse", "--device", "cpu", "--tokens", "a"], "sparse: --tokens 'a': expected comma-separated"),
    (["bench", "sparse", "--device", "cpu", "--densities", "x"], "sparse: --densities 'x': expected comma-separated"),
    (["bench", "model", "--device", "cpu", "--steps", "-1"], "--steps: must be >= 1, got -1"),
    (["bench", "model", "--device", "cpu", "--steps", "0"], "--steps: must be >= 1, got 0"),  # was the default
    (["bench", "meft", "--device", "cpu", "--bottleneck", "0"], "--bottleneck: must be >= 1"),
    (["bench", "model", "--device", "cpu", "--dropout", "1.5"], "--dropout: must be in [0, 1)"),
    (["demo", "--batch-size", "0"], "--batch-size: must be >= 1"),
    (["demo", "--batch-size", "5000"], "--batch-size 5000: the task has"),  # once after loading and evaluating
    (["demo", "--lr", "-1"], "--lr: must be > 0"),
    (["demo", "--density-loss", "nan"], "--density-loss: must be finite"),
    (["demo", "--density-loss", "-1"], "--density-loss: must be >= 0"),
    (["demo", "--method", "meft1", "--density-loss", "1"], "--density-loss goes with --method lora"),
    (["demo", "--steps", "-5"], "--steps: must be >= 1"),
    (["demo", "--r", "0"], "--r: must be >= 1"),
])
def test_cli_refuses_bad_values_before_running(argv, message, capsys):
    """Each once ran into a traceback (IndexError, ZeroDivisionError, torch's device parser), or silently did
    something else (a 0 taken as the default)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["lora", "--shapes", "8x16x16r2", "--impls", ","], "no implementations named in ','"),
    (["lora", "--shapes", "8x16x16r2", "--impls", ""], "no implementations named in ''"),
    (["rank", "--runs", ","], "--runs ',' names no run"),
])
def test_cli_refuses_an_empty_list(tmp_path, capsys, argv, message):
    """--impls "," ran nothing and exited 0, with an empty table, JSON and plot."""
    err = usage_error(["bench", *argv, "--device", "cpu", "--json", str(tmp_path / "r.json")], capsys)
    assert message in err and not (tmp_path / "r.json").exists()


def test_rank_suite_refuses_a_target_increlora_starts_at(tmp_path, capsys):
    """--r 1 is IncreLoRA's starting rank: no allocation event can happen, and the run was flagged after it was made."""
    err = usage_error(["bench", "rank", "--device", "cpu", "--r", "1", "--quick", "--steps", "1", "--json",
                       str(tmp_path / "r.json")], capsys)
    assert "rank: --r 1 is IncreLoRA's starting rank" in err and "rank:" not in err.split("error:")[0]
    assert not (tmp_path / "r.json").exists()


def test_results_name_the_cpu():
    """platform.processor() is empty on Linux: CPU results said just "cpu"."""
    from pefttorch.bench import report

    assert report.metadata(torch.device("cpu"), torch.float32)["device"] not in ("", "cpu")


@pytest.mark.parametrize("shape", ["8x16x16r0", "8x0x16r4", "0x16x16r4", "8x16x16r4p1"])
def test_cli_refuses_empty_lora_shapes(shape, capsys):
    assert "must be >= 1" in usage_error(["bench", "lora", "--device", "cpu", "--shapes", shape], capsys)


def test_cli_refuses_empty_sparse_shapes(capsys):
    assert "sizes must be >= 1" in usage_error(["bench", "sparse", "--device", "cpu", "--shapes", "0x16:silu",
                                                "--tokens", "1", "--densities", "1"], capsys)


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_cli_checks_where_results_go_before_running(tmp_path, option, capsys):
    """An unwritable results path once failed after the whole benchmark had run, the results lost."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = usage_error(["bench", "lora", "--device", "cpu", "--shapes", "8x16x16r2", option, str(blocker / "out.x"),
                       *(["--json", str(tmp_path / "r.json")] if option == "--plot" else [])], capsys)
    assert f"{option} {blocker}" in err and "lora:" not in err  # no progress bar: nothing ran


@pytest.fixture
def read_only_file(tmp_path):
    """An existing file that cannot be written: chmod 444, and for root (whom the mode does not stop) chattr +i."""
    import os
    import subprocess

    path = tmp_path / "old.json"
    path.write_text("{}")
    path.chmod(0o444)
    immutable = False
    if os.access(path, os.W_OK):
        immutable = subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0
        if not immutable or os.access(path, os.W_OK):
            pytest.skip("cannot make a file read-only here")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_cli_checks_an_existing_results_file_can_be_written(tmp_path, read_only_file, capsys):
    """Only the --json file's directory was checked: a read-only file there failed with a traceback after the run,
    everything measured lost."""
    err = usage_error(["bench", "lora", "--device", "cpu", "--shapes", "8x16x16r2", "--impls", "base", "--json",
                       str(read_only_file)], capsys)
    assert f"--json {read_only_file}: the file exists and cannot be written" in err and "lora:" not in err
    assert read_only_file.read_text() == "{}"


@pytest.mark.parametrize(("plot", "message"), [
    ("p.xyz", "matplotlib cannot write '.xyz' files; use one of"),
    ("r.png", "the same file as --json"),
])
def test_cli_checks_the_plot_file_before_running(tmp_path, capsys, plot, message):
    """A --plot in a format matplotlib cannot write, or the --json file itself, failed at the save, after the run."""
    err = usage_error(["bench", "lora", "--device", "cpu", "--shapes", "8x16x16r2", "--impls", "base", "--json",
                       str(tmp_path / "r.png"), "--plot", str(tmp_path / plot)], capsys)
    assert message in err and "lora:" not in err and not (tmp_path / "r.png").exists()


def test_plot_paths_keep_the_suffix_given():
    """--plot fig.svg gave an SVG for one suite, but PNGs for several."""
    import argparse

    from pefttorch.bench import cli

    args = argparse.Namespace(plot=Path("out/fig.svg"), json=Path("r.json"))
    assert cli._plot_path(args, "lora", 1) == Path("out/fig.svg")
    assert cli._plot_path(args, "lora", 2) == Path("out/fig-lora.svg")
    args.plot = Path("out/fig")  # matplotlib's default format, said in the name
    assert cli._plot_path(args, "sparse", 2) == Path("out/fig-sparse.png")


@pytest.mark.parametrize(("module", "suite"), [("rich", "lora"), ("matplotlib", "lora"), ("transformers", "rank")])
def test_bench_without_its_extras_says_what_to_install(tmp_path, monkeypatch, capsys, module, suite):
    """`pip install .` leaves out the [bench] extra: the command died with a ModuleNotFoundError traceback (without
    matplotlib, after the suite had run)."""
    monkeypatch.setitem(sys.modules, module, None)  # what importing a module that is not installed does
    out = tmp_path / "r.json"
    assert main(["bench", suite, "--device", "cpu", "--shapes", "8x16x16r2", "--impls", "base", "--steps", "1",
                 "--json", str(out)]) == 2
    assert (f"pefttorch bench needs the bench extras ({module} is missing): pip install 'pefttorch[bench]'"
            in capsys.readouterr().out)
    assert not out.exists()


@pytest.mark.parametrize(("suites", "option", "message"), [
    (["sparse", "lora"], ["--impls", "foo"], "unknown implementations ['foo']"),
    (["lora", "sparse"], ["--tokens", "0"], "token counts positive"),
    (["lora", "rank"], ["--runs", "nope"], "unknown runs"),
])
def test_every_suites_values_are_checked_before_the_first_runs(tmp_path, capsys, suites, option, message):
    """A value only the second suite reads was checked when its turn came: the first suite ran in full, then the
    command failed and its results were never written."""
    err = usage_error(["bench", *suites, "--device", "cpu", "--json", str(tmp_path / "r.json"), *option], capsys)
    assert message in err and not (tmp_path / "r.json").exists() and "lora:" not in err


def test_runs_naming_none_of_a_suites_runs_skip_it_among_several(tmp_path, monkeypatch, capsys):
    """--runs' help says each suite makes the runs named that are its own; one with none named stopped the command."""
    monkeypatch.setattr(model, "CPU_SHAPE", TINY_LLAMA)
    out = tmp_path / "r.json"
    assert main(["bench", "model", "rank", "--device", "cpu", "--runs", "full", "--steps", "1", "--json",
                 str(out)]) == 0
    assert "rank: --runs names none of its runs, skipped" in capsys.readouterr().out
    assert list(json.loads(out.read_text())["suites"]) == ["model"]


# The suites that read each option that only some read, as its help says, and a value of it; every suite reads the
# others (EVERY_SUITE_READS)
SUITE_OPTIONS = {"--shapes": (("lora", "sparse", "adapter"), "8x16x16r2"), "--impls": (("lora",), "base"),
                 "--runs": (("model", "meft", "rank"), "full"), "--repeat": (("lora", "sparse", "adapter"), "1"),
                 "--tokens": (("sparse",), "1"), "--densities": (("sparse",), "0.5"),
                 "--steps": (("model", "meft", "rank"), "1"), "--r": (("model", "meft", "rank"), "2"),
                 "--dropout": (("model", "meft", "rank"), "0"), "--bottleneck": (("meft",), "8"),
                 "--stream-dtype": (("meft",), "float32"), "--small-model": (("model", "meft", "rank"), None)}
EVERY_SUITE_READS = {"--device", "--dtype", "--quick", "--json", "--plot", "--compare"}


def test_every_option_is_read_by_every_suite_or_checked():
    """An option added for some suites only, and left out of the check, is ignored in silence by the others."""
    import argparse

    from pefttorch.bench import cli as bench_cli

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    options = {a.option_strings[0] for a in parser._actions if a.option_strings and a.option_strings[0] != "-h"}
    assert options == set(SUITE_OPTIONS) | EVERY_SUITE_READS


@pytest.mark.parametrize("option", SUITE_OPTIONS)
def test_options_no_selected_suite_reads_are_refused(tmp_path, option, capsys):
    """`bench sparse --runs increlora` ran the sparse suite and ignored --runs without a word; so did rank with --repeat
    or --impls (whose default, all implementations, hid whether it was given), and lora with --small-model,
    --stream-dtype or --dropout."""
    import argparse

    from pefttorch.bench import cli as bench_cli

    readers, value = SUITE_OPTIONS[option]
    given = [option] if value is None else [option, value]
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    for suite in bench_cli.SUITES:
        if suite in readers:  # passes the check (running the suite is for its own tests)
            bench_cli._check_suite_options(parser.parse_args([suite, *given]), [suite])
            continue
        out = tmp_path / "r.json"
        err = usage_error(["bench", suite, "--device", "cpu", "--json", str(out), *given], capsys)
        assert f"{option} applies to the {', '.join(readers)} suite(s); none of them is selected" in " ".join(
            err.split()), suite
        assert not out.exists()


def test_an_interrupted_run_leaves_a_file_that_says_so(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the second suite printed a traceback and left a file of the first suite's results that nothing told
    from a whole run; --compare against it printed an empty section for the missing suite."""
    from pefttorch.bench import cli as bench_cli

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_cli, "_run_model", interrupted)
    out = tmp_path / "r.json"
    lora_args = ["--device", "cpu", "--shapes", "8x16x16r2", "--impls", "base", "--repeat", "1"]
    assert main(["bench", "lora", "model", *lora_args, "--json", str(out)]) == 130
    assert "pefttorch bench: interrupted" in capsys.readouterr().err
    data = json.loads(out.read_text())
    assert data["meta"]["suites"] == ["lora", "model"] and data["meta"]["complete"] is False
    assert list(data["suites"]) == ["lora"] and not list(tmp_path.glob("*.part"))
    monkeypatch.undo()
    sparse_args = ["--shapes", "8x16:relu", "--tokens", "4", "--densities", "1", "--repeat", "1"]
    assert main(["bench", "sparse", "--device", "cpu", *sparse_args, "--json", str(tmp_path / "r2.json"),
                 "--compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the earlier run was cut short: it has results for lora of lora, model" in printed
    assert "the earlier run has no sparse results" in printed
    assert json.loads((tmp_path / "r2.json").read_text())["meta"]["complete"] is True


def test_a_run_cut_short_in_its_first_suite_leaves_a_file_that_says_so(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or an error) in the first suite left the previous run's file at --json, still marked complete, and a
    later --compare compared with it as if it were this run's."""
    from pefttorch.bench import cli as bench_cli

    out = tmp_path / "r.json"
    out.write_text(json.dumps({"meta": {"date": "the previous run", "suites": ["lora"], "complete": True},
                               "suites": {"lora": {"rows": []}}}))

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_cli, "_run_lora", interrupted)
    args = ["bench", "lora", "--device", "cpu", "--shapes", "8x16x16r2", "--impls", "base", "--repeat", "1"]
    assert main([*args, "--json", str(out)]) == 130
    data = json.loads(out.read_text())
    assert data["meta"]["date"] != "the previous run" and data["meta"]["complete"] is False
    assert data["meta"]["suites"] == ["lora"] and data["suites"] == {}
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*args, "--json", str(tmp_path / "r2.json"), "--compare", str(out)]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "the earlier run was cut short: it has results for no suite of lora" in printed
    assert "the earlier run has no lora results" in printed


def test_results_paths_and_compare_file_are_checked_before_running(tmp_path, capsys):
    """A --json naming a directory failed after the run (IsADirectoryError, results lost); a --compare file that is
    JSON but not results failed after it too; a --plot without a suffix was printed as written, matplotlib had
    added .png."""
    (tmp_path / "dir").mkdir()
    args = ["bench", "lora", "--device", "cpu", "--shapes", "8x16x16r2", "--impls", "base"]
    assert "is a directory" in usage_error([*args, "--json", str(tmp_path / "dir")], capsys)
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "not a results file" in usage_error([*args, "--json", str(tmp_path / "r.json"), "--compare",
                                                str(tmp_path / "list.json")], capsys)
    assert main([*args, "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "noext")]) == 0
    assert f"plot: {tmp_path / 'noext.png'}" in capsys.readouterr().out.replace("\n", "")
    assert (tmp_path / "noext.png").exists()


@pytest.mark.parametrize(("results", "message"), [
    ({"meta": {}, "suites": {"lora": {"rows": [{"shape": "8x8->8 r1 p0", "impl": "base", "ms": 1.0}]}}},
     "a lora row is not one of pefttorch bench's (each names shape, mode, impl and a time ms)"),
    ({"meta": [], "suites": {"lora": {"rows": []}}}, "meta is not an object"),
    ({"meta": {"suites": 5, "complete": False}, "suites": {}}, "meta's suites is not a list of names: 5"),
    ({"meta": {"suites": ["lora", 1], "complete": False}, "suites": {}}, "meta's suites is not a list of names"),
    ({"meta": {"suites": ["lora"], "complete": "no"}, "suites": {}}, "meta's complete is not true or false: 'no'"),
    ({"suites": {"lora": []}}, "suite 'lora' is not an object with a list of rows"),
    ({"suites": {"lora": {"rows": [[1]]}}}, "a lora row is not one of pefttorch bench's"),
    ({"suites": {"lora": {"rows": [{"shape": "s", "mode": "fwd", "impl": "base", "ms": "1"}]}}}, "a time ms"),
    ({"suites": {"rank": {"rows": [{"run": ["x"], "mean_ms": 1.0}]}}}, "a rank row is not one of"),
])
def test_compare_file_rows_are_checked_before_running(tmp_path, capsys, results, message):
    """--compare checked only for a "suites" object: rows or meta of another shape (meta's suites not a list of names,
    too) crashed the comparison at the very end, a traceback after the run."""
    old = tmp_path / "old.json"
    old.write_text(json.dumps(results))
    err = usage_error(["bench", "lora", "--device", "cpu", "--shapes", "8x16x16r2", "--impls", "base", "--json",
                       str(tmp_path / "r.json"), "--compare", str(old)], capsys)
    assert message in " ".join(err.split()) and not (tmp_path / "r.json").exists()


def test_compare_reads_the_repositorys_own_results():
    from pefttorch.bench import cli

    files = sorted((Path(__file__).parents[1] / "bench" / "results").glob("*.json"))
    if not files:  # the source distribution leaves the results out
        pytest.skip("no bench/results here")
    for path in files:
        assert cli._read_compare(path)["suites"]


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plot functions make, kept instead of written."""
    from pefttorch.bench import report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    yield figures
    import matplotlib.pyplot as plt

    for fig in figures:
        plt.close(fig)


META = {"dtype": "float32", "device": "cpu", "device_type": "cpu", "torch": "2", "pefttorch": "0", "peft": None}


def test_plots_without_their_reference_run_show_the_times(tmp_path, drawn, capsys):
    """The model/meft plot drew every run at 0 without full fine-tuning; the lora plot was empty without base (the
    JSON had the times)."""
    from rich.console import Console

    from pefttorch.bench import report

    runs = [{"run": "meft1", "step_ms": 30.0, "ratio_to_full": None, "peak_gib": None, "ok": True, "note": ""},
            {"run": "pefttorch", "step_ms": 20.0, "ratio_to_full": None, "peak_gib": None, "ok": True, "note": ""}]
    report.plot_model(tmp_path / "m.png", META, runs)
    ax = drawn[-1].axes[0]
    assert [p.get_height() for p in ax.patches] == [30.0, 20.0] and ax.get_ylabel() == "step ms"
    rows = [{"shape": "s", "mode": mode, "impl": impl, "ms": ms, "ratio_to_base": None, "ok": True,
             "peak_mib": None} for mode in ("fwd", "fwd+bwd") for impl, ms in (("peft", 2.0), ("pefttorch", 1.0))]
    report.plot(tmp_path / "l.png", META, rows, ["peft", "pefttorch"])
    ax = drawn[-1].axes[0]
    assert [p.get_height() for p in ax.patches] == [2.0, 1.0] and ax.get_ylabel() == "fwd: ms"
    console = Console(width=200, record=True)
    report.print_table(META, rows, ["peft", "pefttorch"], [], console)
    report.print_model_table(META, "t", runs, [], console)
    text = console.export_text()
    assert "peft ms" in text and "(/base)" not in text and "/ full" not in text
    # with the reference, the ratios as before
    runs = [{**r, "ratio_to_full": r["step_ms"] / 40} for r in runs]
    report.plot_model(tmp_path / "m.png", META, [{"run": "full", "step_ms": 40.0, "ratio_to_full": 1.0}, *runs])
    assert [p.get_height() for p in drawn[-1].axes[0].patches] == [1.0, 0.75, 0.5]


def test_compare_says_when_the_runs_differ_in_what_rows_do_not_name(tmp_path, capsys):
    """A bfloat16 run compared with a float32 file printed its rows' changes as if of the same thing."""
    args = ["bench", "lora", "--device", "cpu", "--shapes", "8x16x16r2", "--impls", "base"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--json", str(tmp_path / "b.json"), "--dtype", "bf16", "--compare",
                 str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "the earlier run's dtype was float32, this one's bfloat16" in " ".join(out.split())


def test_compare_with_older_cpu_results_says_no_difference():
    """Older CPU results name the device "cpu", newer ones the CPU's model: the comparison said the rows compared
    different things."""
    import io

    from rich.console import Console

    from pefttorch.bench import cli

    def notes(old_meta, now_meta):
        console = Console(file=io.StringIO(), width=200)
        cli.compare(console, {"meta": old_meta, "suites": {}}, {}, now_meta)
        return console.file.getvalue().count("note:")

    now = {"device": "Intel(R) Xeon(R) Processor", "device_type": "cpu", "dtype": "float32"}
    assert notes({"device": "cpu", "device_type": "cpu", "dtype": "float32"}, now) == 0
    assert notes({"device": "cpu", "dtype": "float32"}, now) == 0  # no device_type: "cpu" says it
    assert notes({"device": "cpu", "device_type": "cpu", "dtype": "float32"},
                 {"device": "NVIDIA H200", "device_type": "cuda", "dtype": "float32"}) == 1
    assert notes({"device": "AMD EPYC", "device_type": "cpu", "dtype": "float32"}, now) == 1  # two CPUs named


def test_compare_names_rows_of_one_run_only():
    """Rows without a counterpart in the earlier run (another implementation, shape or run), and the earlier run's
    rows this one has not, were left out without a word: the change of every row was promised."""
    import io

    from rich.console import Console

    from pefttorch.bench import cli

    def row(impl, ms):
        return {"shape": "8x16->16 r2 p0", "mode": "fwd", "impl": impl, "ms": ms}

    old = {"meta": {}, "suites": {"lora": {"rows": [row("base", 1.0), row("torch", 2.0), row("peft", None)]}}}
    now = {"lora": {"rows": [row("base", 1.5), row("pefttorch", 0.5), row("peft", 3.0)]}}
    console = Console(file=io.StringIO(), width=200)
    cli.compare(console, old, now)
    out = " ".join(console.file.getvalue().split())
    assert "1.000 -> 1.500 ms (+50.0%)" in out
    assert "note: lora 8x16->16 r2 p0 fwd pefttorch is new: the earlier run has no figure for it (now 0.500 ms)" in out
    assert "note: lora 8x16->16 r2 p0 fwd torch is gone: this run has no figure for it (earlier 2.000 ms)" in out
    assert "note: lora 8x16->16 r2 p0 fwd peft: no change to give (earlier no time, now 3.000 ms)" in out
    # a row given twice in this run (--shapes naming a shape twice) is compared both times, not called new
    console = Console(file=io.StringIO(), width=200)
    cli.compare(console, old, {"lora": {"rows": [row("base", 1.5), row("base", 0.5)]}})
    out = " ".join(console.file.getvalue().split())
    assert "1.000 -> 1.500 ms (+50.0%)" in out and "1.000 -> 0.500 ms (-50.0%)" in out and "base is new" not in out


def test_the_commit_is_pefttorchs_own_checkouts_only(tmp_path, monkeypatch):
    """An installed copy inside another project's checkout (a venv in its tree) recorded that project's commit."""
    import subprocess

    from pefttorch.bench import report

    repo = tmp_path / "project"
    (repo / "venv" / "pefttorch" / "bench").mkdir(parents=True)
    (repo / "pefttorch" / "bench").mkdir(parents=True)
    for cmd in (["init", "-q"], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m",
                                  "x"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True)
    monkeypatch.setattr(report, "__file__", str(repo / "venv" / "pefttorch" / "bench" / "report.py"))
    assert report._git_commit() is None
    monkeypatch.setattr(report, "__file__", str(repo / "pefttorch" / "bench" / "report.py"))  # its own checkout
    assert report._git_commit() is not None


def test_cli_reads_the_compare_file_before_running(tmp_path, capsys):
    """A missing --compare file once failed with a traceback after the whole benchmark had run."""
    results = tmp_path / "r.json"
    err = usage_error(["bench", "lora", "--device", "cpu", "--shapes", "8x16x16r2", "--json", str(results),
                       "--compare", str(tmp_path / "missing.json")], capsys)
    assert "--compare" in err and not results.exists()


@pytest.mark.slow
def test_model_bench_cross_checks_the_lora_runs(tmp_path):
    out = tmp_path / "m.json"
    assert main(["bench", "model", "--device", "cpu", "--runs", ",".join(model.RUNS), "--steps",
                 "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    runs = {r["run"]: r for r in data["suites"]["model"]["rows"]}
    assert (tmp_path / "m-model.png").stat().st_size > 0
    assert set(runs) == {"full", "peft", "peft+accelerate", "pefttorch", "pefttorch+fused", "full+fused"}
    assert all(r["ok"] and r["step_ms"] > 0 for r in runs.values())
    # the LoRA runs start from the same adapter weights: same losses, step by step (fused norms and RoPE included:
    # in float32 they differ only in summation order)
    for name in ("peft+accelerate", "pefttorch", "pefttorch+fused"):
        assert runs[name]["losses"] == pytest.approx(runs["peft"]["losses"], rel=1e-4)
    assert runs["full+fused"]["losses"] == pytest.approx(runs["full"]["losses"], rel=1e-4)
    assert not pefttorch.integrations.rotary._switched  # the global switch was undone after its run
    assert runs["pefttorch"]["trainable"] == runs["peft"]["trainable"] < runs["full"]["trainable"]


def test_step_time_median_is_the_middle_of_an_even_count():
    """The model and rank suites' median was the upper one: of two steps, the slower, above their mean."""
    assert model.median([1000.0, 3000.0]) == 2000.0
    assert model.median([4.0, 1.0, 3.0, 2.0]) == 2.5 and model.median([3.0, 1.0, 2.0]) == 2.0


def test_live_tensor_bytes_follows_storages_until_freed():
    from pefttorch.bench.timing import LiveTensorBytes

    kept = torch.zeros(1000, dtype=torch.uint8)
    with LiveTensorBytes(torch.device("cpu"), [kept, kept[10:]]) as live:
        assert live.current == 1000  # a view of a tensor already followed is not counted again
        a = torch.empty(1 << 20, dtype=torch.uint8)
        view = a[5:]
        assert live.current == 1000 + (1 << 20)
        del a, view
        assert live.current == 1000  # freed with its last reference
        b = torch.ones(3 << 20, dtype=torch.uint8)
        # a custom op's output is seen like any other
        y = pefttorch.functional.lora_linear(torch.randn(4, 8), torch.randn(6, 8), torch.randn(2, 8),
                                             torch.randn(6, 2))
    assert live.peak >= 1000 + (3 << 20) + y.numel() * 4
    assert live.peak < 1000 + (4 << 20) + (1 << 16)  # the 1 MiB tensor had gone before the 3 MiB one came
    del b


@pytest.mark.slow
def test_meft_suite_measures_memory_and_flags_inaccurate_reconstructions(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model, "CPU_SHAPE", ModelShape(hidden=32, layers=6, mlp=48, vocab=64, heads=2, batch=2, seq=8))
    out = tmp_path / "e.json"
    # float32 streams through float32 layers: six layers, each dividing by lam = 0.1, and the reconstruction is off
    assert main(["bench", "meft", "--device", "cpu", "--steps", "2", "--r", "2", "--bottleneck", "4",
                 "--stream-dtype", "float32", "--json", str(out)]) == 1
    suite = json.loads(out.read_text())["suites"]["meft"]
    runs = {r["run"]: r for r in suite["rows"]}
    assert list(runs) == list(model.MEFT_RUNS)
    assert suite["bottleneck"] == 4 and suite["stream_dtype"] == "float32"
    for name in ("full", "pefttorch", "pefttorch+gc", "peft+gc"):
        assert runs[name]["ok"], (name, runs[name]["note"])  # the LoRA runs' losses equal HF PEFT's
        assert runs[name]["reconstruction_error"] is None
    assert runs["pefttorch+gc"]["losses"] == pytest.approx(runs["pefttorch"]["losses"], rel=1e-4)
    # peak memory on the CPU too: checkpointing and MEFT keep less than LoRA, which keeps less than full tuning
    peak = {name: r["peak_gib"] for name, r in runs.items()}
    assert peak["pefttorch+gc"] < peak["pefttorch"] < peak["full"]
    assert all(peak[v] < peak["pefttorch"] for v in model.MEFT_VARIANTS)
    for v in model.MEFT_VARIANTS:
        r = runs[v]
        assert r["trainable"] > 0 and r["ratio_to_lora"] == pytest.approx(r["step_ms"] / runs["pefttorch"]["step_ms"])
        assert not r["ok"] and r["reconstruction_error"] > 1e-3 and "reconstruction error" in r["note"]
    targets = {t["target"]: t["met"] for t in suite["targets"]}
    assert len(targets) == 2 * len(model.MEFT_VARIANTS) and not any(targets.values())  # a flagged run meets none
    printed = capsys.readouterr().out
    assert "recon. error" in printed and "gradients inaccurate" in printed and "reversible backward" not in printed
    # float64 streams (the suite's default) through bfloat16 layers reconstruct two layers to rounding: no flag
    monkeypatch.setattr(model, "CPU_SHAPE", TINY_LLAMA)
    assert main(["bench", "meft", "--device", "cpu", "--dtype", "bf16", "--runs", "meft1,meft3", "--steps", "1",
                 "--bottleneck", "4", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["suites"]["meft"]["rows"]
    assert [r["run"] for r in rows] == ["meft1", "meft3"]
    assert all(r["ok"] and r["reconstruction_error"] < 1e-6 for r in rows)


def test_meft_targets():
    def res(run, ms, peak, ok=True):
        return model.RunResult(run, step_ms=ms, peak_gib=peak, ok=ok)

    results = [res("pefttorch", 100.0, 10.0), res("peft+gc", 140.0, 6.0), res("meft1", 120.0, 5.0),
               res("meft2", 130.0, 7.0), res("meft3", 110.0, 4.0, ok=False)]
    model.compare(results, torch.float32)
    met = {t: m for t, m, _ in model.check_targets(results, "meft")}
    assert met == {"meft1 peak memory <= HF PEFT LoRA + checkpointing's": True,
                   "meft1 step <= 1.25x pefttorch LoRA": True,
                   "meft2 peak memory <= HF PEFT LoRA + checkpointing's": False,
                   "meft2 step <= 1.25x pefttorch LoRA": False,
                   "meft3 peak memory <= HF PEFT LoRA + checkpointing's": False,  # flagged: fast, and wrong
                   "meft3 step <= 1.25x pefttorch LoRA": False}


def test_model_targets_show_the_fused_kernels_against_both_bounds():
    results = [model.RunResult(run, step_ms=ms, peak_gib=1.0) for run, ms in
               [("full", 100.0), ("full+fused", 90.0), ("peft", 140.0), ("pefttorch", 85.0),
                ("pefttorch+fused", 75.0)]]
    model.compare(results, torch.float32)
    met = {t: (m, v) for t, m, v in model.check_targets(results)}
    assert met["pefttorch LoRA step <= 0.80x full fine-tuning"] == (False, "0.850x")
    assert met["pefttorch LoRA + fused norms/RoPE step <= 0.80x full fine-tuning"] == (True, "0.750x")
    # against full fine-tuning with the same kernels the win is LoRA's alone: 75 / 90
    assert met["pefttorch LoRA + fused norms/RoPE step <= 0.80x full fine-tuning + fused norms/RoPE"] == (
        False, "0.833x")


# ---- the sparse MLP suite (DEFT decode): tiny MLPs on the CPU

TINY_MLPS = (sparse.MLPShape(32, 96, 24, "silu", gated=True, bias=False),
             sparse.MLPShape(24, 64, 24, "gelu", gated=False, bias=True))


def test_sparse_threshold_hits_the_density_of_neurons_active_for_any_token():
    g = torch.randn(4, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for density in (0.05, 0.25, 0.5):
        thr = sparse.choose_threshold(g, density, torch.float32)
        assert (g.abs() > thr).any(0).double().mean().item() == pytest.approx(density, abs=1e-9)
    assert sparse.choose_threshold(g, 1.0, torch.float32) == 0.0


def test_sparse_wrong_kernels_are_flagged():
    shape = TINY_MLPS[0]
    w = sparse.make_weights(shape, torch.float32, torch.device("cpu"))
    x = torch.randn(4, shape.hidden, generator=torch.Generator().manual_seed(1))
    g, _ = sparse._exact(w, x, shape)
    thr = sparse.choose_threshold(g, 0.25, torch.float32)
    with torch.inference_mode():
        assert sparse.accuracy_note(sparse.CALLS["pefttorch"], w, x, shape, thr) == ""
        assert sparse.accuracy_note(sparse.CALLS["reference"], w, x, shape, thr) == ""
        assert sparse.accuracy_note(sparse.CALLS["dense"], w, x, shape, None) == ""
        # the dense MLP where the masked one is wanted: keeps activations well below the threshold
        assert sparse.accuracy_note(sparse.CALLS["dense"], w, x, shape, thr).startswith("mask:")
        # the right mask, but without the up projection
        no_up = sparse.accuracy_note(lambda w, x, s, t: sparse.CALLS["pefttorch"]({**w, "w_up": None}, x, s, t),
                                     w, x, shape, thr)
        assert no_up.startswith("y:")


def test_sparse_suite_json_plot_and_compare(tmp_path, capsys):
    out = tmp_path / "s.json"
    args = ["bench", "sparse", "--device", "cpu", "--shapes", "32x96:silu:gated,24x64x16:gelu:bias",
            "--tokens", "1,5", "--densities", "0.25,1", "--repeat", "1", "--json", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert {"date", "device", "torch", "pefttorch", "commit", "dtype"} <= set(data["meta"])
    suite = data["suites"]["sparse"]
    rows = suite["rows"]
    assert {r["shape"] for r in rows} == {"32->96->32 silu gated", "24->64->16 gelu bias"}
    assert len(rows) == 2 * 2 * (1 + 2 * 2)  # per MLP and token count: dense, and reference + pefttorch per density
    for r in rows:
        assert r["ok"], (r["impl"], r["shape"], r["tokens"], r["target_density"], r["note"])
        assert {"tokens", "target_density", "density", "token_density", "threshold", "ms", "speedup_vs_dense",
                "tokens_per_s", "weight_copies"} <= set(r)
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["speedup_vs_dense"] > 0
        if r["impl"] != "dense":
            # the threshold leaves the target share of neurons active for some token (to one neuron)
            assert abs(r["density"] - r["target_density"]) <= 1 / r["inter"] + 1e-9
            assert r["token_density"] <= r["density"]
    assert {(c["shape"], c["tokens"]) for c in suite["crossover"]} == {(r["shape"], r["tokens"]) for r in rows}
    assert (tmp_path / "s-sparse.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "sparse MLP" in printed and "MISMATCH" not in printed
    again = ["bench", "sparse", "--device", "cpu", "--shapes", "32x96:silu:gated", "--tokens", "5", "--densities",
             "0.25", "--repeat", "1", "--json", str(tmp_path / "s2.json"), "--compare", str(out)]
    assert main(again) == 0
    printed = capsys.readouterr().out
    assert "change against" in printed and "32->96->32 silu gated 5 0.25 pefttorch" in printed


def test_sparse_shape_parsing(capsys):
    assert sparse.MLPShape.parse("4096x11008:silu:gated") == sparse.MLPShape(4096, 11008, 4096, "silu", True, False)
    assert sparse.MLPShape.parse("1024x4096x512:gelu:bias") == sparse.MLPShape(1024, 4096, 512, "gelu", False, True)
    with pytest.raises(ValueError, match="HIDDENxINTER"):
        sparse.MLPShape.parse("4096x11008:tanh")
    assert "densities" in usage_error(["bench", "sparse", "--device", "cpu", "--densities", "0,0.5"], capsys)


# ---- the rank suite (IncreLoRA, AdaLoRA): a tiny Llama on the CPU

TINY_LLAMA = ModelShape(hidden=32, layers=2, mlp=48, vocab=64, heads=2, batch=2, seq=8)


@pytest.mark.parametrize("warmup, steps", [(3, 40), (3, 16), (2, 8), (0, 5), (1, 2)])
def test_rank_plan_puts_the_events_inside_the_timed_steps(warmup, steps):
    p = rank.plan(warmup, steps)
    assert p.total - p.start == steps and p.start - p.offset == warmup and 0 <= p.offset < p.interval
    assert p.start % p.interval == 0 and p.events >= 2
    assert p.start < p.end <= p.total and p.end - p.start <= 0.75 * steps + 1  # the budget ~3/4 through
    for modules in (14, 28, 112):  # IncreLoRA spends the budget at the plan's last event, not before
        kw = rank.increlora_kwargs(8, modules, p)
        per_event = kw["top_h"] * kw["incre_rank_num"]
        assert math.ceil((8 - 1) * modules / per_event) == p.events and kw["top_h"] <= modules
        pefttorch.IncreLoraConfig(**kw, target_modules="all-linear")
    kw = rank.adalora_kwargs(8, p)
    assert kw["init_r"] == 12 and kw["total_step"] - kw["tfinal"] == p.end and kw["tinit"] == p.start
    pefttorch.AdaLoraConfig(**kw, target_modules="all-linear")


def test_rank_suite_json_plot_and_targets(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(model, "CPU_SHAPE", TINY_LLAMA)
    out = tmp_path / "k.json"
    assert main(["bench", "rank", "--device", "cpu", "--steps", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    suite = data["suites"]["rank"]
    assert suite["target_r"] == 8 and suite["steps"] == 4 and suite["plan"]["events"] >= 2
    runs = {r["run"]: r for r in suite["rows"]}
    assert list(runs) == list(rank.RUNS)
    modules = 7 * TINY_LLAMA.layers
    for name, r in runs.items():
        assert r["ok"], (name, r["note"])
        assert {"median_ms", "mean_ms", "peak_gib", "final_rank", "events", "events_timed", "mean_ratio_to_lora",
                "median_ratio_to_lora", "mean_ratio_to_peft", "median_ratio_to_peft", "step_ms"} <= set(r)
        assert len(r["step_ms"]) == 4 and r["mean_ms"] == pytest.approx(sum(r["step_ms"]) / 4)
        assert r["modules"] == modules and r["final_rank"] == r["budget"] == 8 * modules
        assert r["mean_ratio_to_lora"] == pytest.approx(r["mean_ms"] / runs["lora"]["mean_ms"])
        assert r["mean_ratio_to_peft"] == pytest.approx(r["mean_ms"] / runs["peft-adalora"]["mean_ms"])
        if name != "lora":  # ranks moved inside the timed window, and reached the budget there
            assert r["events_timed"] >= 2 and 1 <= r["budget_reached_at"] <= 4
            assert all(e["timed_step"] is not None for e in r["events"])
    trace = runs["increlora"]["rank_trace"]
    assert trace[0] == modules and trace == sorted(trace)  # grows from rank 1
    for name in ("adalora", "peft-adalora"):  # prunes from 12, along the same schedule
        assert runs[name]["initial_rank"] == 12 * modules and runs[name]["rank_trace"] == sorted(
            runs[name]["rank_trace"], reverse=True)
    peft_events = {e["step"]: e["total_rank"] for e in runs["peft-adalora"]["events"]}
    assert all(peft_events.get(e["step"]) == e["total_rank"] for e in runs["adalora"]["events"])
    assert runs["lora"]["events"] == [] and runs["lora"]["mean_ratio_to_lora"] == 1.0
    assert [t["target"].split()[:2] for t in suite["targets"]] == [["IncreLoRA", "mean"], ["pefttorch", "AdaLoRA"]]
    assert (tmp_path / "k-rank.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "rank allocation" in printed and "IncreLoRA mean step" in printed


def test_rank_targets():
    def res(run, mean, ok=True):
        return rank.RankResult(run, median_ms=mean, mean_ms=mean, ok=ok)

    results = [res("lora", 100.0), res("increlora", 104.0), res("adalora", 90.0), res("peft-adalora", 95.0)]
    rank.compare(results)
    assert [met for _, met, _ in rank.check_targets(results)] == [True, True]
    results = [res("lora", 100.0), res("increlora", 106.0), res("adalora", 96.0), res("peft-adalora", 95.0)]
    rank.compare(results)
    assert [(met, measured) for _, met, measured in rank.check_targets(results)] == [(False, "1.060x"),
                                                                                     (False, "1.011x")]
    results = [res("lora", 100.0), res("increlora", 90.0, ok=False)]  # a run that failed meets nothing
    rank.compare(results)
    assert [met for _, met, _ in rank.check_targets(results)] == [False]


def test_rank_runs_without_peft_and_run_names(tmp_path, monkeypatch, capsys):
    from pefttorch.bench import cli

    monkeypatch.setattr(model, "CPU_SHAPE", TINY_LLAMA)
    monkeypatch.setattr(cli, "_peft_missing", lambda: "HF PEFT is not installed")
    out = tmp_path / "k.json"
    assert main(["bench", "rank", "--device", "cpu", "--runs", "adalora,peft-adalora", "--steps", "2", "--r", "2",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["suites"]["rank"]["rows"]
    assert [r["run"] for r in rows] == ["adalora"] and rows[0]["final_rank"] == 2 * 7 * TINY_LLAMA.layers
    assert "peft-adalora is skipped: HF PEFT is not installed" in capsys.readouterr().out
    assert "unknown runs" in usage_error(["bench", "rank", "--device", "cpu", "--runs", "nope"], capsys)
    assert "none of the rank suite's runs" in usage_error(["bench", "rank", "--device", "cpu", "--runs", "full"],
                                                         capsys)


# ---- the bottleneck adapter suite: tiny shapes on the CPU

TINY_ADAPTER = adapter.AdapterShape(48, 32, 8, "gelu")


@pytest.fixture
def small_copy(monkeypatch):
    """The bandwidth measurement on a small copy: the suite's own (hundreds of MiB on a CPU) would dominate."""
    real = adapter.copy_bandwidth
    monkeypatch.setattr(adapter, "copy_bandwidth", lambda device: real(device, copy_bytes=8 << 20, repeat=2))


def test_adapter_suite_json_plot_and_compare(tmp_path, capsys, small_copy):
    out = tmp_path / "a.json"
    args = ["bench", "adapter", "--device", "cpu", "--shapes", "64x32:8,48x24:4:silu", "--repeat", "1",
            "--json", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert {"date", "device", "torch", "pefttorch", "commit", "dtype"} <= set(data["meta"])
    suite = data["suites"]["adapter"]
    assert suite["bandwidth"]["gbps"] > 0 and suite["bandwidth"]["copy_bytes"] == 8 << 20
    assert {"torch", "reference", "pefttorch"} <= set(suite["impls"]) <= set(adapter.IMPLS)
    assert ("adapters" in suite["impls"]) == (suite["adapters_missing"] is None)
    rows = suite["rows"]
    assert {(r["shape"], r["mode"], r["impl"]) for r in rows} == {
        (s, m, i) for s in ("64x32:8 relu", "48x24:4 silu") for m in adapter.MODES for i in suite["impls"]}
    by = {(r["shape"], r["mode"], r["impl"]): r for r in rows}
    for r in rows:
        assert r["ok"], (r["shape"], r["mode"], r["impl"], r["note"])
        assert r["ms"] > 0 and r["tokens_per_s"] > 0 and r["copies"] >= 1
        assert r["ratio_to_torch"] == pytest.approx(r["ms"] / by[(r["shape"], r["mode"], "torch")]["ms"])
        t, d, m = r["tokens"], r["d"], r["bottleneck"]
        weights = 2 * d * m + m + d
        assert r["floor_bytes"] == 4 * (2 * t * d + weights if r["mode"] == "fwd" else 4 * t * d + 2 * weights)
        assert r["floor_ms"] == pytest.approx(r["floor_bytes"] / (suite["bandwidth"]["gbps"] * 1e9) * 1e3)
        assert r["ratio_to_floor"] == pytest.approx(r["ms"] / r["floor_ms"])
    # on the CPU the floor is information, not a target
    assert [t["target"] for t in suite["targets"]][:1] == [
        "pefttorch faster than torch at every shape (fwd and fwd+bwd)"]
    assert not any("floor" in t["target"] for t in suite["targets"])
    assert (tmp_path / "a-adapter.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "bottleneck adapter" in printed and "MISMATCH" not in printed and "not counted on the CPU" in printed
    again = ["bench", "adapter", "--device", "cpu", "--shapes", "64x32:8", "--repeat", "1", "--json",
             str(tmp_path / "a2.json"), "--compare", str(out)]
    assert main(again) == 0
    printed = capsys.readouterr().out
    assert "change against" in printed and "64x32:8 relu fwd+bwd pefttorch" in printed


def test_adapter_wrong_implementations_are_flagged(monkeypatch):
    real_build = adapter.build

    def wrong_build(impl, shape, w):
        layer = real_build(impl, shape, w)
        wd, bd, wu, bu = layer.params
        if impl == "torch":  # drops the activation: fast, and wrong
            layer.call = lambda x: x + adapter.SCALE * torch.nn.functional.linear(
                torch.nn.functional.linear(x, wd, bd), wu, bu)
        elif impl == "reference":  # drops the scale
            layer.call = lambda x: x + torch.nn.functional.linear(
                adapter.reference.ACTIVATIONS[shape.activation](torch.nn.functional.linear(x, wd, bd)), wu, bu)
        return layer

    monkeypatch.setattr(adapter, "build", wrong_build)
    bandwidth = adapter.Bandwidth(1e10, 1 << 20, 0.2)
    rows = adapter.run_shape(TINY_ADAPTER, ["torch", "reference", "pefttorch"], torch.float32, torch.device("cpu"),
                             bandwidth, repeat=1, copies=2)
    for r in rows:
        assert r.ms is not None and r.copies == 2
        if r.impl == "pefttorch":
            assert r.ok, r.note
        else:  # timed, but flagged: never a win
            assert not r.ok and r.note.startswith("y:"), (r.impl, r.note)
    targets = adapter.check_targets(adapter.as_dicts(rows), torch.device("cpu"))
    assert [met for _, met, _ in targets] == [False]  # faster than a wrong baseline is no result


def test_adapter_gradients_are_checked():
    w = adapter.make_set(TINY_ADAPTER, torch.float32, torch.device("cpu"))
    assert w["w_up"].abs().min() > 0  # not the near-identity initialisation: the bottleneck shows in y
    good = adapter.build("pefttorch", TINY_ADAPTER, w)
    assert adapter.accuracy_note(good, w, TINY_ADAPTER) == ""
    # the right y, but b_up held apart from the parameter: its gradient never reaches b_up
    wd, bd, wu, bu = good.params
    frozen_bias = adapter.Layer(lambda x: adapter.functional.bottleneck_adapter(
        x, wd, wu, bd, bu.detach(), residual=x, activation=TINY_ADAPTER.activation, scale=adapter.SCALE), good.params)
    assert adapter.accuracy_note(frozen_bias, w, TINY_ADAPTER).startswith("db_up:")
    # the residual's gradient lost: dx misses the identity
    no_skip = adapter.Layer(lambda x: good.call(x) - x + x.detach(), good.params)
    assert adapter.accuracy_note(no_skip, w, TINY_ADAPTER).startswith("dx:")


def test_adapter_library_missing_is_one_line_and_a_broken_one_a_flagged_row(monkeypatch, capsys, tmp_path,
                                                                            small_copy):
    import importlib.util

    from pefttorch.bench import cli

    monkeypatch.setattr(adapter, "adapters_status", lambda: "AdapterHub adapters cannot be imported (test)")
    out = tmp_path / "a.json"
    assert main(["bench", "adapter", "--device", "cpu", "--shapes", "32x16:4", "--repeat", "1", "--json",
                 str(out)]) == 0
    suite = json.loads(out.read_text())["suites"]["adapter"]
    assert "adapters" not in suite["impls"] and all(r["impl"] != "adapters" for r in suite["rows"])
    assert capsys.readouterr().out.count("AdapterHub adapters cannot be imported (test)") == 1
    assert cli.SUITES[-1] == "adapter"
    if importlib.util.find_spec("adapters") is None:
        # the library absent but its rows asked for: failed rows, not a crashed benchmark
        rows = adapter.run_shape(adapter.AdapterShape(16, 8, 2), ["torch", "adapters"], torch.float32,
                                 torch.device("cpu"), adapter.Bandwidth(1e10, 1 << 20, 0.2), repeat=1, copies=1)
        broken = [r for r in rows if r.impl == "adapters"]
        assert broken and all(not r.ok and r.ms is None and r.note.startswith("failed:") for r in broken)



def test_adapter_shapes_grid_and_floor_target(capsys):
    assert adapter.AdapterShape.parse("8192x4096:256:silu") == adapter.AdapterShape(8192, 4096, 256, "silu")
    assert adapter.AdapterShape.parse(" 512x384:24 ").activation == "relu"
    with pytest.raises(ValueError, match="TOKENSxD:BOTTLENECK"):
        adapter.AdapterShape.parse("8192x4096")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        adapter.AdapterShape.parse("8192x4096:256:tanh")
    with pytest.raises(ValueError, match=">= 1"):
        adapter.AdapterShape.parse("8192x4096:0")
    assert "adapter: bad adapter shape '8192x4096:r16'" in usage_error(
        ["bench", "adapter", "--device", "cpu", "--shapes", "8192x4096:r16"], capsys)
    gpu = adapter.default_grid(torch.device("cuda"), quick=False)
    assert {(s.d, s.bottleneck) for s in gpu} >= {(d, m) for d in (768, 2048, 4096) for m in (64, d // 16)}
    assert {s.tokens for s in gpu} == {8192}
    assert all(s.tokens * s.d <= 512 * 384 for s in adapter.default_grid(torch.device("cpu"), quick=True))
    # on a GPU the floor is a target: 1.3x at most, a mismatch never meets it
    def row(mode, ratio, ok=True):
        return {"shape": "s", "mode": mode, "impl": "pefttorch", "ok": ok, "ms": ratio, "ratio_to_floor": ratio}

    assert adapter.check_targets([row("fwd", 1.2), row("fwd+bwd", 1.29)], torch.device("cuda"))[0][1]
    assert not adapter.check_targets([row("fwd", 1.2), row("fwd+bwd", 1.31)], torch.device("cuda"))[0][1]
    assert not adapter.check_targets([row("fwd", 1.1, ok=False)], torch.device("cuda"))[0][1]
    assert adapter.check_targets([row("fwd", 1.2)], torch.device("cpu")) == []
    assert "not counted on the CPU" in adapter.floor_note([row("fwd", 2.0)], torch.device("cpu"))


def test_host_overhead_script_reports_every_run_and_phase():
    """bench/host_overhead.py (a diagnostic script, not a suite) on a few steps: a row per run and phase, the
    LoRA reference at 1.00x, IncreLoRA both allocating and final."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "host_overhead.py"
    out = subprocess.run([sys.executable, str(script), "lora", "increlora", "full", "--steps", "8", "--warmup", "1",
                          "--repeats", "1"], capture_output=True, text=True, check=True, timeout=600).stdout
    rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines()[2:]}
    assert set(rows) == {("lora", "final"), ("increlora", "allocating"), ("increlora", "final"), ("full", "final")}
    assert rows[("lora", "final")][-1] == "1.00x"
    for cells in rows.values():
        assert float(cells[3]) > 0 and cells[-1].endswith("x")


def test_the_suite_scripts_run_their_own_suite_only(capsys):
    """bench/bench_lora.py sparse ran the sparse suite too (it called `pefttorch bench lora sparse`)."""
    from pefttorch.bench.cli import script_main

    with pytest.raises(SystemExit) as exit_:
        script_main("lora", ["sparse", "--device", "cpu"])
    assert exit_.value.code == 2 and "this script runs the lora suite; for sparse" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        script_main("lora", ["--device", "cpu", "--impls", "foo"])
    assert exit_.value.code == 2 and "unknown implementations ['foo']" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--hidden", "16", "--heads", "5"], "--hidden 16 must split into --heads 5 heads of an even size"),
    (["--hidden", "12", "--heads", "4"], "--hidden 12 must split into --heads 4 heads of an even size"),
    # an odd head count that passes runs: its key/value heads divide it (5 // 2 = 2 failed in SDPA)
    (["--hidden", "20", "--heads", "5", "--layers", "1", "--tokens", "4", "--batch", "1", "--variants", "meft1",
      "--device", "cpu"], None),
])
def test_meft_reconstruction_script_checks_the_shape(argv, message, monkeypatch, capsys):
    """A head count that does not divide the width (or leaves heads of odd size for rotary) is a usage error, not
    transformers' traceback from inside the model."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "bench" / "meft_reconstruction.py"
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    if message is None:
        runpy.run_path(str(script), run_name="__main__")
        assert "| meft1 | float32 |" in capsys.readouterr().out
        return
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_.value.code == 2 and message in capsys.readouterr().err
