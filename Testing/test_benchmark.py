"""``pamsegment benchmark``: the quick mode runs every part on tiny sizes and writes its tables.

No timing is asserted (the machine is shared); only that every figure is produced, in the
documented files and columns, and that the target check reads them correctly.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from PAMSegmentLib import benchmark as bm
from PAMSegmentLib import cli


def _read_csv(path):
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        return reader.fieldnames, list(reader)


def test_quick_benchmark_writes_csv_json_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    code = cli.main(["benchmark", "--quick", "--threads", "1", "--no-sam2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for heading in ("Machine", "1. Network alone", "1b. Default vs official, paired", "2. End to end", "3. Slicer path",
                    "Targets: not judged in quick smoke mode"):
        assert heading in printed
    assert "  NO" not in printed  # a smoke run's tiny sizes do not "fail" the speed targets
    assert "torch " in printed and "CPU: " in printed

    header, rows = _read_csv(out / "network.csv")
    assert header == bm.NETWORK_COLUMNS
    models = {r["model"] for r in rows}
    assert {"pam-small", "pam-official"} <= models
    for r in rows:
        assert r["status"] == "ok", r
        assert float(r["per_slice_ms"]) > 0 and float(r["slices_per_s"]) > 0
        assert int(r["batch"]) in (1, 2)

    header, rows = _read_csv(out / "paired.csv")
    assert header == bm.PAIRED_COLUMNS
    assert [int(r["batch"]) for r in rows] == [1, 2]
    for r in rows:
        assert r["status"] == "ok" and int(r["pairs"]) == 2, r
        assert float(r["ratio"]) == pytest.approx(float(r["official_ms_median"]) / float(r["small_ms_median"]))
        assert float(r["ratio_q25"]) <= float(r["ratio_q75"])

    header, rows = _read_csv(out / "end_to_end.csv")
    assert header == bm.E2E_COLUMNS
    assert {(int(r["depth"]), int(r["object_slices"])) for r in rows} == {(16, 6), (24, 6)}
    assert {r["mode"] for r in rows} <= {"fixed", "honest"}  # "honest" runs only with trained weights
    for r in rows:
        assert r["status"] == "ok", r
        if r["mode"] == "fixed":  # fixed-work runs predict exactly the object's extent minus the prompt slice
            assert int(r["slices_predicted"]) == 5
        assert float(r["wall_s"]) >= float(r["propagate_s"]) > 0
        assert float(r["peak_rss_mb"]) > 0

    header, rows = _read_csv(out / "slicer.csv")
    assert header == bm.SLICER_COLUMNS
    assert rows

    header, _ = _read_csv(out / "targets.csv")
    assert header == bm.TARGET_COLUMNS

    data = json.loads((out / "benchmark.json").read_text())
    assert {"machine", "config", "network", "paired", "end_to_end", "slicer", "targets", "files"} <= set(data)
    assert data["machine"]["torch_threads"] == 1 and data["config"]["quick"] is True
    assert (out / "benchmark.png").stat().st_size > 0
    assert "| model |" in (out / "benchmark.md").read_text()


def test_sam2_missing_is_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(bm, "_sam2_unavailable_reason", lambda: "the sam2 package is not installed")
    cfg = bm.quick_config(presets=(), sam2_sizes=(1024,), batch_sizes=(1, 4))
    rows = bm.run_network_part(cfg, log=lambda *_: None)
    assert [(r["model"], r["batch"], r["status"]) for r in rows] == [
        ("sam2-tiny@1024", 1, "not measurable here"), ("sam2-tiny@1024", 4, "not measurable here")]
    targets = bm.evaluate_targets({"network": rows, "end_to_end": []})
    sam = [t for t in targets if "SAM 2" in t["target"]]
    assert sam and sam[0]["met"] is None and "not installed" in sam[0]["note"]


class _FakeClock:
    """A clock that only moves when a fake call says so."""

    def __init__(self):
        self.now, self.order = 0.0, []

    def __call__(self):
        return self.now

    def call(self, name, seconds):
        def fn():
            self.order.append(name)
            self.now += seconds
        return fn


def test_paired_timing_alternates_the_order_and_keeps_to_the_budget():
    clock = _FakeClock()
    a, b = clock.call("a", 1.0), clock.call("b", 10.0)
    times_a, times_b = bm._time_pairs(a, b, warmup=1, pairs=40, budget_s=100.0, clock=clock)
    # the warm-up pair takes 11 s, so 40 pairs (440 s) would exceed 100 s: 100 // 11 = 9 pairs
    assert len(times_a) == len(times_b) == 9
    assert times_a == [1.0] * 9 and times_b == [10.0] * 9
    assert clock.order[:2] == ["a", "b"]  # warm-up
    assert clock.order[2:8] == ["a", "b", "b", "a", "a", "b"]  # pairs alternate which runs first
    # a tiny budget still gives at least 5 pairs
    clock = _FakeClock()
    times_a, _ = bm._time_pairs(clock.call("a", 1.0), clock.call("b", 10.0), warmup=1, pairs=40, budget_s=1.0,
                                clock=clock)
    assert len(times_a) == 5


def test_paired_ratio_row_is_the_ratio_of_medians_with_per_pair_quartiles():
    row = bm.paired_ratio_row([0.010, 0.012, 0.011, 0.020], [0.110, 0.120, 0.121, 0.120])
    assert row["pairs"] == 4
    assert row["small_ms_median"] == pytest.approx(11.5) and row["official_ms_median"] == pytest.approx(120.0)
    assert row["ratio"] == pytest.approx(120.0 / 11.5)
    # per-pair ratios 11, 10, 11, 6: quartiles 9.0 and 11.0
    assert row["ratio_q25"] == pytest.approx(9.0) and row["ratio_q75"] == pytest.approx(11.0)


def test_synthetic_ct_object_spans_exactly_the_asked_slices():
    image, truth, prompt, (first, last, mid) = bm.synthetic_ct(30, 64, 11)
    assert image.dtype == np.int16 and image.shape == (30, 64, 64)
    occupied = np.flatnonzero(truth.any(axis=(1, 2)))
    assert (occupied[0], occupied[-1]) == (first, last) and len(occupied) == 11
    assert np.flatnonzero(prompt.any(axis=(1, 2))).tolist() == [mid]
    np.testing.assert_array_equal(prompt[mid], truth[mid])
    assert image[truth > 0].mean() > image[(truth == 0) & (image > -500)].mean() + 40  # a visible object
    with pytest.raises(ValueError):
        bm.synthetic_ct(10, 32, 11)


def test_targets_from_figures():
    net = [dict(model=m, batch=b, slices_per_s=s, status="ok")
           for m, b, s in (("pam-small", 16, 100.0), ("pam-official", 16, 5.0), ("sam2-tiny@1024", 16, 25.0))]
    e2e = [dict(preset="small", mode="fixed", depth=200, object_slices=100, size=512, wall_s=4.0,
                peak_rss_mb=900.0, status="ok"),
           dict(preset="official", mode="fixed", depth=200, object_slices=100, size=512, wall_s=30.0,
                peak_rss_mb=2500.0, status="ok")]
    paired = [dict(batch=1, pairs=40, ratio=9.6, ratio_q25=9.1, ratio_q75=10.2, status="ok")]
    got = {t["target"]: t for t in bm.evaluate_targets({"network": net, "paired": paired, "end_to_end": e2e})}
    pair = got["default/official throughput, batch 1, paired (one process, alternated)"]
    assert pair["value"] == 9.6 and pair["met"] is False and "9.10-10.20" in pair["note"]
    assert got["default/official throughput, batch 16"]["value"] == 20.0
    assert got["default/official throughput, batch 16"]["met"] is True
    assert got["default/SAM 2 tiny throughput, batch 16"]["met"] is False  # 4x < 5x
    wall = [t for k, t in got.items() if k.startswith("small") and "wall" in k]
    assert wall and wall[0]["met"] is True
    official_mem = [t for k, t in got.items() if k.startswith("official") and "RSS" in k]
    assert official_mem and official_mem[0]["met"] is False


def test_small_rows_accept_the_small_network_with_a_prior_channel_only(tmp_path):
    """The benchmark's `small` rows time the shipped weights: the `small` network, or the same
    network with the prior channel; a checkpoint of another size is refused."""
    from PAMSegmentLib.benchmark import _pam_model
    from PAMSegmentLib.checkpoints import InferenceParams, save_checkpoint
    from PAMSegmentLib.network import PAMNetwork
    from PAMSegmentLib.preprocess import PreprocessingParams

    for preset in ("small", "small-prior"):
        path = tmp_path / f"{preset}.pt"
        save_checkpoint(path, PAMNetwork(preset), PreprocessingParams(input_size=128), InferenceParams(), {})
        model, weights = _pam_model("small", str(path))
        assert model.config.name == preset and weights == f"trained: {preset}.pt"
    with pytest.raises(ValueError, match="holds the 'small-prior' network, not 'official'"):
        _pam_model("official", str(tmp_path / "small-prior.pt"))


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """The shipped weights (a stand-in file) and another checkpoint; PAMSEGMENT_MODEL unset."""
    from PAMSegmentLib import checkpoints

    shipped, other = tmp_path / "pam_small.pt", tmp_path / "other.pt"
    shipped.write_bytes(b"shipped")
    other.write_bytes(b"other")
    monkeypatch.delenv("PAMSEGMENT_MODEL", raising=False)
    monkeypatch.setattr(checkpoints, "shipped_checkpoint_path", lambda: shipped)
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # a checkout's root: docs/benchmark is there
    return {"SHIPPED": str(shipped), "OTHER": str(other)}


def _out_folder(argv, weights):
    import argparse

    parser = argparse.ArgumentParser()
    bm.add_benchmark_arguments(parser, "docs/benchmark")
    return bm.config_from_args(parser.parse_args([weights.get(a, a) for a in argv])).out


@pytest.mark.parametrize("argv, out", [
    ([], "docs/benchmark"),
    (["--threads", "2", "--checkpoint", "SHIPPED", "--parts", "slicer,e2e,network"], "docs/benchmark"),
    (["--quick"], "benchmark_out"),
    (["--parts", "network", "--no-sam2"], "benchmark_out"),
    (["--parts", "e2e", "--depths", "200", "--objects", "100"], "benchmark_out"),
    (["--batch-sizes", "1"], "benchmark_out"),
    (["--in-process"], "benchmark_out"),
    (["--quick", "--out", "docs/benchmark"], "docs/benchmark"),  # an explicit folder is the user's choice
])
def test_only_a_full_run_writes_into_docs_benchmark_by_default(argv, out, weights):
    """`--quick` and `--parts network --no-sam2` (both quoted in the README) wrote into
    docs/benchmark: a partial run rewrote benchmark.md and targets.csv beside the older run's CSVs."""
    assert _out_folder(argv, weights) == out


def test_a_full_run_outside_a_checkout_does_not_make_docs_benchmark(weights, tmp_path, monkeypatch):
    """An installed package run from any folder made ./docs/benchmark there."""
    monkeypatch.chdir(tmp_path)
    assert _out_folder([], weights) == "benchmark_out"
    (tmp_path / "docs" / "benchmark").mkdir(parents=True)  # a checkout: the published tables' folder
    assert _out_folder([], weights) == "docs/benchmark"


@pytest.mark.parametrize("argv, model, given", [
    (["--threads", "8"], None, "--threads 8"),
    (["--checkpoint", "OTHER"], None, "--checkpoint OTHER"),
    ([], "OTHER", "PAMSEGMENT_MODEL=OTHER"),
    ([], "MISSING", "random weights for the small preset (MISSING is missing)"),
    (["--official-checkpoint", "OTHER"], None, "--official-checkpoint"),
    (["--threads", "8", "--out", "docs/benchmark"], None, None),  # an explicit folder is the user's choice
])
def test_other_threads_or_weights_are_not_the_published_run(argv, model, given, weights, tmp_path, monkeypatch):
    """`--threads 8`, or other weights than the published run's (the shipped pam_small.pt, random
    official weights), rewrote the published 2-thread tables in docs/benchmark."""
    import argparse

    weights["MISSING"] = str(tmp_path / "missing.pt")
    if model:
        monkeypatch.setenv("PAMSEGMENT_MODEL", weights[model])
    assert _out_folder(argv, weights) == ("docs/benchmark" if given is None else "benchmark_out")
    parser = argparse.ArgumentParser()
    bm.add_benchmark_arguments(parser, "docs/benchmark")
    if given is not None:
        for name, path in weights.items():
            given = given.replace(name, path)
        assert bm.partial_options(parser.parse_args([weights.get(a, a) for a in argv])) == [given]


def test_without_the_shipped_weights_a_run_is_not_the_published_run(weights, monkeypatch):
    from PAMSegmentLib import checkpoints

    monkeypatch.setattr(checkpoints, "shipped_checkpoint_path", lambda: None)
    assert _out_folder([], weights) == "benchmark_out"
    assert _out_folder(["--checkpoint", "OTHER"], weights) == "benchmark_out"


def test_a_partial_run_says_where_it_wrote_and_which_tables_are_older(tmp_path, monkeypatch, capsys, weights):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "benchmark_out").mkdir()
    (tmp_path / "benchmark_out" / "end_to_end.csv").write_text("an earlier run\n")

    def run(cfg, log, after=None, keep_ctrl_c_ignored=False):  # what run_benchmark writes for the network part
        (tmp_path / cfg.out / "network.csv").write_text("new\n")  # (without timing anything)
        result = {"files": {"network": f"{cfg.out}/network.csv"}}
        after(result)
        return result

    monkeypatch.setattr(bm, "run_benchmark", run)
    monkeypatch.setattr(bm, "report_text", lambda result: "(tables)")
    assert cli.main(["benchmark", "--quick", "--parts", "network"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("wrote benchmark_out/network.csv in ")  # then the seconds it took
    assert lines[:3] + lines[4:] == [
        "note: this is not the full run (--quick, --parts network), so the tables go to benchmark_out, not "
        "docs/benchmark (--out chooses)",
        "(tables)", "",
        "note: end_to_end.csv in benchmark_out are from an earlier run (this one measured network only); "
        "benchmark.md, benchmark.json and targets.csv describe this one"]
    assert not (tmp_path / "docs").exists()
    assert bm.quick_config().out == "benchmark_out"  # the API's smoke settings too


def test_the_readme_benchmark_figures_are_those_of_the_stored_run():
    """The Benchmarks prose quoted 10.5 / 9.9 / 13.2 / 19.2x for the separate-process ratios (the
    stored run and the README's own target table: 10.9 / 11.5 / 18.8 / 20.7x), 16.4 vs 8.1 ms for
    the small preset at batch 4, 17.5 s for the official preset's 100-slice case (20.5 s) and
    160 ms per extra object slice for it (179-198 ms)."""
    import re

    from conftest import REPO

    stored = json.loads((REPO / "docs" / "benchmark" / "benchmark.json").read_text())
    text = (REPO / "README.md").read_text()
    readme = " ".join(text[text.index("## Benchmarks"):text.index("## Development")].split())
    per_slice = {(r["model"], r["batch"]): r["per_slice_ms"] for r in stored["network"]}
    ratios = " / ".join(f"{per_slice['pam-official', b] / per_slice['pam-small', b]:.1f}" for b in (1, 4, 8, 16))
    assert ratios == "9.8 / 11.3 / 13.2 / 21.9"  # session 27's full run
    assert f"two: {ratios}x at batch 1 / 4 / 8 / 16 in the same full run" in readme
    paired_b4 = next(r["small_ms_median"] for r in stored["paired"] if r["batch"] == 4) / 4
    assert (f"batch-4 median was {per_slice['pam-small', 4]:.1f} ms per slice there against {paired_b4:.1f} ms paired"
            == "batch-4 median was 10.4 ms per slice there against 8.5 ms paired")
    assert "batch-4 median was 10.4 ms per slice there against 8.5 ms paired" in readme
    official = next(r for r in stored["end_to_end"] if (r["preset"], r["mode"], r["depth"], r["object_slices"])
                    == ("official", "fixed", 200, 100))
    assert f"The official preset takes {official['wall_s']:.1f} s for the same extent (fixed range)" in readme
    lines = bm._scaling_lines(stored["end_to_end"], markdown=False)
    per_object = [float(m) * 1000 for line in lines if line.strip().startswith("official, volume depth")
                  for m in re.findall(r"\(([\d.]+) s per extra object slice\)", line)]
    assert f"{min(per_object):.0f}-{max(per_object):.0f}" == "326-342"
    assert "326-342 ms with the official preset" in readme
    per_volume = [float(m) * 1000 for line in lines if line.strip().startswith("small, object")
                  for m in re.findall(r"\(([-\d.]+) s per extra volume slice\)", line)]
    assert f"{min(per_volume):.1f}-{max(per_volume):.1f} ms per extra volume slice with the default" in readme


def test_the_parts_and_the_size_options_are_each_written_once(monkeypatch):
    """The part names were written in four places (the config's default, --parts' check, ALL_PARTS,
    PART_FILES) and the size options twice (SIZE_OPTIONS and config_from_args' own list)."""
    import argparse

    assert bm.BenchConfig().parts == bm.ALL_PARTS == tuple(bm.PART_FILES)
    monkeypatch.setattr(bm, "ALL_PARTS", (*bm.ALL_PARTS, "gpu"))  # a new part: --parts takes it
    assert bm._parts("gpu,network") == ("gpu", "network")
    parser = argparse.ArgumentParser()
    bm.add_benchmark_arguments(parser, "docs/benchmark")
    args = parser.parse_args([])
    for n, name in enumerate(bm.SIZE_OPTIONS):  # every size option reaches the field of its name
        setattr(args, name, (n + 3,) if isinstance(getattr(bm.BenchConfig(), name), tuple) else n + 3)
    cfg = bm.config_from_args(args)
    assert [getattr(cfg, name) for name in bm.SIZE_OPTIONS] == [getattr(args, name) for name in bm.SIZE_OPTIONS]


def test_benchmark_out_that_cannot_take_the_tables_is_refused_before_measuring(tmp_path, capsys):
    """--out naming a file (or a folder that takes no files) was found only after every
    measurement (up to 15 min): a FileExistsError / PermissionError traceback, exit 1."""
    a_file = tmp_path / "ct.nii.gz"
    a_file.write_bytes(b"image")
    assert cli.main(["benchmark", "--quick", "--threads", "1", "--no-sam2", "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"pamsegment: error: --out {a_file} is a file; give a folder for the tables"
    assert cli.main(["benchmark", "--quick", "--threads", "1", "--no-sam2", "--out", "/proc/pamsegment-bench"]) == 2
    err += capsys.readouterr().err
    assert "pamsegment: error: cannot make folder /proc/pamsegment-bench for the benchmark tables" in err
    assert "[network]" not in err  # nothing was measured
    assert a_file.read_bytes() == b"image"


def test_the_full_run_report_shows_the_targets_table():
    result = {"machine": {"cpu": "x", "cores": 2, "usable_cores": 2, "torch": "2", "torch_threads": 2, "numpy": "2",
                          "python": "3.11", "date": "d"},
              "config": {"quick": False, "command": "pamsegment benchmark"},
              "targets": [{"target": "t", "value": "1", "goal": ">= 10x", "met": "no", "note": ""}]}
    text = bm.report_text(result)
    assert "== Targets (the project's speed and memory goals)" in text and ">= 10x" in text


@pytest.mark.parametrize("option", ["--checkpoint", "--official-checkpoint"])
def test_a_bad_checkpoint_is_refused_before_measuring(tmp_path, capsys, option, monkeypatch):
    """A review (session 30): a missing --official-checkpoint, or a --checkpoint that is no PyTorch
    file, ran every measurement (up to 15 min) and exited 0, the failure only in the tables'
    error rows."""
    import PAMSegmentLib.benchmark as benchmark

    monkeypatch.setattr(benchmark, "run_benchmark", lambda *a, **k: pytest.fail("measured"))
    out = tmp_path / "tables"
    assert cli.main(["benchmark", "--quick", "--threads", "1", "--no-sam2", "--out", str(out), option,
                     str(tmp_path / "missing.pth")]) == 2
    assert f"checkpoint {tmp_path / 'missing.pth'} does not exist; check the path" in capsys.readouterr().err
    page = tmp_path / "page.pth"
    page.write_text("<html>Not Found</html>")
    assert cli.main(["benchmark", "--quick", "--threads", "1", "--no-sam2", "--out", str(out), option,
                     str(page)]) == 2
    assert "it is not a PyTorch file (it begins '<html>Not Found<')" in capsys.readouterr().err
    assert not out.exists()  # refused before the tables' folder is made
