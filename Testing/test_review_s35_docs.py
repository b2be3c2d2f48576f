"""Help texts, hints and printed lines found unclear or wrong in session 35's documentation review."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from PAMSegmentLib import benchmark as bm
from PAMSegmentLib import cli


@pytest.mark.parametrize("args, line", [
    # one IMAGE MASK pair per --labelled: a second pair after the first was left over
    (["label-images", "p.png", "m.png", "c.png", "-o", "d", "--labelled", "a.png", "am.png", "b.png", "bm.png"],
     "unrecognized arguments: b.png bm.png; --labelled takes one IMAGE MASK pair: repeat it for each pair "
     "(--labelled a.png a_mask.png --labelled b.png b_mask.png) (see pamsegment label-images --help)"),
    (["label-images", "p.png", "m.png", "c.png", "--labelled", "a.png", "am.png", "b.png", "bm.png", "-o", "d"],
     "unrecognized arguments: b.png bm.png; --labelled takes one IMAGE MASK pair: repeat it for each pair "
     "(--labelled a.png a_mask.png --labelled b.png b_mask.png) (see pamsegment label-images --help)"),
    # no hint without --labelled, nor for an unknown option beside it
    (["label-images", "p.png", "m.png", "c.png", "-o", "d", "--bogus"],
     "unrecognized arguments: --bogus (see pamsegment label-images --help)"),
    (["label-images", "p.png", "m.png", "c.png", "-o", "d", "--labelled", "a.png", "am.png", "--bogus"],
     "unrecognized arguments: --bogus (see pamsegment label-images --help)"),
])
def test_a_second_pair_after_one_labelled_option_is_told_to_repeat_the_option(args, line, capsys):
    """A review: `--labelled a.png a_mask.png b.png b_mask.png` said only "unrecognized arguments:
    b.png b_mask.png", and the README's synopsis showed `[--labelled IMAGE MASK ...]`."""
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    assert stop.value.code == 2
    assert capsys.readouterr().err == f"pamsegment: error: {line}\n"


def _help(command: str) -> str:
    parser = cli.build_parser([command])
    return " ".join(parser._pam_subparsers[command].format_help().split())


def test_the_help_texts_say_what_the_code_does(monkeypatch):
    """A review: the benchmark's --checkpoint named the shipped weights as its default ($PAMSEGMENT_MODEL
    comes first) and its options had no metavars; serve's --host named only 0.0.0.0 as needing a token;
    --label did not say that its order decides overlaps; --no-memory-check of the 2D commands named the
    machine's memory, not what the process may use; label-cells' -o and batch's -o left out other names
    of what they write."""
    monkeypatch.setenv("COLUMNS", "1000")  # no lines wrapped (argparse also breaks them after a hyphen)
    bench = _help("benchmark")
    assert "--checkpoint CKPT weights of the small (default) preset (default: $PAMSEGMENT_MODEL if set, else" in bench
    for usage in ("--parts LIST", "--batch-sizes LIST", "--repeats N", "--warmup N", "--pairs N", "--depths LIST",
                  "--objects LIST", "--size PX", "--sam2-sizes LIST", "--threads N"):
        assert f"[{usage}]" in bench, usage
    assert "--parts LIST the parts to run, comma-separated" in bench
    assert "any address other than localhost or a loopback one (127.x.x.x, ::1) needs a token" in _help("serve")
    assert "in this order, which decides overlaps: the label propagated first keeps the voxels" in _help("propagate")
    images = _help("label-images")
    assert "in this order, which decides overlaps: the label propagated first keeps the pixels" in images
    cells = _help("label-cells")
    for text in (images, cells):
        assert "too large for the memory this process may use" in text and "this machine's memory" not in text
    assert "or <name>_labels.tif (then _labels2.tif ...) if <name>.tif or its table is an input, a folder" in cells
    assert "batch_report.csv (batch_report.shardK-of-N.csv with --shard K/N)" in _help("batch")


@pytest.mark.parametrize("isolate, heading", [
    (True, "== 2. End to end (fresh process per row; read + propagate + write = wall_s; model_s separate; peak RSS "
           "of the whole process, run_peak after imports + model load)"),
    (False, "== 2. End to end (every row in the benchmark's own process; read + propagate + write = wall_s; "
            "model_s separate; peak RSS of that process so far, earlier rows included, run_peak after imports + "
            "model load)"),
    (None, "== 2. End to end (fresh process per row;"),  # the results of a run before the heading said it
])
def test_the_end_to_end_heading_says_whether_each_row_had_its_own_process(isolate, heading):
    """A review: the heading said "fresh process per row" also for --quick and --in-process runs."""
    config = {"quick": True, "command": "pamsegment benchmark --quick"}
    if isolate is not None:
        config["isolate"] = isolate
    result = {"machine": {"cpu": "x", "cores": 2, "usable_cores": 2, "torch": "2", "torch_threads": 2,
                          "numpy": "2", "python": "3.11", "date": "d"},
              "config": config, "end_to_end": []}
    assert heading in bm.report_text(result)


def test_label_cells_names_the_table_with_its_folder(tmp_path, capsys):
    """A review: `-o cells/out.png` printed "wrote cells/out.png and out.png.csv"."""
    pytest.importorskip("sklearn")
    from test_cells import disc_image

    image, ref = disc_image()
    sitk.WriteImage(sitk.GetImageFromArray(np.clip(image, 0, 255).astype(np.uint8)), str(tmp_path / "cells.png"))
    examples = np.where(np.isin(ref, [1, 4, 16]), ref, 0).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(examples), str(tmp_path / "examples.png"))
    (tmp_path / "result").mkdir()
    out = tmp_path / "result" / "out.png"
    assert cli.main(["label-cells", str(tmp_path / "cells.png"), str(tmp_path / "examples.png"), "-o", str(out)]) == 0
    assert f"wrote {out} and {out}.csv: " in capsys.readouterr().out


def test_the_cli_docstring_names_every_exit_status():
    """A review: the module's summary left out 141 and 143, and showed CKPT of `info` as required."""
    doc = cli.__doc__
    assert "pamsegment info [CKPT]" in doc
    for status in (cli.EXIT_OK, cli.EXIT_USAGE, cli.EXIT_INTERRUPTED, cli.EXIT_TERMINATED, cli.EXIT_BROKEN_PIPE,
                   cli.EXIT_INTERNAL):
        assert f"{status} " in doc, status
