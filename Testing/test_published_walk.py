"""The authors' published walk (PAM-SPEC, "Propagation"; ``InferenceParams.published_scheme``, the
default of their checkpoint): overlapping windows whose votes are united, a side ending only where
a window's outermost slice is empty, 6-connected components, crops resized without antialiasing
and output scales upsampled with aligned corners. The engine's own walk ended a side at the first
empty slice anywhere in a window and predicted each slice once.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from PAMSegmentLib.checkpoints import InferenceParams
from PAMSegmentLib.preprocess import PreprocessingParams
from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor, propagate

ISO = (1.0, 1.0, 1.0)


def box_volume(n: int = 40, first: int = 5, last: int = 34):
    """A bright 10 x 10 square on slices first..last of n (32 x 32 slices)."""
    truth = np.zeros((n, 32, 32), bool)
    truth[first:last + 1, 10:20, 10:20] = True
    return truth.astype(np.float32), truth


class Tracker(SlicePredictor):
    """Copies the guide's mask onto every query slice that holds the object (an ideal tracker), but
    slice ``miss`` comes out empty when predicted from exactly ``miss_distance`` slices away; records
    every call. Window 5 slices at 1 mm."""

    def __init__(self, truth, published: bool, miss: int | None = None, miss_distance: int = 2):
        self.truth, self.published_scheme = truth, published
        self.miss, self.miss_distance = miss, miss_distance
        self.window_mm, self.max_window = 5.0, 40
        self.calls: list[tuple[int, list[int]]] = []

    def predict(self, volume, guide_index, guide_mask, query_indices):
        self.calls.append((int(guide_index), [int(q) for q in query_indices]))
        prob = np.stack([guide_mask.astype(np.float32) if self.truth[q].any() else
                         np.zeros(guide_mask.shape, np.float32) for q in query_indices])
        for i, q in enumerate(query_indices):
            if q == self.miss and abs(q - guide_index) == self.miss_distance:
                prob[i] = 0.0
        return SlicePrediction(prob)


def prompt_on(truth, k):
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[k][truth[k]] = 1
    return prompt


def held(mask):
    return np.flatnonzero(mask.any(axis=(1, 2))).tolist()


def test_an_empty_slice_inside_a_window_ends_the_engines_walk_but_not_the_published_one():
    """Slice 22 comes out empty from the drawn slice 20 (2 away). The engine ends the side there
    (slices 5-21); the published walk goes on, since the window's outermost slice 25 holds the
    object, and the next guide (25, 3 away) votes for 22 again: the object's whole extent 5-34."""
    image, truth = box_volume()
    engine = propagate(image, prompt_on(truth, 20), ISO, Tracker(truth, False, miss=22))
    assert held(engine.mask) == list(range(5, 22))
    published = propagate(image, prompt_on(truth, 20), ISO, Tracker(truth, True, miss=22))
    assert held(published.mask) == list(range(5, 35))
    np.testing.assert_array_equal(published.mask, truth)


def test_the_published_windows_overlap_and_each_side_ends_where_its_outermost_slice_is_empty():
    """Window 5 from slice 20: upward the guides 20, 25, 30 predict 21-25, then 26-30 and 21-24
    again (behind the guide, down to the drawn slice), then 31-35 and 25-29; slice 35 is empty, so
    the side ends there with the object's last slice 34. Downward the walk reaches slice 0, the
    volume's end: 5 + 9 + 10 + 10 predictions there, 5 + 9 + 10 upward."""
    image, truth = box_volume()
    model = Tracker(truth, True)
    result = propagate(image, prompt_on(truth, 20), ISO, model)
    up = [(g, q) for g, q in model.calls if q[0] > 20]
    assert up == [(20, [21, 22, 23, 24, 25]), (25, [26, 27, 28, 29, 30]), (25, [24, 23, 22, 21]),
                  (30, [31, 32, 33, 34, 35]), (30, [29, 28, 27, 26, 25])]
    down = [(g, q) for g, q in model.calls if q[0] < 20]
    assert [g for g, _ in down] == [20, 15, 15, 10, 10, 5, 5]
    assert down[-2] == (5, [4, 3, 2, 1, 0])
    assert result.n_predicted == sum(len(q) for _, q in model.calls) == 24 + 34
    ups = [s for s in result.stops[1] if s["direction"] == 1]
    assert ups == [{"start": 20, "direction": 1, "last": 34, "reason": "area"}]
    np.testing.assert_array_equal(result.mask, truth)


def test_a_slice_holds_the_union_of_its_votes():
    """A tracker that gives the left half of the square from the drawn slice and the right half
    from any other guide: slices 21-24 get both votes (the whole square), 26-30 only the right
    half (guide 25's), and the drawn slice stays as drawn."""
    image, truth = box_volume(n=31, first=0, last=30)

    class Halves(Tracker):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            half = np.zeros(truth.shape[1:], bool)
            half[:, :15] = True
            side = half if guide_index == 20 else ~half
            return SlicePrediction((truth[list(query_indices)] & side).astype(np.float32))

    result = propagate(image, prompt_on(truth, 20), ISO, Halves(truth, True), remove_disconnected=False)
    for k in range(21, 25):
        np.testing.assert_array_equal(result.mask[k], truth[k])
    assert result.mask[25, 10:20, 10:15].all() and not result.mask[25, 10:20, 15:20].any()  # one vote, from 20
    assert not result.mask[26:31, :, :15].any() and result.mask[26:31, 10:20, 15:20].all()
    np.testing.assert_array_equal(result.mask[20], truth[20])


def test_components_touching_the_drawing_only_along_an_edge_are_removed_by_the_published_walk():
    """The authors keep the components 6-connected to the drawing (scipy's default); the engine
    keeps 26-connected ones. A block that touches the object only along an edge (diagonally in
    the slice) stays with the engine and goes with the published walk."""
    image, truth = box_volume(n=20, first=0, last=19)
    extra = np.zeros_like(truth)
    extra[8:12, 20:24, 20:24] = True  # meets the square (rows/columns 10-19) only at corner (19, 19)

    class Oracle(Tracker):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            self.calls.append((int(guide_index), list(query_indices)))
            return SlicePrediction((truth | extra)[list(query_indices)].astype(np.float32))

    for published, keeps in ((False, True), (True, False)):
        result = propagate(image, prompt_on(truth, 2), ISO, Oracle(truth, published))
        assert bool(result.mask[8:12, 20:24, 20:24].all()) is keeps, published
        np.testing.assert_array_equal(result.mask & ~extra, truth)


def test_the_official_checkpoint_walks_as_published_and_ours_does_not():
    from PAMSegmentLib.checkpoints import PAMModel

    assert InferenceParams().published_scheme is False
    assert InferenceParams.from_dict({"published_scheme": True}).published_scheme is True
    with pytest.raises(ValueError, match="^published_scheme must be true or false, got 'yes'$"):
        InferenceParams.from_dict({"published_scheme": "yes"})
    from PAMSegmentLib.checkpoints import load_model

    assert load_model().inference.published_scheme is False  # the shipped default
    assert isinstance(load_model(), PAMModel)


def test_the_published_scheme_resizes_without_antialiasing_and_aligns_the_scales(monkeypatch):
    """The authors resize crops bilinearly without antialiasing (cv2) and upsample the coarser
    output scales with align_corners=True; the engine's default antialiases and does not align."""
    import torch

    import PAMSegmentLib.pam_predictor as pp
    from PAMSegmentLib.pam_predictor import MemoryPAMPredictor, PAMPredictor

    seen = []
    crop = pp.crop_slices
    fuse = pp.fuse_scales

    def record_crop(*a, **kw):
        if not kw.get("is_mask"):
            seen.append(("antialias", kw.get("antialias", True)))
        return crop(*a, **kw)

    def record_fuse(logits, size, **kw):
        seen.append(("align_corners", kw.get("align_corners", False)))
        return fuse(logits, size, **kw)

    stage = SimpleNamespace(encode_guide=lambda img, mask: (None, None),
                            decode_queries=lambda q, *a: SimpleNamespace(
                                logits=[torch.zeros((q.shape[1], 2, 16, 16)), torch.zeros((q.shape[1], 2, 8, 8))],
                                presence=None))
    monkeypatch.setattr(pp, "crop_slices", record_crop)
    monkeypatch.setattr(pp, "fuse_scales", record_fuse)
    image, truth = box_volume(n=6, first=0, last=5)
    image = image * 100 + np.random.default_rng(0).normal(0, 1, image.shape).astype(np.float32)
    for published in (False, True):
        model = SimpleNamespace(inference=InferenceParams(published_scheme=published),
                                preprocessing=PreprocessingParams(input_size=16), device="cpu",
                                config=SimpleNamespace(mask_prior=False, presence_head=False),
                                network=SimpleNamespace(proposing_stage=stage))
        for p in (PAMPredictor(model), MemoryPAMPredictor(model)):
            # the memory bank walks as the engine does, but its network still sees the input its
            # checkpoint's scheme says (a review: it lost the authors' resizing with their walk)
            assert p.published_scheme is (published and type(p) is PAMPredictor)
            p.begin(image, 0, truth[0])
            seen.clear()
            p._predict_network(image, 0, truth[0], [1, 2])
            assert seen == [("antialias", not published), ("antialias", not published),
                            ("align_corners", published)], (published, type(p).__name__)


def test_crop_resizing_without_antialiasing_is_plain_bilinear():
    """antialias=False gives torch's plain bilinear resize of the crop (what cv2's INTER_LINEAR
    does); with the default a shrunk crop is smoothed first, so the two differ."""
    import torch
    import torch.nn.functional as F

    from PAMSegmentLib.preprocess import CropBox, IntensityWindow, crop_slices

    rng = np.random.default_rng(1)
    slices = rng.uniform(0, 100, (1, 64, 64)).astype(np.float32)
    box, window = CropBox(0, 0, 64), IntensityWindow(0.0, 100.0)
    plain = crop_slices(slices, box, 16, window, antialias=False)
    expected = F.interpolate(torch.from_numpy(slices / 50.0 - 1.0)[:, None], size=(16, 16), mode="bilinear",
                             align_corners=False)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)
    smoothed = crop_slices(slices, box, 16, window)
    assert float((smoothed - plain).abs().mean()) > 0.05


def test_walk_option_sets_the_scheme_and_is_an_option_of_the_network(tmp_path, capsys):
    """--walk published|engine overrides the checkpoint's scheme (here the shipped weights', engine);
    it is refused with a classical method and with --server, like the network's other options."""
    import argparse

    from PAMSegmentLib import cli

    base = dict(checkpoint=None, device="cpu", registration_weight=None, intensity_gate=None, through_plane_mm=None)
    assert cli._pam_method(argparse.Namespace(**base, walk=None)).inference.published_scheme is False
    assert cli._pam_method(argparse.Namespace(**base, walk="published")).inference.published_scheme is True
    assert cli._pam_method(argparse.Namespace(**base, walk="engine")).inference.published_scheme is False
    demo = Path(__file__).resolve().parents[1] / "Resources" / "Demo"
    run = ["propagate", str(demo / "abdomen_ct.nii.gz"), str(demo / "abdomen_prompt.nii.gz"), "-o",
           str(tmp_path / "out.nii.gz"), "--walk", "published"]
    assert cli.main(run + ["--method", "track"]) == 2
    assert capsys.readouterr().err == "pamsegment: error: --walk is an option of --method pam, not track; drop it\n"
    assert cli.main(run + ["--server", "http://127.0.0.1:9"]) == 2
    assert capsys.readouterr().err == ("pamsegment: error: --walk sets up a local model; with --server the server's "
                                       "model is used, drop it\n")
    assert not (tmp_path / "out.nii.gz").exists()


class SeesANeighbourFromFar(Tracker):
    """The tracker, but guides at slice 26 or beyond also see a neighbour (a 4 x 4 block beside the
    object) on every query slice: what a walk that ran into another structure predicts."""

    def predict(self, volume, guide_index, guide_mask, query_indices):
        out = super().predict(volume, guide_index, guide_mask, query_indices)
        if guide_index >= 26:
            out.prob[:, 22:26, 12:16] = 1.0
        return out


def test_an_update_with_a_new_wall_equals_a_fresh_run_under_the_published_walk():
    """A review: an update reused the slices before a new wall from the earlier walk, but under
    the published walk those slices also held votes of guides beyond the wall (guide 30 votes on
    25-29), so the neighbour came back before the wall (120 voxels), unlike a fresh run. Now the
    published walk reuses an earlier walk only when it is the same walk."""
    image, truth = box_volume()
    first = propagate(image, prompt_on(truth, 20), ISO, SeesANeighbourFromFar(truth, True),
                      remove_disconnected=False)
    assert first.mask[25:30, 22:26, 12:16].all()  # the neighbour, voted by guide 30
    update = propagate(image, prompt_on(truth, 20), ISO, SeesANeighbourFromFar(truth, True), empty_slices=[27],
                       previous=first, remove_disconnected=False)
    fresh = propagate(image, prompt_on(truth, 20), ISO, SeesANeighbourFromFar(truth, True), empty_slices=[27],
                      remove_disconnected=False)
    np.testing.assert_array_equal(update.mask, fresh.mask)
    assert not update.mask[:27, 22:26, 12:16].any() and not update.mask[27].any()


def test_a_published_walk_records_its_end_where_the_object_ends_in_the_result():
    """A review: a vote emptied inside a window does not end the published walk, but the result
    ends there once the component filter drops what lies beyond; the stop record (the report's
    walk_end, the drift note) named the window's far end instead. Slice 23 comes out empty from
    every guide: the object ends at 22, and the record says so, with the reason that emptied 23."""
    image, truth = box_volume()

    class Loses23(Tracker):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            out = super().predict(volume, guide_index, guide_mask, query_indices)
            for n, q in enumerate(query_indices):
                if q == 23:
                    out.prob[n] = 0.0
            return out

    result = propagate(image, prompt_on(truth, 20), ISO, Loses23(truth, True))
    assert held(result.mask) == list(range(5, 23))
    assert [s for s in result.stops[1] if s["direction"] == 1] == [
        {"start": 20, "direction": 1, "last": 22, "reason": "area"}]


def test_a_published_walk_ending_inside_its_last_window_says_what_ended_it():
    """A review: when the object ended inside the walk's last window (next to the volume's end),
    the record said "end" at the object's last slice instead of what emptied the next one. Object
    on 5-36 of 40 slices: the walk reaches slice 39, the object ends at 36, and 37 was empty by
    its area."""
    image, truth = box_volume(n=40, first=5, last=36)
    result = propagate(image, prompt_on(truth, 20), ISO, Tracker(truth, True))
    assert [s for s in result.stops[1] if s["direction"] == 1] == [
        {"start": 20, "direction": 1, "last": 36, "reason": "area"}]
    assert result.confidence[1][37] == 0.0  # a slice left empty is not a confident one


def test_a_published_walk_through_interpolated_slices_ends_only_at_an_empty_original_slice():
    """A review: with thick slices an interpolated slice left empty was taken for the object's end
    in the record (the result does not end there: the component filter runs on the original
    slices). A double that finds nothing on every interpolated slice (k = 2) and the truth on the
    original ones: the record ends where the object does, on slice 34."""
    image, truth = box_volume()

    class OnlyOriginals(Tracker):
        through_plane_mm = 0.5  # 1 mm slices: one interpolated slice between neighbours

        def predict(self, volume, guide_index, guide_mask, query_indices):
            prob = np.stack([truth[q // 2].astype(np.float32) if q % 2 == 0 else np.zeros(truth.shape[1:], np.float32)
                             for q in query_indices])
            return SlicePrediction(prob)

    result = propagate(image, prompt_on(truth, 20), ISO, OnlyOriginals(truth, True))
    np.testing.assert_array_equal(result.mask > 0, truth)
    assert sorted((s["direction"], s["last"]) for s in result.stops[1]) == [(-1, 5), (1, 34)]
