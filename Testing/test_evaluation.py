"""Evaluation helpers (PAMSegmentLib.evaluation) and a tiny end-to-end run of scripts/evaluate.py."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from PAMSegmentLib import evaluation as ev
from PAMSegmentLib.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def slab_mask(slices, shape=(16, 12, 12)):
    m = np.zeros(shape, bool)
    for s in slices:
        m[s, 3:8, 4:9] = True
    return m


def test_slice_at_picks_hand_computed_indices():
    m = slab_mask(range(3, 13))  # extent 3..12: last - first = 9
    assert ev.extent(m) == (3, 12)
    # 3 + floor(0.3*9 + 0.5) = 3 + floor(3.2) = 6; 3 + floor(4.5 + 0.5) = 8; 3 + floor(6.3 + 0.5) = 9
    assert [ev.slice_at(m, p) for p in (0.3, 0.5, 0.7)] == [6, 8, 9]
    assert ev.slice_at(m, 0.0) == 3 and ev.slice_at(m, 1.0) == 12
    assert [ev.slice_at(m, p) for p in (0.25, 0.75)] == [5, 10]  # 3+floor(2.75)=5, 3+floor(7.25)=10
    # A gap: 0.5 -> 8 is empty; nearest occupied slices are 10 (distance 2) and 5 (distance 3).
    gap = slab_mask([3, 4, 5, 10, 11, 12])
    assert ev.slice_at(gap, 0.5) == 10
    near = slab_mask([3, 5, 9])  # extent 3..9: 3 + floor(3.5) = 6 is empty; 5 is 1 away, 9 is 3 away
    assert ev.slice_at(near, 0.5) == 5
    tie = slab_mask([2, 3, 5, 8])  # extent 2..8: 0.25 -> 2 + floor(2.0) = 4 is empty; 3 and 5 tie -> lower
    assert ev.slice_at(tie, 0.25) == 3
    with pytest.raises(InputError):
        ev.slice_at(m, 1.5)
    with pytest.raises(InputError):
        ev.slice_at(np.zeros((4, 4, 4), bool), 0.5)


def test_prompt_from_reference_keeps_only_the_given_slices():
    m = slab_mask(range(3, 13))
    p = ev.prompt_from_reference(m, [5, 9])
    assert p.dtype == np.uint8 and set(np.unique(p)) == {0, 1}
    assert np.flatnonzero(p.any(axis=(1, 2))).tolist() == [5, 9]
    assert np.array_equal(p[5] > 0, m[5])


def test_perturbed_prompts_move_the_boundary_by_the_asked_mm():
    rows, cols = np.mgrid[:60, :60]
    disk = (rows - 30) ** 2 + (cols - 30) ** 2 <= 15.5 ** 2  # rows and columns 15..45

    def extent(m):
        r, c = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        return r.min(), r.max(), c.min(), c.max()

    # 1 mm pixels: the outline moves 2 px in or out, and the area follows (radius 15.44 -> ~13.4 / ~17.4)
    eroded = ev.perturb_prompt(disk, (1.0, 1.0), "erode", 2.0)
    dilated = ev.perturb_prompt(disk, (1.0, 1.0), "dilate", 2.0)
    assert extent(eroded) == (17, 43, 17, 43) and extent(dilated) == (13, 47, 13, 47)
    assert (eroded <= disk).all() and (dilated >= disk).all()
    assert abs(np.sqrt(eroded.sum() / np.pi) - 13.44) < 0.3 and abs(np.sqrt(dilated.sum() / np.pi) - 17.44) < 0.3
    # anisotropic pixels (2 mm rows, 1 mm columns): 2 mm is one row but two columns
    assert extent(ev.perturb_prompt(disk, (2.0, 1.0), "erode", 2.0)) == (16, 44, 17, 43)
    assert extent(ev.perturb_prompt(disk, (2.0, 1.0), "dilate", 2.0)) == (14, 46, 13, 47)
    # 3 mm rows: a row's centre is 1.5 mm from its edge, within 2 mm: one row goes (and comes), as
    # on square 3 mm pixels
    assert extent(ev.perturb_prompt(disk, (3.0, 1.0), "erode", 2.0)) == (16, 44, 17, 43)
    assert extent(ev.perturb_prompt(disk, (3.0, 1.0), "dilate", 2.0)) == (14, 46, 13, 47)
    assert extent(ev.perturb_prompt(disk, (3.0, 3.0), "erode", 2.0)) == (16, 44, 16, 44)
    assert extent(ev.perturb_prompt(disk, (3.0, 3.0), "erode", 1.0)) == (15, 45, 15, 45)  # under half a pixel
    # rough: seeded, one piece, moved both in and out, roughly 2 mm on average
    r1 = ev.perturb_prompt(disk, (1.0, 1.0), "rough", 2.0, seed=3)
    assert np.array_equal(r1, ev.perturb_prompt(disk, (1.0, 1.0), "rough", 2.0, seed=3))
    assert not np.array_equal(r1, ev.perturb_prompt(disk, (1.0, 1.0), "rough", 2.0, seed=4))
    assert (r1 & ~disk).sum() > 10 and (disk & ~r1).sum() > 10
    from scipy import ndimage

    assert ndimage.label(r1)[1] == 1
    d = 2 * (r1 & disk).sum() / (r1.sum() + disk.sum())
    assert 0.75 < d < 0.97
    # an erosion larger than the object keeps its centre, never an empty drawing
    tiny = ev.perturb_prompt(disk, (1.0, 1.0), "erode", 40.0)
    assert 1 <= tiny.sum() <= 5 and tiny[30, 30]
    # two pieces (the disk and a 2 px wide bar): both stay drawn, the bar by its deepest pixels
    two = disk.copy()
    two[5:7, 50:58] = True
    for kind in ("erode", "rough"):
        got = ev.perturb_prompt(two, (1.0, 1.0), kind, 2.0, seed=1)
        assert got[:, :48].sum() > 300 and 1 <= got[:9, 48:].sum() <= 20, kind
    assert ev.parse_prompt_variants("erode:2, dilate:1.5,erode:2") == [("erode", 2.0), ("dilate", 1.5)]
    for bad in ("shrink:2", "erode", "erode:-1", "rough:nan"):
        with pytest.raises(InputError, match="KIND:MM"):
            ev.parse_prompt_variants(bad)


def test_slice_dice_worst_slices_and_confidence_hit():
    ref = slab_mask(range(2, 8))
    pred = ref.copy()
    pred[3, 3:8, 4:6] = False  # slice 3 loses 10 of 25 voxels: Dice 2*15/40 = 0.75
    pred[6] = False  # slice 6 missed: Dice 0
    pred[9, 0:2, 0:2] = True  # slice 9 false positive: Dice 0, 4 wrong voxels
    d = ev.slice_dice(pred, ref)
    assert math.isnan(d[0]) and d[2] == 1.0 and d[3] == pytest.approx(0.75) and d[6] == 0.0 and d[9] == 0.0
    # Ties at Dice 0 broken by more wrong voxels (slice 6: 25, slice 9: 4).
    assert ev.worst_slices(pred, ref, k=3) == [6, 9, 3]
    assert ev.worst_slices(pred, ref, k=2, exclude=[6]) == [9, 3]
    conf = np.full(16, np.nan)
    conf[2:10] = [0.9, 0.2, 0.95, 0.9, 0.0, 0.9, 0.9, 0.8]  # slice 6 (empty prediction) is not reviewable
    hit, chance = ev.confidence_hit(conf, pred, ref, exclude=[4])
    assert hit  # least confident predicted slice is 3, among the 3 worst (6, 9, 3)
    # Candidates (predicted, not excluded): 2, 3, 5, 7, 9 -> Dice <= 0.75 for 3 and 9: chance 2/5.
    assert chance == pytest.approx(0.4)
    conf[3], conf[9] = 0.99, 0.95
    hit, _ = ev.confidence_hit(conf, pred, ref, exclude=[4])
    assert not hit  # now slices 2, 5, 7 (Dice 1) tie as least confident: slice 2 is reviewed
    assert ev.confidence_hit(np.full(16, np.nan), pred, ref) is None


def test_correction_slice_and_simulated_session():
    ref = slab_mask(range(2, 12))
    drawn_start = [7]

    def run(drawn):  # an "interpolator" that only knows the drawn slices and fills between them
        out = np.zeros_like(ref)
        lo, hi = min(drawn), max(drawn)
        out[lo:hi + 1] = ref[7]
        return out

    first = run(drawn_start)
    assert ev.correction_slice(first, ref, drawn_start) == 2  # ties at Dice 0: the lowest index
    seen = []
    session = ev.simulate_corrections(run, ref, drawn_start, 3, lambda m: {"dice": ev.slice_dice(m, ref)[ref.any(axis=(1, 2))].mean()},
                                      companions={"other": lambda d: seen.append(list(d)) or ref})
    assert seen == [r["drawn"] for r in session]  # companions see the same drawn slices
    assert all(r["companions"]["other"]["dice"] == 1.0 for r in session)
    assert [r["round"] for r in session] == [0, 1, 2, 3]
    assert session[0]["drawn"] == [7] and session[1]["drawn"] == [2, 7] and session[1]["added"] == 2
    assert session[2]["drawn"] == [2, 7, 8]
    assert all(r["keyframes_kept"] for r in session)
    dices = [r["dice"] for r in session]
    assert dices[0] == pytest.approx(0.1) and dices[1] == pytest.approx(0.6) and dices[2] == pytest.approx(0.7)
    # Once everything is right, the remaining rounds repeat the result.
    perfect = ev.simulate_corrections(lambda d: ref, ref, [7], 2, lambda m: {"dice": 1.0})
    assert [r["round"] for r in perfect] == [0, 1, 2] and all(r["added"] is None for r in perfect)


def test_contour_interpolation_fills_between_identical_squares():
    pytest.importorskip("itk")
    drawn = np.zeros((12, 20, 20), bool)
    drawn[2, 5:12, 6:14] = True
    drawn[8, 5:12, 6:14] = True
    out = ev.contour_interpolation(drawn, axis=0)
    assert out.dtype == bool
    for s in range(2, 9):
        assert np.array_equal(out[s], drawn[2]), s
    assert not out[:2].any() and not out[9:].any()
    # Three drawn slices, two of them adjacent: ITK may add voxels to the middle drawn slice;
    # the wrapper returns every drawn slice exactly as drawn.
    three = np.zeros_like(drawn)
    three[2, 5:12, 6:14] = True
    three[3, 6:10, 7:10] = True
    three[4, 5:12, 6:14] = True
    out3 = ev.contour_interpolation(three)
    for s in (2, 3, 4):
        assert np.array_equal(out3[s], three[s])
    one = np.zeros_like(drawn)
    one[4] = drawn[2]
    assert np.array_equal(ev.contour_interpolation(one), one)  # a single slice: nothing to fill


def test_aggregate_means_by_group_and_filters():
    rows = [
        {"group": "A", "method": "track", "position": 0.5, "dice": 0.8},
        {"group": "A", "method": "track", "position": 0.5, "dice": 0.6},
        {"group": "A", "method": "copy", "position": 0.5, "dice": 0.5},
        {"group": "B", "method": "track", "position": 0.5, "dice": 0.9},
        {"group": "B", "method": "track", "position": 0.3, "dice": 0.1},
        {"group": "B", "method": "copy", "position": 0.5, "dice": None},  # failed run: not counted
    ]
    agg = ev.aggregate(rows, ("group", "method"), "dice", {"position": 0.5})
    assert list(agg) == [("A", "track"), ("A", "copy"), ("B", "track")]
    assert agg[("A", "track")][0] == pytest.approx(0.7) and agg[("A", "track")][1] == 2
    assert agg[("A", "copy")] == (0.5, 1)
    assert agg[("B", "track")] == (0.9, 1)
    overall = ev.aggregate(rows, ("method",), "dice")
    assert overall[("track",)][0] == pytest.approx((0.8 + 0.6 + 0.9 + 0.1) / 4)
    assert ev.aggregate(rows, (), "dice", {"method": "copy"})[()] == (0.5, 1)
    assert math.isnan(ev.mean([None, float("nan")]))
    assert ev.mean([True, False, True, None]) == pytest.approx(2 / 3)


def test_summary_markdown_tables():
    def row(case, name, group, method, pos, d, **kw):
        return {"case": case, "structure": name, "group": group, "method": method, "protocol": "single",
                "position": pos, "dice": d, "nsd": d, "hd95": 1.0, "seconds": 0.5, "n_predicted": 10, **kw}

    rows = [
        row("c1", "s1", "G1", "track", 0.5, 0.8, conf_hit=True, conf_chance=0.25),
        row("c1", "s2", "G1", "track", 0.5, 0.6, conf_hit=False, conf_chance=0.25),
        row("c2", "s3", "G2", "track", 0.5, 0.4),
        row("c1", "s1", "G1", "track", 0.3, 0.7),
        row("c1", "s2", "G1", "track", 0.3, 0.5),
        row("c2", "s3", "G2", "track", 0.3, 0.3),
        {"case": "c1", "structure": "s1", "group": "G1", "method": "track", "protocol": "correction", "round": 0, "dice": 0.8, "keyframes_kept": True},
        {"case": "c1", "structure": "s1", "group": "G1", "method": "track", "protocol": "correction", "round": 1, "dice": 0.9, "keyframes_kept": True},
    ]
    md = ev.summary_markdown(rows, header="## T")
    assert md.startswith("## T")
    assert "| G1 | 2 | 0.700 | 0.700 |" in md
    assert "| G2 | 1 | 0.400 | 0.400 |" in md
    assert "| **all (mean over structures)** | 3 | 0.600 | 0.600 |" in md
    assert "| **all (mean over groups)** | 2 | 0.550 | 0.550 |" in md  # (0.7 + 0.4) / 2
    # Position robustness: 30 % mean 0.5, 50 % mean 0.6, drop 0.1.
    assert "| track | 0.500 | 0.600 | 0.100 |" in md
    assert "| track | 2 | 0.50 | 0.25 |" in md  # confidence hit rate
    assert "| track | 0.800 | 0.900 | 1.00 |" in md  # correction rounds


def test_paired_difference_to_track_with_bootstrap_interval():
    """Differences are paired by case and structure; the interval is a percentile bootstrap of
    the mean over structures, so equal differences give a zero-width interval at that value."""
    def row(case, name, group, method, d, pos=0.5):
        return {"case": case, "structure": name, "group": group, "method": method, "protocol": "single",
                "position": pos, "dice": d, "nsd": d, "hd95": 1.0, "seconds": 0.5, "n_predicted": 10}

    rows = [row("c1", "s1", "G1", "track", 0.7), row("c1", "s1", "G1", "pam", 0.8),
            row("c1", "s2", "G1", "track", 0.5), row("c1", "s2", "G1", "pam", 0.6),
            row("c2", "s1", "G2", "track", 0.9), row("c2", "s1", "G2", "pam", 0.6),  # same name, other case
            row("c2", "s4", "G2", "track", 0.2),  # no pam row: not paired
            row("c1", "s1", "G1", "pam", 0.1, pos=0.3)]  # another position: filtered out
    same = ev.paired_difference(rows, "pam", "track", {"position": 0.5, "group": "G1"})
    assert same["n"] == 2 and same["mean"] == pytest.approx(0.1)
    assert same["lo"] == pytest.approx(0.1) and same["hi"] == pytest.approx(0.1)
    assert (same["ahead"], same["behind"]) == (2, 0)
    both = ev.paired_difference(rows, "pam", "track", {"position": 0.5})
    assert both["n"] == 3 and both["mean"] == pytest.approx((0.1 + 0.1 - 0.3) / 3)
    # resampling 3 structures: the mean can be anywhere from -0.3 (all c2) to +0.1 (no c2)
    assert -0.3 - 1e-9 <= both["lo"] < both["mean"] < both["hi"] <= 0.1 + 1e-9
    assert (both["ahead"], both["behind"]) == (2, 1)
    assert ev.paired_difference(rows, "pam", "copy", {"position": 0.5}) is None
    md = ev.summary_markdown(rows)
    assert "| G1 | +0.100 [+0.100, +0.100] (2 / 0) |" in md
    assert "| G2 | -0.300 [-0.300, -0.300] (0 / 1) |" in md


def test_along_axis_is_what_the_engine_does_for_a_prompt_on_another_axis():
    """``evaluate.py --axis A`` moves axis A first (spacing alike); propagating that case along
    axis 0 gives the engine's result for the original case propagated along A."""
    from PAMSegmentLib.baselines import get_predictor
    from PAMSegmentLib.propagate import propagate

    img = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    case = ev.EvalCase("x", img, (img > 10).astype(np.uint8), (3.0, 2.0, 1.0), {1: "a"})
    t = ev.along_axis(case, 2)
    assert t.image.shape == (4, 2, 3) and t.spacing == (1.0, 3.0, 2.0)
    assert t.image[3, 1, 2] == img[1, 2, 3] and t.labels[3, 1, 2] == 1
    assert ev.along_axis(case, 0) is case
    with pytest.raises(InputError, match="axis must be 0, 1 or 2"):
        ev.along_axis(case, 3)
    # a ball-ish object; the prompt on the middle slice along axis 1
    zz, yy, xx = np.mgrid[:20, :24, :22]
    obj = ((zz - 10) ** 2 / 36 + (yy - 12) ** 2 / 64 + (xx - 11) ** 2 / 49) <= 1
    image = np.where(obj, 100.0, 0.0).astype(np.float32) + np.random.default_rng(0).normal(0, 3, obj.shape).astype(np.float32)
    prompt = np.zeros(obj.shape, np.uint8)
    prompt[:, 12] = obj[:, 12]
    direct = propagate(image, prompt, (1.0, 2.0, 1.5), get_predictor("copy"), axis=1).mask
    moved = ev.along_axis(ev.EvalCase("b", image, prompt, (1.0, 2.0, 1.5), {1: "b"}), 1)
    via = propagate(moved.image, moved.labels, moved.spacing, get_predictor("copy"), axis=0).mask
    assert direct.sum() > prompt.sum()  # it did propagate
    np.testing.assert_array_equal(np.moveaxis(direct, 1, 0), via)


def test_csv_round_trip(tmp_path):
    rows = [{"case": "c", "method": "copy", "protocol": "single", "position": 0.5, "dice": 0.25,
             "prompt_slices": [3, 4], "conf_hit": True, "hd95": float("inf"), "extra": "x"}]
    path = ev.write_csv(rows, tmp_path / "r.csv")
    back = ev.read_csv(path)
    assert back[0]["dice"] == 0.25 and back[0]["position"] == 0.5 and back[0]["conf_hit"] is True
    assert back[0]["prompt_slices"] == "3 4" and back[0]["hd95"] == float("inf") and back[0]["extra"] == "x"
    assert back[0]["nsd"] is None


def test_load_split_filters(tmp_path):
    split = {"eval": [
        {"case": "a", "group": "abdominal CT organs (held out)", "modality": "CT", "structures": [{"id": 1, "name": "spleen"}]},
        {"case": "b", "group": "spine MR", "modality": "MR", "structures": [{"id": 5, "name": "C5"}, {"id": 6, "name": "C6"}]},
    ]}
    p = tmp_path / "split.json"
    p.write_text(json.dumps(split))
    assert len(ev.load_split(p)) == 3
    assert [s.name for s in ev.load_split(p, groups=["spine"])] == ["C5", "C6"]
    assert [s.case for s in ev.load_split(p, cases=["a"])] == ["a"]
    with pytest.raises(InputError, match="does not exist"):
        ev.load_split(tmp_path / "nope.json")
    # A name that selects nothing is refused with what there is (a typo ran the rest silently).
    with pytest.raises(InputError, match=r"^no evaluation case 'nosuch' in .*; evaluation cases: a, b$"):
        ev.load_split(p, cases=["a", "nosuch"])
    with pytest.raises(InputError, match=r"^no evaluation group matches 'brain' in .*; groups: abdominal CT organs "
                                         r"\(held out\), spine MR$"):
        ev.load_split(p, groups=["spine", "brain"])


def test_evaluate_script_refuses_bad_options_before_any_work(tmp_path):
    script = str(REPO / "scripts" / "evaluate.py")
    blocker = tmp_path / "file"
    blocker.write_text("")
    for args, message in [(["--positions", "0.5x"], "error: --positions expects fractions of the extent"),
                          (["--positions", "0.3,1.5"], "error: --positions must lie within [0, 1]"),
                          (["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
                          # accepted before: every NSD 0.000, 8 of 9 structures, a negative round count
                          (["--tolerance", "nan"], "argument --tolerance: expected a distance in mm above 0"),
                          (["--tolerance", "-2"], "argument --tolerance: expected a distance in mm above 0"),
                          (["--limit", "-1"], "argument --limit: expected a whole number of at least 0"),
                          (["--correction-rounds", "-1"], "argument --correction-rounds: expected a whole number"),
                          (["--out", str(blocker / "ev")], f"error: cannot make folder {blocker / 'ev'} for the results (--out)"),
                          (["--from-csv", "--out", str(tmp_path / "none")], "which does not exist: give the --out of")]:
        run = subprocess.run([sys.executable, script, "--cache", str(tmp_path), "--no-figure", *args],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode != 0 and message in run.stderr and "Traceback" not in run.stderr, (args, run.stderr)


def test_evaluate_script_end_to_end(tmp_path, capsys):
    """scripts/evaluate.py on a tiny synthetic case with the copy baseline: every output written."""
    pytest.importorskip("itk")
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[:24, :40, :40]
    obj = ((k - 12) / 8) ** 2 + ((j - 20) / 9) ** 2 + ((i - 18) / 7) ** 2 <= 1
    image = (0.2 + 0.6 * obj + rng.normal(0, 0.05, obj.shape)).astype(np.float32)
    (tmp_path / "cache" / "cases").mkdir(parents=True)
    np.savez(tmp_path / "cache" / "cases" / "tiny.npz", image=image, labels=obj.astype(np.int16) * 3,
             spacing=np.array([2.0, 1.0, 1.0]), label_names=json.dumps({"3": "blob"}), modality="synthetic")
    split = {"eval": [{"case": "tiny", "group": "toy", "modality": "synthetic", "structures": [{"id": 3, "name": "blob"}]}]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    out = tmp_path / "eval"
    # In-process (ITK's contour-interpolation module takes ~10 s to load: load it once per session).
    spec = importlib.util.spec_from_file_location("pam_evaluate_script", REPO / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    code = script.main(["--split", str(tmp_path / "split.json"), "--cache", str(tmp_path / "cache"), "--methods", "copy",
                        "--positions", "0.3,0.5,0.7", "--keyframes", "--correction-rounds", "1",
                        "--prompt-variants", "erode:2", "--tolerance", "3", "--out", str(out)])
    assert code == 0
    assert "[1/1] tiny:blob" in capsys.readouterr().out
    rows = ev.read_csv(out / "results.csv")
    single = [r for r in rows if r["protocol"] == "single"]
    assert sorted(r["position"] for r in single) == [0.3, 0.5, 0.7]
    assert all(r["dice"] > 0.85 for r in single)
    assert {r["method"] for r in rows if r["protocol"] == "keyframes"} == {"copy", "ci"}
    corr = [r for r in rows if r["protocol"] == "correction"]
    assert {(r["method"], r["round"]) for r in corr} == {(m, r) for m in ("copy", "ci@copy", "scratch@copy") for r in (0.0, 1.0)}
    # the update after a correction gives what a run from scratch gives, predicting fewer slices
    by = {(r["method"], r["round"]): r for r in corr}
    assert by[("copy", 1.0)]["dice"] == pytest.approx(by[("scratch@copy", 1.0)]["dice"], abs=1e-6)
    assert by[("copy", 1.0)]["n_predicted"] < by[("scratch@copy", 1.0)]["n_predicted"]
    # contour interpolation is scored on the same drawn slices as the method's session
    assert {r["prompt_slices"] for r in corr if r["round"] == 1.0} == {next(r["prompt_slices"] for r in corr if r["round"] == 1.0)}
    assert all(r["keyframes_kept"] for r in rows if r["keyframes_kept"] is not None)
    # an eroded drawing: the copy baseline carries the smaller outline, so it scores below the exact prompt
    (noisy,) = [r for r in rows if r["protocol"] == "prompt-variant"]
    exact = next(r for r in single if r["position"] == 0.5)
    assert noisy["prompt_variant"] == "erode:2" and noisy["prompt_slices"] == exact["prompt_slices"]
    assert 0.5 < noisy["prompt_dice"] < 0.95 and noisy["dice"] < exact["dice"] - 0.05
    md = (out / "summary.md").read_text()
    assert "| toy | 1 |" in md and "Two keyframes" in md and "correction" in md and "Imperfect prompts" in md
    assert (out / "figure.png").stat().st_size > 1000
    # each row and provenance.json say what made the rows: copy has no weights, its settings' digest
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["command"].startswith("python scripts/evaluate.py --split") and set(prov["methods"]) == {"copy"}
    # the NSD tolerance and axis are recorded in every row and in provenance, and the table names the tolerance
    assert {(r["axis"], r["nsd_tolerance_mm"]) for r in rows} == {(0.0, 3.0)}
    assert (prov["axis"], prov["nsd_tolerance_mm"]) == (0, 3.0)
    assert "normalized surface Dice (3 mm) per structure group" in md
    from PAMSegmentLib.training.provenance import git_changes

    assert prov["git_changes"] == git_changes()  # a review: rows of edited code were stamped as the commit's
    digest = prov["methods"]["copy"]["settings_sha256"]
    assert {(r["weights_sha256"], r["settings_sha256"]) for r in rows if r["method"] != "ci"} == {("", digest)}
    # --from-csv rebuilds the summary from results.csv alone, keeping the run's command line
    (out / "summary.md").write_text((out / "summary.md").read_text().split("\n\n### ")[0])
    assert script.main(["--from-csv", "--out", str(out), "--no-figure"]) == 0
    assert (out / "summary.md").read_text() == md
    assert not (out / "results.partial.csv").exists()
    # A run interrupted after its first structure leaves results.csv as it was (it was cut to that
    # run's rows before) and its own rows in results.partial.csv
    before = (out / "results.csv").read_bytes()
    real = script.evaluate_structure

    def interrupted_after_one(*args, **kwargs):
        if (out / "results.partial.csv").exists():
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    script.evaluate_structure = interrupted_after_one
    split["eval"][0]["structures"].append({"id": 3, "name": "blob again"})
    (tmp_path / "split.json").write_text(json.dumps(split))
    with pytest.raises(KeyboardInterrupt):
        script.main(["--split", str(tmp_path / "split.json"), "--cache", str(tmp_path / "cache"), "--methods", "copy",
                     "--out", str(out), "--no-figure"])
    assert (out / "results.csv").read_bytes() == before
    assert len(ev.read_csv(out / "results.partial.csv")) == 1


def test_evaluate_stamps_each_row_with_the_weights_and_settings_that_made_it(tmp_path, capsys):
    """results.csv recorded no checkpoint, so its figures could not be tied to the weights: each row
    now carries its method's weights sha256 and a digest of its settings (inference parameters
    included), and provenance.json lists them with the command."""
    from PAMSegmentLib.baselines import get_predictor
    from PAMSegmentLib.checkpoints import load_model

    spec = importlib.util.spec_from_file_location("pam_evaluate_script2", REPO / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shipped = REPO / "Resources" / "Models" / "pam_small.pt"
    card = json.loads(shipped.with_suffix(".json").read_text())
    model = load_model(shipped)
    from PAMSegmentLib.propagate import PAMPredictor
    methods = [("pam", PAMPredictor(model)), ("pam:w0", PAMPredictor(model, registration_weight=0.0)),
               ("copy", get_predictor("copy"))]
    stamps = script.method_stamps(methods)
    assert stamps["pam"]["weights_sha256"] == card["sha256_weights"] == stamps["pam:w0"]["weights_sha256"]
    assert stamps["copy"]["weights_sha256"] == ""
    # the same weights at another registration weight are other settings; each digest is 16 hex digits
    assert stamps["pam"]["settings_sha256"] != stamps["pam:w0"]["settings_sha256"]
    assert all(len(v["settings_sha256"]) == 16 for v in stamps.values())
    assert "registration_weight=0.0" in stamps["pam:w0"]["settings"]
    # stamped before the run, they must hold after it: begin() sets state (the drift test, the
    # intensity window, the registration) that is no setting (it showed as 'gate=None' before)
    vol = np.zeros((12, 48, 48), np.float32)
    vol[:, 14:34, 12:36] = 1
    prompt = np.zeros(vol.shape, np.uint8)
    prompt[6, 14:34, 12:36] = 1
    from PAMSegmentLib.propagate import propagate
    for _, predictor in methods:
        propagate(vol, prompt, (2.0, 1.0, 1.0), predictor)
    assert script.method_stamps(methods) == stamps
    rows = [{"method": "pam"}, {"method": "ci@pam"}, {"method": "ci"}, {"method": "copy"}]
    script.stamp_rows(rows, stamps)
    assert [r["weights_sha256"] for r in rows] == [card["sha256_weights"]] * 2 + ["", ""]
    assert [r["settings_sha256"] for r in rows] == [stamps["pam"]["settings_sha256"]] * 2 + \
        ["", stamps["copy"]["settings_sha256"]]


def test_merge_eval_renames_a_method_in_one_input(tmp_path, monkeypatch):
    """scripts/merge_eval.py PATH::OLD=NEW: the same weights run with other inference parameters
    show up beside the current run (pam, ci@pam and scratch@pam renamed; ci untouched); a
    malformed rename is one clear error."""
    import csv
    import subprocess
    import sys

    def write(path, methods):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "group", "structure", "method", "protocol", "position",
                                              "round", "dice"])
            w.writeheader()
            for m in methods:
                w.writerow(dict(case="c", group="g", structure="s", method=m, protocol="single", position=0.5,
                                round=0, dice=0.5))
    write(tmp_path / "new.csv", ["pam"])
    write(tmp_path / "old.csv", ["pam", "ci@pam", "scratch@pam", "ci"])
    spec = importlib.util.spec_from_file_location("pam_merge_eval", REPO / "scripts" / "merge_eval.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    seen = {}
    monkeypatch.setattr(merge.ev, "write_csv",
                        lambda rows, path: seen.setdefault("methods", sorted(r["method"] for r in rows)))
    monkeypatch.setattr(merge.subprocess, "call", lambda *a, **k: 0)  # the summary rebuild: evaluate.py's job
    assert merge.main(["--out", str(tmp_path / "m"), str(tmp_path / "new.csv"),
                       f"{tmp_path / 'old.csv'}::pam=pam-net"]) == 0
    assert seen["methods"] == ["ci", "ci@pam-net", "pam", "pam-net", "scratch@pam-net"]
    bad = subprocess.run([sys.executable, str(REPO / "scripts" / "merge_eval.py"), "--out", str(tmp_path / "b"),
                          f"{tmp_path / 'old.csv'}::pam"], capture_output=True, text=True)
    assert bad.returncode == 1 and "expected PATH::OLD=NEW to rename a method" in bad.stderr


def test_validate_refuses_a_bad_checkpoint_and_an_empty_set_in_one_line(tmp_path):
    """scripts/validate.py loads the checkpoint before any case (no cache is needed to be told the
    file is wrong) and refuses to print a mean over no structures."""
    script = str(REPO / "scripts" / "validate.py")
    for args, message in [([str(REPO / "README.md")], "error: cannot load checkpoint"),
                          ([str(tmp_path / "none.pt")], "does not exist"),
                          ([str(REPO / "README.md"), "--n", "0"], "error: --n must be at least 1")]:
        run = subprocess.run([sys.executable, script, *args, "--cache", str(tmp_path)], capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 1 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_validate_configs_parse_to_predictor_settings():
    """scripts/validate.py: every option of a config reaches the predictor; a typo is an error,
    not a silent plain `pam` run."""
    spec = importlib.util.spec_from_file_location("pam_validate_script", REPO / "scripts" / "validate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.parse_config("pam") == {}
    assert script.parse_config("window15") == {"window_mm": 15.0}
    assert script.parse_config("pam+reg0.5+regside64+regit10+thr0.4+fb0.7+gate") == {
        "registration_weight": 0.5, "registration_options": {"max_side": 64, "iterations": 10},
        "threshold": 0.4, "consistency_min_dice": 0.7, "gate": True}
    assert script.parse_config("pam+gateg") == {"gate": True, "gate_reference": "guide"}
    assert script.parse_config("pam+nogate+reg0") == {"gate": False, "registration_weight": 0.0}
    assert script.parse_config("pam+kfagree0.4") == {"keyframe_outward_min_agreement": 0.4}
    assert script.parse_config("pam+pres0.4") == {"presence_threshold": 0.4}
    assert script.parse_config("pam+crop1.75") == {"crop_scale": 1.75}
    assert script.parse_config("pam+wguide+crop2") == {"network_window": "guide", "crop_scale": 2.0}
    assert script.parse_config("pam+kfwin") == {"network_window": "origin"}
    assert script.parse_config("pam+kfvotes") == {"keyframe_empty_side_votes": True}
    assert script.parse_config("pam+regcoarse10+reglevels2+regit5+regsigma2") == {
        "registration_options": {"coarse_iterations": 10, "coarse_levels": 2, "iterations": 5, "sigma": 2.0}}
    assert script.parse_config("pam+regstep0.5") == {"registration_options": {"max_step": 0.5}}
    assert script.parse_config("track+regstep1") == {"registration_options": {"max_step": 1.0}}
    # a flag that sets a registration option joins the numeric ones, in either order
    both = {"registration_options": {"iterations": 15, "diffeomorphic": True}}
    assert script.parse_config("pam+regit15+regdiffeo") == both == script.parse_config("pam+regdiffeo+regit15")
    assert script.parse_config("track+regdiffeo") == {"registration_options": {"diffeomorphic": True}}
    assert script.parse_config("track") == {}
    with pytest.raises(SystemExit, match="track baseline takes only its registration's options"):
        script.parse_config("track+gate")
    with pytest.raises(SystemExit, match="unknown option 'rge0.5' in config 'pam\\+rge0.5'"):
        script.parse_config("pam+rge0.5")
    with pytest.raises(SystemExit, match="unknown config 'pma'"):
        script.parse_config("pma")


def _record(path, rows, items):
    fields = ("item", "slice", "side", "presence", "a_net", "a_warp", "a_fused", "a_guide", "a_prompt", "gate",
              "dice_net_warp", "a_ref", "inter", "a_pred", "gate_guide")
    full = [[r.get(f, 1.0) for f in fields] for r in rows]
    np.savez(path, rows=np.array(full, dtype=np.float64), fields=np.array(fields),
             items=np.array([json.dumps(x) for x in items]))


def test_score_stop_rules_truncates_each_side_at_the_first_firing_slice(tmp_path):
    """scripts/score_stop_rules.py: a rule ends a side at the first slice (walk order) where it
    fires; that slice and those beyond lose their prediction, the reference still counts."""
    spec = importlib.util.spec_from_file_location("pam_score_stop", REPO / "scripts" / "score_stop_rules.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # Drawn slice 5 (10 ref voxels, all hit). Upward: 6 good, 7 a leak that the presence doubts
    # (0.4), 8 a leak. Downward: 4 good with a low drift score (0.3). 20 ref voxels never reached.
    rows = [
        {"item": 0, "slice": 5, "side": 0, "a_ref": 10, "inter": 10, "a_pred": 10},
        {"item": 0, "slice": 6, "side": 1, "presence": 0.9, "a_ref": 10, "inter": 8, "a_pred": 10},
        {"item": 0, "slice": 7, "side": 1, "presence": 0.4, "a_ref": 0, "inter": 0, "a_pred": 10},
        {"item": 0, "slice": 8, "side": 1, "presence": 0.9, "a_ref": 0, "inter": 0, "a_pred": 10},
        {"item": 0, "slice": 4, "side": -1, "presence": 0.9, "gate_guide": 0.3, "a_ref": 10, "inter": 9,
         "a_pred": 10},
    ]
    path = tmp_path / "rec.npz"
    _record(path, rows, [["case", "thing", 5, 20, 50]])
    as_recorded = 2 * (10 + 8 + 9) / (50 + 50)  # pred 50, ref 30 + 20 missed
    assert script.score(str(path), None)[0] == pytest.approx(as_recorded)
    assert script.score(str(path), "pres<0.5")[0] == pytest.approx(2 * 27 / (30 + 50))  # 7 and 8 dropped
    assert script.score(str(path), "gateg<0.5")[0] == pytest.approx(2 * 18 / (40 + 50))  # slice 4 dropped
    assert script.score(str(path), "pres<0.5|gateg<0.5")[0] == pytest.approx(2 * 18 / (20 + 50))
    # @2: two consecutive firing slices needed; upward 7 fires, 8 does not -> nothing ends
    assert script.score(str(path), "pres<0.5@2")[0] == pytest.approx(as_recorded)
    # Every walked slice below 0.95: upward ends from 6 on; downward slice 4 is the last one
    # there is, so the run of firing slices reaches the side's end and it is dropped too.
    assert script.score(str(path), "pres<0.95@2")[0] == pytest.approx(2 * 10 / (10 + 50))
    with pytest.raises(SystemExit, match="unknown signal 'size'"):
        script.parse_rule("size<3")


def test_validation_structures_and_prompts(tmp_path):
    """The structures validate.py / stop_signals.py choose on: training labels only, big enough,
    drawn with a fixed seed; prompts on the middle slice or at 25 % / 75 % of the extent."""
    labels = np.zeros((12, 16, 16), np.int16)
    labels[2:11, 2:12, 2:12] = 1  # 9 slices x 100 voxels: kept
    labels[2:4, 13:15, 13:15] = 2  # too small
    (tmp_path / "cases").mkdir()
    np.savez(tmp_path / "cases" / "train_a.npz", image=np.zeros(labels.shape, np.float32), labels=labels,
             spacing=np.ones(3), label_names=json.dumps({"1": "block", "2": "speck"}))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [{"case": "train_a", "labels": [1, 2]}], "eval": []}))
    cases, items = ev.validation_items(tmp_path, split, ["train_a"], n=24)
    assert items == [("train_a", 1)] and set(cases) == {"train_a"}
    ref = cases["train_a"].labels == 1
    assert ev.validation_prompt_slices(ref) == [6]  # (2 + 10) // 2
    assert ev.validation_prompt_slices(ref, keyframes=True) == [4, 8]  # 2 + 0.25 * 8, 2 + 0.75 * 8
    with pytest.raises(InputError, match="ts_mr not training cases in split.json; validation uses training cases only"):
        ev.validation_items(tmp_path, split, ["ts_mr"], n=24)


def test_model_card_refuses_another_checkpoints_evaluation(tmp_path):
    """make_model_card.py --eval quoted any results.csv's pam rows; stamped rows of other weights
    are now refused, unstamped ones (older runs) are counted as such."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        from make_model_card import eval_summary
    finally:
        sys.path.remove(str(REPO / "scripts"))
    rows = [dict(case="c", group="g", structure=f"s{i}", method=m, protocol="single", position=0.5, round=0, dice=d,
                 weights_sha256=w, error="")
            for i, (m, d, w) in enumerate([("pam", 0.8, "a" * 64), ("pam", 0.6, ""), ("track", 0.5, "")])]
    ev.write_csv(rows, tmp_path / "r.csv")
    got = eval_summary(tmp_path / "r.csv", "a" * 64)
    assert got["mean_dice_by_group"] == {"g": {"pam": 0.7, "track": 0.5}}
    assert got["pam_rows_with_these_weights"] == "1 of 2"
    with pytest.raises(SystemExit, match=r"were made with weights aaaaaaaaaaaaaaaa\.\.\., not this checkpoint's "
                                         r"bbbbbbbbbbbbbbbb\.\.\."):
        eval_summary(tmp_path / "r.csv", "b" * 64)


def test_merge_eval_keeps_prompt_variants_and_refuses_runs_that_disagree(tmp_path, monkeypatch):
    """A review (s28): merge_eval's duplicate key left out the prompt variant (the imperfect-drawing
    table's 1688 rows became 844, dilate and rough gone without a word), and an axis-1 run merged
    before the axis-0 one put axis-1 rows beside axis-0 ones. Variants are kept; rows of one key
    that score differently (another --axis or --tolerance) are refused."""
    import csv

    def write(path, rows):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "group", "structure", "method", "protocol", "position",
                                              "round", "prompt_variant", "dice", "nsd"])
            w.writeheader()
            for method, variant, dice in rows:
                w.writerow(dict(case="c", group="g", structure="s", method=method, protocol="single", position=0.5,
                                round=0, prompt_variant=variant, dice=dice, nsd=0.5))
    write(tmp_path / "variants.csv", [("pam", "erode:2", 0.8), ("pam", "dilate:2", 0.7), ("track", "erode:2", 0.6),
                                      ("track", "dilate:2", 0.5)])
    write(tmp_path / "other_axis.csv", [("pam", "erode:2", 0.3)])
    spec = importlib.util.spec_from_file_location("pam_merge_eval2", REPO / "scripts" / "merge_eval.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    seen = {}
    monkeypatch.setattr(merge.ev, "write_csv", lambda rows, path: seen.setdefault("n", len(rows)))
    monkeypatch.setattr(merge.subprocess, "call", lambda *a, **k: 0)
    assert merge.main(["--out", str(tmp_path / "m"), str(tmp_path / "variants.csv")]) == 0
    assert seen["n"] == 4
    with pytest.raises(SystemExit, match="with different scores"):
        merge.main(["--out", str(tmp_path / "m2"), str(tmp_path / "variants.csv"), str(tmp_path / "other_axis.csv")])


def test_merge_eval_refuses_runs_of_another_tolerance_or_axis(tmp_path, monkeypatch):
    """Rows record their --axis and NSD --tolerance (a review, s28: neither was recorded, so runs at
    5 mm merged with runs at 2 mm averaged into one table headed "2 mm"). Merging runs of
    different values is refused, naming both; rows written before the columns existed still merge."""
    import csv

    from PAMSegmentLib.evaluation import summary_markdown

    def write(path, structure, extra):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["case", "group", "structure", "method", "protocol", "position",
                                              "round", "dice", "nsd", *extra])
            w.writeheader()
            w.writerow(dict(case="c", group="g", structure=structure, method="pam", protocol="single", position=0.5,
                            round=0, dice=0.8, nsd=0.5, **extra))
    write(tmp_path / "t2.csv", "a", {"axis": 0, "nsd_tolerance_mm": 2})
    write(tmp_path / "t5.csv", "b", {"axis": 0, "nsd_tolerance_mm": 5})
    write(tmp_path / "ax1.csv", "c", {"axis": 1, "nsd_tolerance_mm": 2})
    write(tmp_path / "old.csv", "d", {})
    spec = importlib.util.spec_from_file_location("pam_merge_eval3", REPO / "scripts" / "merge_eval.py")
    merge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(merge)
    seen = {}
    monkeypatch.setattr(merge.ev, "write_csv", lambda rows, path: seen.setdefault(path.parent.name, len(rows)))
    monkeypatch.setattr(merge.subprocess, "call", lambda *a, **k: 0)
    with pytest.raises(SystemExit, match=r"different --tolerance \(2 in .*t2.csv, 5 in .*t5.csv\)"):
        merge.main(["--out", str(tmp_path / "m1"), str(tmp_path / "t2.csv"), str(tmp_path / "t5.csv")])
    with pytest.raises(SystemExit, match=r"different --axis \(0 in .*t2.csv, 1 in .*ax1.csv\)"):
        merge.main(["--out", str(tmp_path / "m2"), str(tmp_path / "t2.csv"), str(tmp_path / "ax1.csv")])
    assert merge.main(["--out", str(tmp_path / "m3"), str(tmp_path / "t2.csv"), str(tmp_path / "old.csv")]) == 0
    assert seen["m3"] == 2
    # rows from before the columns were all run at 2 mm along axis 0 (a re-review, s29: they merged
    # with anything): beside a 5 mm run they are refused too
    with pytest.raises(SystemExit, match=r"different --tolerance \(2 in .*old.csv, 5 in .*t5.csv\)"):
        merge.main(["--out", str(tmp_path / "m4"), str(tmp_path / "old.csv"), str(tmp_path / "t5.csv")])
    rows = [dict(case="c", group="g", structure="a", method="pam", protocol="single", position=0.5, round=0,
                 dice=0.8, nsd=0.5, nsd_tolerance_mm=t) for t in (2.0, 5.0)]
    assert "surface Dice (mixed tolerances: 2 / 5 mm)" in summary_markdown(rows)
    assert "surface Dice (5 mm)" in summary_markdown(rows[1:])
    unrecorded = [{k: v for k, v in rows[0].items() if k != "nsd_tolerance_mm"}]
    assert "surface Dice (mixed tolerances: 2 / 5 mm)" in summary_markdown(unrecorded + rows[1:])


def test_a_group_cell_averaged_over_fewer_structures_says_how_many():
    """A review (s28): a method that failed on a structure was averaged over fewer structures while
    the row showed the largest n (n=3 beside a mean over two)."""
    from PAMSegmentLib.evaluation import summary_markdown

    rows = [dict(case="c", group="g", structure=s, method=m, protocol="single", position=0.5, round=0,
                 dice=d, nsd=d) for s, m, d in [("a", "pam", 0.9), ("b", "pam", 0.9), ("a", "track", 0.5),
                                                 ("b", "track", 0.5), ("c", "track", 0.2)]]
    table = summary_markdown(rows)
    assert "| g | 3 | 0.900 (n=2) | 0.900 | 0.400 | 0.400 |" in table
