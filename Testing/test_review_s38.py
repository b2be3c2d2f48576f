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
