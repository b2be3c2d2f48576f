"""Session 38: hostile and careless input found by the session's trials, each fixed with a test
that fails on the code before the fix."""

from __future__ import annotations

import pytest


def test_demo_and_benchmark_refuse_empty_paths(tmp_path, capsys, monkeypatch):
    """`demo -o ''` and `benchmark -o ''` (an unset variable) were read as '.', so the demo wrote its
    segmentation and figure into the working folder; an empty checkpoint was "checkpoint . is a
    directory"."""
    from PAMSegmentLib.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "-o", "", "--method", "copy"]) == 2
    assert "-o is empty (an unset variable?)" in capsys.readouterr().err
    assert main(["demo", "--checkpoint", " ", "-o", str(tmp_path / "d")]) == 2
    assert "--checkpoint is empty" in capsys.readouterr().err
    assert main(["benchmark", "-o", "", "--quick"]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert main(["benchmark", "--official-checkpoint", "", "--quick", "-o", str(tmp_path / "b")]) == 2
    assert "--official-checkpoint is empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


@pytest.mark.parametrize("command", [["info", ""], ["propagate", "IMG", "PRM", "-o", "OUT", "--checkpoint", ""]])
def test_an_empty_checkpoint_path_is_named(command, ct_case, tmp_path, capsys):
    from PAMSegmentLib.cli import main

    names = {"IMG": str(ct_case.image_path), "PRM": str(ct_case.prompt_path), "OUT": str(tmp_path / "o.nii.gz")}
    assert main([names.get(a, a) for a in command]) == 2
    err = capsys.readouterr().err
    assert "checkpoint path is empty (an unset variable?)" in err and "is a directory" not in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_load_model_names_an_empty_path():
    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.errors import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint path is empty"):
        load_model("")


@pytest.mark.parametrize("options, message", [
    (["--isolate", "--in-process"], "not allowed with argument"),
    (["--size", "100000"], "--size 100000 is more than this benchmark measures (at most 4096)"),
    (["--batch-sizes", "1,100000"], "--batch-sizes 100000 is more than this benchmark measures (at most 256)"),
    (["--pairs", "5000"], "--pairs 5000 is more than"),
    (["--parts", "e2e", "--depths", "20", "--objects", "50,17"],
     "every --objects length (50, 17) must be at least 4 slices shorter than a --depths value (20)"),
])
def test_benchmark_options_beyond_what_it_measures_are_refused_at_once(options, message, tmp_path, capsys):
    """--size 100000 ran into a 75 GB allocation named as a propagation's memory ("--range, --label");
    --batch-sizes 100000 ran until killed; objects longer than every depth measured nothing, exit 0;
    --isolate and --in-process together took the last one."""
    from PAMSegmentLib.cli import main

    out = tmp_path / "bench"
    try:
        rc = main(["benchmark", "-o", str(out), *options])
    except SystemExit as exc:  # argparse's own refusal
        rc = exc.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_benchmark_refuses_a_volume_beyond_memory(tmp_path, capsys, monkeypatch):
    from PAMSegmentLib import volumes
    from PAMSegmentLib.cli import main

    monkeypatch.setattr(volumes, "memory_budget", lambda: (2 * 2**30, 2 * 2**30))  # a 2 GB machine
    rc = main(["benchmark", "-o", str(tmp_path / "b"), "--parts", "e2e", "--size", "4096", "--depths", "400"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "the benchmark's largest volume (4096 x 4096 x 400 voxels)" in err and "smaller --size" in err
    assert not (tmp_path / "b").exists()


def _with_provenance(small_checkpoint, path, provenance):
    from PAMSegmentLib.checkpoints import save_checkpoint
    from PAMSegmentLib.preprocess import PreprocessingParams

    net = small_checkpoint.network
    save_checkpoint(path, net, PreprocessingParams(input_size=net.config.input_size), provenance=provenance)
    return path


def test_info_reads_odd_provenance_and_keeps_its_output_short_and_its_json_valid(small_checkpoint, tmp_path, capsys):
    """inference_changes as a number was a TypeError traceback; NaN/inf gave JSON no strict parser
    reads; a record of thousands of values was printed as one line of up to 190 MB; a 41-stage chain
    was shown as 17 stages without a word."""
    import json

    from PAMSegmentLib.cli import main

    chain = {"command": "stage0", "train_seconds": 60}
    for i in range(40):
        chain = {"command": f"stage{i + 1}", "train_seconds": 60, "init_from": {"provenance": chain}}
    cases = {
        "int": {"command": "train", "inference_changes": 5, "iterations": "x" * 10_000},
        "nan": {"command": "train", "loss_ema": float("nan"), "train_seconds": float("inf")},
        "flood": {f"k{i}": "y" * 5000 for i in range(200)},
        "chain": chain,
    }
    for name, provenance in cases.items():
        path = _with_provenance(small_checkpoint, tmp_path / f"{name}.pt", provenance)
        assert main(["info", str(path)]) == 0, name
        out = capsys.readouterr().out
        assert len(out) < 4000, (name, len(out))
        assert main(["info", "--json", str(path)]) == 0
        json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{name}: {c} in the JSON"))
        if name == "int":
            assert "inference parameters changed" not in out and "stage 1: 'xxxx" in out
        if name == "chain":
            assert "earlier stages were cut from the record" in out
        if name == "flood":
            assert "characters; pamsegment info --json)" in out


def test_a_link_to_the_shipped_weights_loads_with_their_card(tmp_path, capsys):
    """A symbolic or hard link to pam_small.pt was refused as a damaged install (the card was looked
    for beside the link's name)."""
    import os

    from PAMSegmentLib.checkpoints import shipped_checkpoint_path
    from PAMSegmentLib.cli import main

    shipped = shipped_checkpoint_path()
    links = [tmp_path / "soft.pt"]
    links[0].symlink_to(shipped)
    try:
        os.link(shipped, tmp_path / "hard.pt")
        links.append(tmp_path / "hard.pt")
    except OSError:  # another file system
        pass
    for link in links:
        assert main(["info", str(link)]) == 0, link
        assert "loads: yes" in capsys.readouterr().out


def test_an_interrupt_while_the_tables_are_written_leaves_the_earlier_run_whole(tmp_path, monkeypatch):
    """Ctrl-C during the plot (2 s) left new CSVs and report beside the earlier run's JSON and plot."""
    from PAMSegmentLib import benchmark as bm

    out = tmp_path / "bench"
    out.mkdir()
    earlier = {name: f"earlier {name}" for name in ("network.csv", "targets.csv", "benchmark.md", "benchmark.json",
                                                      "benchmark.png")}
    for name, text in earlier.items():
        (out / name).write_text(text)

    def interrupted(result, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "_plot", interrupted)
    from dataclasses import asdict

    result = {"machine": bm.machine_info(1), "config": asdict(bm.quick_config()), "network": [], "targets": []}
    with pytest.raises(KeyboardInterrupt):
        bm.write_outputs(result, out)
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier  # no staging folder left either


def test_benchmark_script_refusals_are_one_line(tmp_path):
    """scripts/benchmark.py (the README's headline command) gave a traceback and exit 1 for every
    refused input."""
    import subprocess
    import sys

    from conftest import REPO, _cli_env

    existing = tmp_path / "existing.txt"
    existing.write_text("x")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), "--quick", "-o", str(existing)],
                          capture_output=True, text=True, env=_cli_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "is a file; give a folder for the tables" in proc.stderr


def test_benchmark_refuses_the_other_presets_weights_before_measuring(official_checkpoint, small_checkpoint,
                                                                      tmp_path, capsys):
    from PAMSegmentLib.cli import main

    out = tmp_path / "b"
    assert main(["benchmark", "--quick", "--parts", "network", "--checkpoint", str(official_checkpoint.path),
                 "-o", str(out)]) == 2
    assert "holds the 'official' network, not 'small'; give it as --official-checkpoint" in capsys.readouterr().err
    assert main(["benchmark", "--quick", "--parts", "network", "--official-checkpoint", str(small_checkpoint.path),
                 "-o", str(out)]) == 2
    assert "holds the 'small' network, not 'official'; give it as --checkpoint" in capsys.readouterr().err
    assert not out.exists()


def test_timing_keeps_to_its_budget_without_warm_up_calls():
    """--warmup 0 switched the budget off: 20 calls of 0.2 s against a 0.5 s budget all ran."""
    from PAMSegmentLib import benchmark as bm

    now = [0.0]

    def clock():
        return now[0]

    def call():
        now[0] += 0.2

    assert len(bm._time_calls(call, warmup=0, repeats=20, budget_s=0.5, clock=clock)) == 3
    assert len(bm._time_calls(call, warmup=0, repeats=2, budget_s=0.1, clock=clock)) == 2
    a, b = bm._time_pairs(call, call, warmup=0, pairs=40, budget_s=1.0, clock=clock)
    assert len(a) == len(b) == 5


def test_benchmark_lists_drop_repeated_values_and_small_sizes_are_refused(tmp_path, capsys):
    from PAMSegmentLib import benchmark as bm
    from PAMSegmentLib.cli import main

    assert bm._int_list("1,1,4,1") == (1, 4)
    assert main(["benchmark", "--quick", "--parts", "e2e", "--size", "2", "-o", str(tmp_path / "b")]) == 2
    assert "--size 2 is too small" in capsys.readouterr().err
