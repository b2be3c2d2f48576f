"""Session 38: hostile and careless input found by the session's trials, each fixed with a test
that fails on the code before the fix."""

from __future__ import annotations

from pathlib import Path

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
            assert "the record was cut where it nests too deep" in out
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


# ----------------------------------------------------------------------------- label-images trial


def _demo_slices(folder, n=4):
    """Axial slices of the bundled demo CT as 8-bit PNGs windowed at -160..240 HU (the kidneys and
    spleen visible), the middle one with its reference mask; returns (prompt png, mask png, HU slices)."""
    import numpy as np
    import SimpleITK as sitk

    from conftest import REPO

    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(REPO / "Resources/Demo/abdomen_ct.nii.gz")))
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(REPO / "Resources/Demo/abdomen_reference.nii.gz")))
    middle = ct.shape[0] // 2
    folder.mkdir(exist_ok=True)

    def png(array, name, kind=np.uint8):
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(array.astype(kind))), str(folder / name))
        return folder / name

    def windowed(s):
        return np.clip((s + 160.0) / 400.0 * 255.0, 0, 255)

    prompt = png(windowed(ct[middle]), "p.png")
    mask = png(ref[middle], "p_mask.png")
    slices = [ct[middle + d] for d in range(1, n + 1)]
    return prompt, mask, slices, windowed, png


def test_label_images_names_links_to_nothing(tmp_path, capsys):
    """A folder image that is a link to a missing file (an unmounted share) was left out without a
    word, exit 0; a folder of only such links "holds no image files"."""
    from PAMSegmentLib.cli import main

    prompt, mask, slices, windowed, png = _demo_slices(tmp_path / "in", 2)
    for n, s in enumerate(slices):
        png(windowed(s), f"s{n}.png")
    (tmp_path / "in" / ".#s1.png").symlink_to("user@host.1234")  # an editor's lock: hidden, left alone
    (tmp_path / "in" / "frame.gif").write_bytes(b"GIF89a" + bytes(20))
    assert main(["label-images", "--method", "copy", str(prompt), str(mask), str(tmp_path / "in"),
                 "-o", str(tmp_path / "out1")]) == 0
    assert "note: left out 1 GIF/WebP file of folder" in capsys.readouterr().out
    (tmp_path / "in" / "s9.png").symlink_to("/nonexistent/share/s9.png")
    assert main(["label-images", "--method", "copy", str(prompt), str(mask), str(tmp_path / "in"),
                 "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "s9.png is a link to /nonexistent/share/s9.png, which does not exist" in err
    assert not (tmp_path / "out").exists()
    assert main(["label-images", "--method", "copy", str(prompt), str(mask), str(tmp_path / "in" / "s9.png"),
                 "-o", str(tmp_path / "out")]) == 2
    assert "is a link to /nonexistent/share/s9.png" in capsys.readouterr().err


def test_label_images_notes_images_on_another_grey_scale(tmp_path, capsys):
    """A 16-bit export of raw CT values beside an 8-bit windowed prompt came back "not found" with no
    word why (the network's presence output dropped it, so the drift note did not appear)."""
    import numpy as np

    from PAMSegmentLib.cli import main
    from PAMSegmentLib.imageset import _other_scale

    ranges = [(0, 4095), (0, 3900), (0, 20000), (5000, 6000), (0, 255), (0, 0), (299, 438), (0, 40)]
    # wider than 4x, centred outside, or 8-bit exports (0-255, 0-40) beside a raw 16-bit prompt: flagged;
    # blank, a noisy blank raw slice (air, 299-438) or an 8-bit near-blank one beside an 8-bit prompt: not
    assert _other_scale(dict(enumerate(ranges)), 0) == {2, 3, 4, 7}
    assert _other_scale({0: (0, 235), 1: (0, 20), 2: (0, 0)}, 0) == set()
    assert _other_scale({0: (-1024, 1457), 1: (-1024, -685)}, 0) == set()  # air in signed HU: the same export
    prompt, mask, slices, windowed, png = _demo_slices(tmp_path / "in", 2)
    png(windowed(slices[0]), "a.png")
    png(slices[1] + 1024.0, "raw.png", np.uint16)
    assert main(["label-images", str(prompt), str(mask), str(tmp_path / "in" / "a.png"),
                 str(tmp_path / "in" / "raw.png"), "-o", str(tmp_path / "out"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "not found in: raw.png" in out
    assert "note: raw.png (" in out and "hold grey values on another scale than p.png (0 to 255)" in out
    assert "a.png (" not in out.split("note: raw.png")[1]


def test_float64_images_beyond_float32_are_rescaled(tmp_path, capsys):
    """A NIfTI slice x 1e300 (finite) was "11274 NaN/inf pixels" the file does not have, and through
    the Python API the image came back empty with numpy's overflow warning."""
    import warnings

    import numpy as np
    import SimpleITK as sitk

    from PAMSegmentLib.baselines import CopyPredictor
    from PAMSegmentLib.imageset import label_images
    from PAMSegmentLib.volumes import read_image_2d

    prompt, mask, slices, windowed, png = _demo_slices(tmp_path / "in", 1)
    big = tmp_path / "big.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(slices[0].astype(np.float64) * 1e300), str(big))
    said = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr, _ = read_image_2d(big, say=said.append)
    assert np.isfinite(arr).all() and 0 <= arr.min() and arr.max() <= 1
    assert said and "rescaled to 0-1" in said[0]
    drawn = sitk.GetArrayFromImage(sitk.ReadImage(str(mask)))
    image0 = slices[0].astype(np.float64)  # (the drawn mask is of the slice next to it: copy keeps it)
    areas = []
    for scale in (1.0, 1e300):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            result = label_images([image0, slices[0].astype(np.float64) * scale], 0, drawn, CopyPredictor())
        areas.append(int((result.masks[1] > 0).sum()))
    assert areas[0] > 100 and areas[1] == areas[0]


def test_unreadable_images_are_named_for_what_they_are_and_all_at_once(tmp_path, capsys):
    from PAMSegmentLib.cli import main

    prompt, mask, slices, windowed, png = _demo_slices(tmp_path / "in", 1)
    bad = tmp_path / "set"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "anim.png").write_bytes(b"GIF89a" + bytes(100))
    (bad / "photo.png").write_bytes(b"RIFF\x00\x01\x00\x00WEBPVP8 " + bytes(100))
    png(windowed(slices[0]), "fine.png")
    (tmp_path / "in" / "fine.png").rename(bad / "fine.png")
    assert main(["label-images", "--method", "copy", str(prompt), str(mask), str(bad), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "3 of the images cannot be read" in err
    assert "zero.png is empty (0 bytes)" in err
    assert "anim.png is a GIF image, which SimpleITK (and so this tool) cannot read; save it as PNG" in err
    assert "photo.png is a WebP image" in err
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- developer scripts audit


def _script(name):
    import importlib
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_train_refuses_a_log_that_is_its_checkpoint_or_its_summary(tmp_path):
    """--log naming --out wrote the curve over the finished weights, exit 0; a --log ending in .json
    was replaced by the run's summary."""
    import subprocess
    import sys

    from conftest import REPO, _cli_env

    for out, log, message in ((tmp_path / "a.pt", tmp_path / "a.pt", "--out and --log are the same file"),
                              (tmp_path / "b.pt", tmp_path / "curve.json",
                               "--log and the summary written beside --log are the same file")):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), "--synthetic-inline", "2",
                               "--max-iterations", "1", "--workers", "0", "--threads", "1", "--out", str(out),
                               "--log", str(log)], capture_output=True, text=True, env=_cli_env(), timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert not out.exists() and "Traceback" not in proc.stderr


def test_train_refuses_a_held_out_structure_by_its_name_and_a_damaged_split(tmp_path):
    """The held-out test looked only at the ids listed under the evaluation entries: a held-out organ
    no longer listed there (dropped from a re-prepared cache) could be a training label."""
    import json

    import numpy as np

    train = _script("train")
    (tmp_path / "cases").mkdir()
    labels = np.zeros((4, 8, 8), np.int16)
    labels[1:3, 2:5, 2:5], labels[1:3, 5:7, 5:7] = 1, 2
    np.savez(tmp_path / "cases" / "ts_fake.npz", image=np.zeros((4, 8, 8), np.float32), labels=labels,
             spacing=np.ones(3), label_names=json.dumps({"1": "spleen", "2": "liver", "3": "kidney_left"}))
    split = {"heldout_structures": ["spleen", "kidney_left"],
             "eval": [{"case": "ts_fake", "group": "g", "structures": [{"id": 3, "name": "kidney_left"}]}],
             "train": [{"case": "ts_fake", "labels": [2, 1]}]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    train.check_split_honest(split, path)  # the ids alone pass
    with pytest.raises(SystemExit, match=r"training case ts_fake lists label 1 \(spleen\), a held-out structure"):
        train.load_training_cases(tmp_path, path, 0)
    path.write_text(json.dumps(dict(split, eval=[])))  # a scan whose held-out organs were all too small: no entry
    with pytest.raises(SystemExit, match=r"training case ts_fake lists label 1 \(spleen\), a held-out structure"):
        train.load_training_cases(tmp_path, path, 0)
    path.write_text("{not json")
    with pytest.raises(SystemExit, match="cannot read the split"):
        train.load_training_cases(tmp_path, path, 0)
    path.write_text("{}")
    with pytest.raises(SystemExit, match="has no list of training cases"):
        train.load_training_cases(tmp_path, path, 0)


def test_model_card_names_what_the_weights_saw(small_checkpoint, tmp_path, capsys):
    """A synthetic-only run (cases: []) got a card listing the split's 17 real cases; a card was
    written from today's split whatever the checkpoint was trained with; a .json as --train-log or a
    file that is no checkpoint ended in a traceback."""
    import hashlib
    import json
    import subprocess
    import sys

    from conftest import REPO, _cli_env

    card_script = _script("make_model_card")
    split_sha256 = hashlib.sha256((REPO / "scripts/split.json").read_bytes()).hexdigest()
    synthetic = _with_provenance(small_checkpoint, tmp_path / "synth.pt",
                                 {"command": "train", "cases": [], "split": "scripts/split.json",
                                  "split_sha256": split_sha256})
    assert card_script.main([str(synthetic), "--out-json", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "c.json").read_text())["data"]["training_cases"] == []
    other = tmp_path / "other_split.json"
    other.write_text((REPO / "scripts/split.json").read_text().replace('"ts_ct"', '"ts_ct" ', 1))
    with pytest.raises(ValueError, match="the checkpoint was trained with a split of sha256"):
        card_script.main([str(synthetic), "--split", str(other), "--out-json", str(tmp_path / "d.json")])
    (tmp_path / "summary.json").write_text('{"iterations": 3}')
    (tmp_path / "not.pt").write_text("not a checkpoint")
    for argv, message in (([str(synthetic), "--train-log", str(tmp_path / "summary.json")], "is not a training curve"),
                          ([str(tmp_path / "not.pt")], "not.pt"),
                          ([str(synthetic), "--eval", str(tmp_path / "missing.csv")], "missing.csv")):
        proc = subprocess.run([sys.executable, str(REPO / "scripts" / "make_model_card.py"), *argv, "--out-json",
                               str(tmp_path / "e.json")], capture_output=True, text=True, env=_cli_env(), timeout=120)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr, proc.stderr
    assert not (tmp_path / "d.json").exists() and not (tmp_path / "e.json").exists()


def test_merge_eval_and_validate_refuse_what_would_mislead(tmp_path):
    import subprocess
    import sys

    from conftest import REPO, _cli_env

    results = REPO / "docs" / "evaluation" / "results.csv"

    def run(script, *argv):
        return subprocess.run([sys.executable, str(REPO / "scripts" / script), *argv], capture_output=True,
                              text=True, env=_cli_env(), timeout=120)

    for argv, message in (((str(tmp_path / "nosuch.csv"), "--out", str(tmp_path / "m")), "nosuch.csv is not a file"),
                          ((f"{results}::nosuchmethod=x", "--out", str(tmp_path / "m")), "has no method 'nosuchmethod'"),
                          ((str(REPO / "scripts" / "split.json"), "--out", str(tmp_path / "m")),
                           "is not a results table")):
        proc = run("merge_eval.py", *argv)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run("validate.py", str(REPO / "Resources/Models/pam_small.pt"), "--configs", "ci", "--cache", str(tmp_path))
    assert proc.returncode != 0 and "give --keyframes with it" in proc.stderr
    assert not (tmp_path / "m").exists()


def test_an_sdist_is_unpacked_whole_or_not_at_all(tmp_path, monkeypatch):
    """A source package was unpacked straight into raw/ and taken as done once its top folder
    existed: a run stopped mid-extraction left a tree every later run trusted."""
    import io
    import tarfile

    from PAMSegmentLib.training import data as D

    archive = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name, text in (("pkg-1.0/a.py", "a"), ("pkg-1.0/sub/b.py", "b"), ("pkg-1.0/aorta_report/x.nii", "r")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tf.addfile(info, io.BytesIO(text.encode()))
    cache = tmp_path / "cache"
    calls = []
    real_extractall = tarfile.TarFile.extractall

    def stopped(self, path, members=None, **kw):  # Ctrl-C after the first member
        calls.append(path)
        real_extractall(self, path, members=list(members)[:1], **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", stopped)
    with pytest.raises(KeyboardInterrupt):
        D.ensure_unpacked(cache, archive)
    assert not (cache / "raw" / "pkg-1.0").exists()  # not taken as done next time
    monkeypatch.setattr(tarfile.TarFile, "extractall", real_extractall)
    root = D.ensure_unpacked(cache, archive)
    assert root == cache / "raw" / "pkg-1.0"
    assert (root / "a.py").read_text() == "a" and (root / "sub" / "b.py").read_text() == "b"
    assert not (root / "aorta_report").exists()  # the reserved folder is never unpacked
    assert sorted(p.name for p in (cache / "raw").iterdir()) == ["pkg-1.0"]  # no .partial left


# ----------------------------------------------------------------------------- carried from session 37


def test_devices_empty_manifests_and_1_bit_stacks_are_named(ct_case, tmp_path, capsys):
    """-o /dev/null was "cannot tell the output format of null"; an empty manifest (or /dev/null) was
    "null has no image or prompt column (found: nothing)"; a 1-bit TIFF stack as the image was
    "4 components per voxel (colour or vector image)"."""
    import numpy as np

    from PAMSegmentLib.cli import main

    tifffile = pytest.importorskip("tifffile")  # (with scikit-image, in the test extra)
    assert main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", "/dev/null",
                 "--method", "copy"]) == 2
    assert "/dev/null is a device or pipe, not a file the output can be written to" in capsys.readouterr().err
    empty = tmp_path / "m.csv"
    empty.write_text("\n\n")
    for manifest in (str(empty), "/dev/null"):
        assert main(["batch", manifest, "-o", str(tmp_path / "res")]) == 2
        assert f"manifest {manifest} is empty; give a CSV file whose first line names" in capsys.readouterr().err
    stack = tmp_path / "bits.tif"
    tifffile.imwrite(stack, np.random.default_rng(0).random((5, 32, 32)) > 0.5, bitspersample=1,
                     photometric="minisblack")
    assert main(["propagate", str(stack), str(ct_case.prompt_path), "-o", str(tmp_path / "o.nii.gz"),
                 "--method", "copy"]) == 2
    assert "is a stack of 1-bit (black and white) TIFF pages, which ITK reads as colour" in capsys.readouterr().err
    assert not (tmp_path / "res").exists() and not (tmp_path / "o.nii.gz").exists()


def test_ctrl_c_while_the_benchmark_report_prints_does_not_say_nothing_was_written(tmp_path, monkeypatch, capsys):
    """A Ctrl-C once the tables were in place (moving them, or printing the report after) ended with
    "interrupted; nothing was written" and exit 130, with every table written: the report is now
    printed within the tables' Ctrl-C shield."""
    import os
    import signal
    from dataclasses import asdict
    from pathlib import Path

    from PAMSegmentLib import benchmark as bm
    from PAMSegmentLib import cli

    write = bm.write_outputs

    def run(cfg, log, after=None, keep_ctrl_c_ignored=False):  # the real tables of an empty run, no timing
        result = {"machine": bm.machine_info(1), "config": asdict(cfg), "network": [], "targets": []}
        write(result, Path(cfg.out), *((after, keep_ctrl_c_ignored) if after else ()))
        return result

    report = bm.report_text

    def interrupted_report(result, markdown=False):
        if not markdown:  # the printed report, once the files are in
            os.kill(os.getpid(), signal.SIGINT)
        return report(result, markdown=markdown)

    monkeypatch.setattr(bm, "run_benchmark", run)
    monkeypatch.setattr(bm, "report_text", interrupted_report)
    out = tmp_path / "b"
    assert cli.main(["benchmark", "--quick", "--parts", "network", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "nothing was written" not in captured.err and f"wrote {out}/network.csv" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["benchmark.json", "benchmark.md", "benchmark.png", "network.csv",
                                                     "targets.csv"]
    assert {p.name for p in out.iterdir()} <= set(bm.OUTPUT_FILES)  # the files whose links are checked first


def test_benchmark_memory_refusal_names_an_option_it_has(tmp_path, capsys, monkeypatch):
    from PAMSegmentLib import volumes
    from PAMSegmentLib.cli import main

    monkeypatch.setattr(volumes, "memory_budget", lambda: (2 * 2**30, 2 * 2**30))
    argv = ["benchmark", "-o", str(tmp_path / "b"), "--parts", "e2e", "--size", "2048", "--depths", "100"]
    assert main(argv) == 2
    assert "or run again with --no-memory-check" in capsys.readouterr().err
    from PAMSegmentLib import benchmark as bm

    monkeypatch.setattr(bm, "run_benchmark", lambda cfg, log, after=None, keep_ctrl_c_ignored=False: {})
    assert main([*argv, "--no-memory-check"]) == 0  # the advice works (the run itself left out here)


def test_an_interrupted_benchmark_removes_every_folder_it_made(tmp_path, monkeypatch):
    from PAMSegmentLib import benchmark as bm
    from PAMSegmentLib.cli import main

    def interrupted(cfg, log, after=None, keep_ctrl_c_ignored=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(bm, "run_benchmark", interrupted)
    (tmp_path / "kept").mkdir()
    assert main(["benchmark", "--quick", "-o", str(tmp_path / "kept" / "n1" / "n2")]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_card_beside_a_link_is_held_as_well_as_one_beside_its_file(small_checkpoint, tmp_path, monkeypatch):
    """A model hub's layout (models/my.pt -> blobs/<hash>, the card models/my.json beside the link):
    after the card was looked for beside the file itself only, a blob with other weights than its
    card's loaded without a word."""
    import json

    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.errors import CheckpointError

    (tmp_path / "blobs").mkdir()
    (tmp_path / "models").mkdir()
    blob = tmp_path / "blobs" / "3f2a9c"
    blob.write_bytes(small_checkpoint.path.read_bytes())
    link = tmp_path / "models" / "my.pt"
    link.symlink_to(blob)
    card = tmp_path / "models" / "my.json"
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(link))
    card.write_text(json.dumps({"file": "my.pt", "sha256_weights": "0" * 64}))
    with pytest.raises(CheckpointError, match="does not match its model card my.json"):
        load_model()
    card.write_text(json.dumps({"file": "my.pt", "sha256_weights": small_checkpoint.sha256}))
    assert load_model().sha256 == small_checkpoint.sha256


# ----------------------------------------------------------------------------- correction records


def _round_two(ct_case):
    """Round 1 (copy) and round 2 with slice 13 corrected: returns (second, its record, its edit)."""
    import numpy as np

    from conftest import write_image
    from PAMSegmentLib.volumes import read_volume
    from test_edits import _first_run, _update

    d = ct_case.directory
    first = _first_run(ct_case)
    edited = read_volume(first).array
    edited[13] = ct_case.truth[13]
    e1 = write_image(edited.astype(np.uint8), d / "e1.nii.gz", ct_case.spacing)
    assert _update(ct_case, first, e1, d / "second.nii.gz") == 0
    second = d / "second.nii.gz"
    edited2 = read_volume(second).array
    edited2[8] = ct_case.truth[8]
    e2 = write_image(edited2.astype(np.uint8), d / "e2.nii.gz", ct_case.spacing)
    return second, d / "second.nii.gz.keyframes.json", e2


@pytest.mark.parametrize("damage, message", [
    (lambda r: r.update(axis=0.0), "cannot be read"),  # a JSON tool's re-save: a TypeError traceback before
    (lambda r: r.update(version=True), "cannot be read"),
    (lambda r: r["labels"]["1"].update(keyframes=[k + 1 if k == 13 else k for k in r["labels"]["1"]["keyframes"]]),
     "its keyframes and walls were changed since it was written"),  # round 2's correction was re-predicted
    (lambda r: (r["labels"]["1"].update(keyframes=[k for k in r["labels"]["1"]["keyframes"] if k != 13] + [3]),
                r.pop("labels_sha256")), "keyframe 3 does not hold that label"),  # (a record without the digest)
    (lambda r: (r["labels"]["1"].update(walls=[0] * 100_000), r.pop("labels_sha256")),
     "lists 100,000 walls, more than the 20 slices"),
])
def test_a_damaged_correction_record_is_refused_in_one_line(damage, message, ct_case, capsys):
    import json

    from test_edits import _update

    second, record_path, e2 = _round_two(ct_case)
    record = json.loads(record_path.read_text())
    assert 13 in record["labels"]["1"]["keyframes"] and "labels_sha256" in record
    damage(record)
    record_path.write_text(json.dumps(record))
    capsys.readouterr()
    out = ct_case.directory / "third.nii.gz"
    assert _update(ct_case, second, e2, out) == 2
    err = capsys.readouterr().err
    assert message in err and "delete it to keep only the prompt's keyframes" in err, err
    assert not out.exists()


def test_a_batch_goes_on_past_a_row_whose_record_has_a_float_axis(ct_case, tmp_path, capsys):
    import csv
    import json

    from PAMSegmentLib.cli import main

    second, record_path, e2 = _round_two(ct_case)
    record = json.loads(record_path.read_text())
    record["axis"] = 0.0
    record_path.write_text(json.dumps(record))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt,output,previous,edited\n{ct_case.image_path},{ct_case.prompt_path},u.nii.gz,"
                        f"{second},{e2}\n{ct_case.image_path},{ct_case.prompt_path},plain.nii.gz,,\n")
    assert main(["batch", str(manifest), "-o", str(tmp_path / "res"), "--method", "copy"]) == 2  # 1 of 2 failed
    rows = list(csv.DictReader(open(tmp_path / "res" / "batch_report.csv", encoding="utf-8")))
    assert [r["status"] for r in rows] == ["error", "ok"]  # the row after it ran (it was 'not run', exit 1)
    assert "cannot be read" in rows[0]["message"]


def test_an_edit_that_only_adds_a_label_not_in_the_prompt_names_it(ct_case, capsys):
    import numpy as np

    from conftest import write_image
    from PAMSegmentLib.volumes import read_volume
    from test_edits import _first_run, _update

    first = _first_run(ct_case)
    edited = read_volume(first).array
    edited[15, 2:6, 2:6] = 4
    e1 = write_image(edited.astype(np.uint8), ct_case.directory / "e1.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, e1, ct_case.directory / "second.nii.gz") == 2
    assert "(label 4 changed, but is not in the prompt: draw it in the prompt to propagate)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- batch runs that overlap


def test_a_second_run_of_the_same_manifest_into_the_same_folder_is_refused_while_the_first_runs(
        ct_case, tmp_path, capsys):
    """Two runs of one manifest into one -o at once each rewrote all their rows, and the report of the
    last to write named the other's outputs' method (30 of 60 wrong in the trial; --skip-existing
    trusted it). Shards and other manifests still run beside it."""
    from PAMSegmentLib import batch
    from PAMSegmentLib.cli import main

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt\n{ct_case.image_path},{ct_case.prompt_path}\n")
    out = tmp_path / "res"
    out.mkdir()
    link = tmp_path / "link.csv"
    link.symlink_to(manifest)  # the same manifest by another name
    running = []  # the first run's claim, held here
    batch._claim_the_report(out / "batch_report.csv", manifest, running)
    try:
        for given in (manifest, link):
            assert main(["batch", str(given), "-o", str(out), "--method", "copy"]) == 2
            assert f"another run of {given.name} (or of its shards) is writing into {out} now" in \
                capsys.readouterr().err
        resaved = manifest.read_text()  # an editor's save: a new file renamed over the old one (a new inode)
        manifest.unlink()
        manifest.write_text(resaved)
        assert main(["batch", str(manifest), "-o", str(out), "--method", "copy"]) == 2
        assert main(["batch", str(manifest), "-o", str(out), "--method", "copy", "--shard", "1/1"]) == 2  # a shard too
        capsys.readouterr()
        other = tmp_path / "other.csv"
        other.write_text(f"image,prompt,output\n{ct_case.image_path},{ct_case.prompt_path},b.nii.gz\n")
        assert main(["batch", str(other), "-o", str(out), "--method", "copy"]) == 0  # another manifest runs
    finally:
        batch._release(running)
    shard = []  # a shard running: another shard runs beside it, the same shard and a whole run do not
    batch._claim_the_report(out / "batch_report.shard1-of-2.csv", manifest, shard, sharded=True)
    try:
        assert main(["batch", str(manifest), "-o", str(out), "--method", "copy", "--shard", "2/2"]) == 0
        assert main(["batch", str(manifest), "-o", str(out), "--method", "copy", "--shard", "1/2"]) == 2
        assert main(["batch", str(manifest), "-o", str(out), "--method", "copy"]) == 2
    finally:
        batch._release(shard)
    capsys.readouterr()
    assert main(["batch", str(manifest), "-o", str(out), "--method", "copy"]) == 0
    assert not [p.name for p in out.iterdir() if p.name.endswith(".lock")]  # no lock file left


def test_a_row_left_out_for_one_run_keeps_what_made_its_output(ct_case, tmp_path, capsys):
    """A row dropped from the manifest for one run lost its report row; put back, a run with another
    method and --skip-existing kept the first method's output as done."""
    import csv

    from PAMSegmentLib.cli import main

    full = f"image,prompt,output\n{ct_case.image_path},{ct_case.prompt_path},a.nii.gz\n" \
           f"{ct_case.image_path},{ct_case.prompt_path},b.nii.gz\n"
    manifest = tmp_path / "m.csv"
    out = tmp_path / "res"
    manifest.write_text(full)
    assert main(["batch", str(manifest), "-o", str(out), "--method", "track"]) == 0
    manifest.write_text("\n".join(full.splitlines()[:2]) + "\n")  # b left out
    assert main(["batch", str(manifest), "-o", str(out), "--method", "track", "--skip-existing"]) == 0
    manifest.write_text(full)
    assert main(["batch", str(manifest), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = {Path(r["output"]).name: r for r in csv.DictReader(open(out / "batch_report.csv", encoding="utf-8"))}
    assert rows["b.nii.gz"]["status"] == "ok" and rows["b.nii.gz"]["method"] == "copy"
    assert "its output was made with track" in rows["b.nii.gz"]["message"]
    assert main(["batch", str(manifest), "-o", str(out), "--method", "copy", "--skip-existing"]) == 0
    rows = {Path(r["output"]).name: r for r in csv.DictReader(open(out / "batch_report.csv", encoding="utf-8"))}
    assert [r["row"] for r in rows.values()] == ["2", "3"]  # one row each, numbered, back in the manifest:
    assert not any("not in the manifest" in r["message"] for r in rows.values())  # not said to be out of it


def test_a_folder_with_the_reports_name_is_named_before_any_work(ct_case, tmp_path, capsys):
    from PAMSegmentLib.cli import main

    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt\n{ct_case.image_path},{ct_case.prompt_path}\n")
    (tmp_path / "res" / "batch_report.csv").mkdir(parents=True)
    assert main(["batch", str(manifest), "-o", str(tmp_path / "res"), "--method", "copy"]) == 2
    assert "batch_report.csv is a folder, and the report needs its name" in capsys.readouterr().err


def test_own_rows_kept_for_outputs_no_longer_listed_only_where_they_still_hold(tmp_path):
    """A row of this manifest for an output it no longer lists is kept (whatever its status: a
    failed re-run's row says the output is still the earlier method's), but not in a shard's report
    (rows move between shards as the manifest changes: kept, they went stale beside the other shard's
    rewrite) and not for an output written since the report was."""
    import csv
    import os

    from PAMSegmentLib.batch import REPORT_FIELDS, BatchRow, _absolute, _rows_of_other_manifests

    manifest = tmp_path / "m.csv"
    manifest.write_text("image,prompt\n")
    listed = BatchRow(2, tmp_path / "ct.nii.gz", tmp_path / "p.nii.gz", tmp_path / "a.nii.gz")
    dropped = tmp_path / "b.nii.gz"
    dropped.write_text("b")
    rows = [{"row": 3, "output": str(dropped), "status": "error", "method": "copy", "manifest": str(_absolute(manifest)),
             "message": "MemoryError"}]
    for name in ("batch_report.csv", "batch_report.shard1-of-2.csv"):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=REPORT_FIELDS)
            writer.writeheader()
            writer.writerows([{k: r.get(k, "") for k in REPORT_FIELDS} for r in rows])
    report = tmp_path / "batch_report.csv"
    os.utime(dropped, ns=(report.stat().st_mtime_ns - 10**9,) * 2)
    kept = _rows_of_other_manifests(report, manifest, [listed])
    assert [(r["output"], r["status"], r["method"]) for r in kept] == [(str(dropped), "error", "copy")]
    assert _rows_of_other_manifests(tmp_path / "batch_report.shard1-of-2.csv", manifest, [listed]) == []
    os.utime(dropped, ns=(report.stat().st_mtime_ns + 10**9,) * 2)  # written since: another run's
    assert _rows_of_other_manifests(report, manifest, [listed]) == []


def test_label_cells_command_keeps_the_precision_of_float64_images(tmp_path, capsys):
    """1e6 + 0.01 x signal in float64: the Python API rescaled it (6 cells), the command read it as
    float32 first (one value: only the 3 examples came back)."""
    import numpy as np
    import SimpleITK as sitk

    from PAMSegmentLib.cells import label_cells
    from PAMSegmentLib.cli import main
    from test_review_s37 import _disc_cells

    image, labels = _disc_cells()
    examples = np.where(np.isin(labels, [1, 2, 3]), labels, 0).astype(np.uint8)
    odd = 1e6 + 0.01 * (image.astype(np.float64) / image.max())
    sitk.WriteImage(sitk.GetImageFromArray(odd), str(tmp_path / "img.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(examples), str(tmp_path / "ex.png"))
    found = int(label_cells(odd, examples).labels.max())
    assert found > 3
    assert main(["label-cells", str(tmp_path / "img.nrrd"), str(tmp_path / "ex.png"), "-o",
                 str(tmp_path / "o.png")]) == 0
    written = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "o.png")))
    assert len(np.unique(written)) - 1 == found
    from PAMSegmentLib.volumes import read_image_2d  # README's Python example reads it so: the same cells

    assert int(label_cells(read_image_2d(tmp_path / "img.nrrd", keep_colour=True)[0], examples).labels.max()) == found


def test_benchmark_table_links_are_checked_before_measuring(tmp_path, capsys, monkeypatch):
    """The tables are written through links since they are put in place together: a link to
    ~/.bashrc was written into, and a link into an unmounted share failed after the measurements."""
    from PAMSegmentLib import benchmark as bm
    from PAMSegmentLib.cli import main

    measured = []
    monkeypatch.setattr(bm, "run_benchmark", lambda cfg, log, after=None, keep_ctrl_c_ignored=False: measured.append(1))
    victim = tmp_path / ".bashrc"
    victim.write_text("export PATH=...\n")
    for name, target, message in (("benchmark.md", victim, "which is not a file of an output format (.md)"),
                                  ("targets.csv", victim, "which is not a file of an output format (.csv)"),
                                  ("benchmark.png", tmp_path / "unmounted" / "benchmark.png",
                                   "whose folder does not exist")):
        out = tmp_path / f"out_{name}"
        out.mkdir()
        (out / name).symlink_to(target)
        assert main(["benchmark", "--quick", "-o", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert not measured and victim.read_text() == "export PATH=...\n"


def test_nothing_to_update_names_a_label_left_out_with_label(ct_case, capsys):
    import numpy as np

    from conftest import write_image
    from PAMSegmentLib.cli import main
    from PAMSegmentLib.volumes import read_volume

    d = ct_case.directory
    prompt = read_volume(ct_case.prompt_path).array.copy()
    prompt[10, 2:6, 2:6] = 2
    two = write_image(prompt.astype(np.uint8), d / "two.nii.gz", ct_case.spacing)
    first = d / "first.nii.gz"
    assert main(["propagate", str(ct_case.image_path), str(two), "-o", str(first), "--method", "copy"]) == 0
    edited = read_volume(first).array
    edited[11, 2:6, 2:6] = 0  # label 2 corrected only
    e = write_image(edited.astype(np.uint8), d / "e.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert main(["propagate", str(ct_case.image_path), str(two), "-o", str(d / "second.nii.gz"), "--method", "copy",
                 "--previous", str(first), "--edited", str(e), "--label", "1"]) == 2
    assert "(label 2 changed, but is left out of the labels to propagate (--label, a manifest's label column, " \
           "labels=): add it there)" in capsys.readouterr().err
