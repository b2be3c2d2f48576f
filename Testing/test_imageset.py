"""One-prompt labelling of 2D image sets (PAMSegmentLib.imageset) and ``pamsegment label-images``."""

from __future__ import annotations

import csv
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from doubles import OracleModel

from conftest import REPO
from PAMSegmentLib.errors import InputError, PropagationCancelled
from PAMSegmentLib.imageset import _resize, label_images, thumbnail_distances, to_common_grid
from PAMSegmentLib.metrics import dice
from PAMSegmentLib.propagate import CancelToken, SlicePrediction, SlicePredictor
from PAMSegmentLib.volumes import read_image_2d, read_labelmap_2d, write_labelmap_2d


def disc(shape, centre, radius):
    r, c = np.ogrid[: shape[0], : shape[1]]
    return (r - centre[0]) ** 2 + (c - centre[1]) ** 2 <= radius ** 2


def moving_disc_set(n=8, shape=(48, 48)):
    """Images of a bright disc moving 2 px to the right per image (true order 0..n-1)."""
    truth = np.stack([disc(shape, (24, 10 + 2 * k), 6) for k in range(n)])
    images = truth.astype(np.float32) * 100 + np.random.default_rng(1).normal(0, 1, truth.shape).astype(np.float32)
    return images, truth


class AbsentAt(OracleModel):
    """The oracle, except that the images in ``absent`` come out empty (object not found)."""

    def __init__(self, truth, absent):
        super().__init__(truth)
        self.absent = set(absent)

    def predict(self, volume, guide_index, guide_mask, query_indices):
        out = super().predict(volume, guide_index, guide_mask, query_indices)
        for n, q in enumerate(query_indices):
            if q in self.absent:
                out.prob[n] = 0
        return out


# ----------------------------------------------------------------------------- grids and similarity


def test_common_grid_resizes_each_image_over_its_field_of_view_and_normalises():
    small = np.zeros((10, 20), np.float32)
    small[:, 10:] = 50.0  # right half bright
    big = np.full((40, 40), 7.0, np.float32)
    big[0, 0] = 1000.0  # one outlier pixel: above the 99.5th percentile, clipped
    stack = to_common_grid([small, big], (20, 40))
    assert stack.shape == (2, 20, 40)
    # The bright half stays the right half on the new grid, scaled to 1; the dark half 0.
    assert stack[0][:, :18].max() == 0.0 and stack[0][:, 22:].min() == 1.0
    # A constant image (but for one clipped pixel) has no range: it maps to 0 almost everywhere.
    assert np.count_nonzero(stack[1]) <= 2
    raw = to_common_grid([small], (10, 20), normalize=False)
    assert raw[0].max() == 50.0


def test_mask_resize_there_and_back_is_exact_for_integer_factors():
    m = np.zeros((12, 16), np.uint8)
    m[3:9, 4:11] = 2
    up = _resize(m, (36, 48), nearest=True)
    assert up.dtype == np.uint8 and set(np.unique(up)) == {0, 2}
    assert np.array_equal(_resize(up, (12, 16), nearest=True), m)


def test_thumbnail_distance_ignores_brightness_and_contrast():
    images, _ = moving_disc_set(3)
    images = np.stack([images[0], 3 * images[0] + 40, images[2]])
    d = thumbnail_distances(images, (slice(0, 48), slice(0, 48)))
    assert d[0, 1] == pytest.approx(0.0, abs=1e-6)  # same image up to a linear grey map
    assert d[0, 2] > 0.1  # the disc moved 4 px


# ----------------------------------------------------------------------------- which image guides which


def test_similar_order_recovers_the_sequence_of_a_shuffled_set():
    images, truth = moving_disc_set(8)
    perm = np.random.default_rng(3).permutation(8)  # shuffled; the prompt is the true image 3
    prompt = int(np.flatnonzero(perm == 3)[0])
    oracle = OracleModel(truth[perm])
    res = label_images(images[perm], prompt, truth[3].astype(np.uint8), oracle, order="similar")
    guides = res.guides[1]
    for n in range(8):  # each image was guided by its neighbour towards the prompt in the true order
        if n != prompt:
            true_k, guide_k = perm[n], perm[guides[n]]
            assert guide_k == true_k - np.sign(true_k - 3), (true_k, guide_k)
    assert all(np.array_equal(m > 0, t) for m, t in zip(res.masks, truth[perm]))
    assert res.n_predicted == 7 and res.confidence[1][prompt] == 1.0


def test_prompt_order_guides_every_image_from_the_prompt():
    images, truth = moving_disc_set(5)
    res = label_images(images, 2, truth[2], OracleModel(truth), order="prompt", labels=[1, 1])
    assert list(res.guides[1]) == [2, 2, -1, 2, 2]
    assert res.labels == [1] and res.n_predicted == 4  # a label given twice is labelled once


def test_given_order_walks_out_from_the_prompt_and_an_image_without_the_object_guides_nothing():
    images, truth = moving_disc_set(7)
    res = label_images(images, 3, truth[3], AbsentAt(truth, {5}), order="given")
    # 4 from 3; 5 from 4 (found absent); 6 from 4, the last image holding it; 2 from 3; 1 from 2; 0 from 1.
    assert list(res.guides[1]) == [1, 2, 3, -1, 3, 4, 4]
    assert not res.masks[5].any() and res.confidence[1][5] == 0.0
    assert res.masks[6].any()


def test_similar_order_never_grows_from_an_image_found_absent():
    images, truth = moving_disc_set(8)
    res = label_images(images, 0, truth[0], AbsentAt(truth, {1}), order="similar")
    assert 1 not in set(res.guides[1].tolist())
    assert not res.masks[1].any() and all(res.masks[k].any() for k in range(2, 8))


# ----------------------------------------------------------------------------- several labelled images


def test_more_labelled_images_guide_the_images_nearest_them():
    """Prompt at 0 and a corrected mask at 7 of a moving-disc set: in "similar" order the images
    nearer 7 are reached from 7 (each from its neighbour), in "given" order the sequence is split
    half-way, in "prompt" order each image comes from the more similar drawn image."""
    images, truth = moving_disc_set(8)
    more = {7: truth[7].astype(np.uint8)}
    res = label_images(images, 0, truth[0], OracleModel(truth), order="similar", more_prompts=more)
    assert list(res.guides[1]) == [-1, 0, 1, 2, 5, 6, 7, -1]
    assert res.drawn == (0, 7) and res.n_predicted == 6 and res.confidence[1][7] == 1.0
    assert all(np.array_equal(m > 0, t) for m, t in zip(res.masks, truth))
    assert res.summary().startswith("label 1 found in 6 of 6 images; 6 predictions")
    given = label_images(images, 0, truth[0], OracleModel(truth), order="given", more_prompts=more)
    assert list(given.guides[1]) == [-1, 0, 1, 2, 5, 6, 7, -1]  # 1-3 from 0's side, 4-6 from 7's
    prompt = label_images(images, 0, truth[0], OracleModel(truth), order="prompt", more_prompts=more)
    assert list(prompt.guides[1]) == [-1, 0, 0, 0, 7, 7, 7, -1]


def test_a_labelled_image_without_the_object_is_absent_and_a_wall():
    images, truth = moving_disc_set(8)
    more = {4: np.zeros((48, 48), np.uint8), 6: truth[6].astype(np.uint8) * 2}  # 6 holds label 2 only
    prompt = truth[1].astype(np.uint8)
    prompt[2:5, 2:5] = 2  # the prompt holds label 2 as well; only label 1 is labelled
    res = label_images(images, 1, prompt, OracleModel(truth), order="given", more_prompts=more, labels=[1])
    # label 1: 4 and 6 lack it; 0, 2, 3 come from 1's side; 5 lies between two walls; 7 beyond one
    assert list(res.guides[1]) == [1, -1, 1, 2, -1, -1, -1, -1]
    assert not res.masks[4].any() and not res.masks[5].any() and not res.masks[7].any()
    np.testing.assert_array_equal(res.masks[6], np.zeros((48, 48)))  # label 2 is not among the labels labelled
    assert res.confidence[1][4] == 0.0 and res.confidence[1][1] == 1.0


@pytest.mark.parametrize("more, message", [
    ({0: np.ones((48, 48), np.uint8)}, "is the prompt image itself"),
    ({9: np.ones((48, 48), np.uint8)}, "9 is not one of the 3 images' numbers"),
    ({1: np.ones((40, 48), np.uint8)}, "the mask given for image 1 is 40x48 but the image is 48x48"),
    ({1: np.full((48, 48), 0.5)}, "must be an integer label map"),
    ({1: np.ones((48, 48), np.uint8), 2: np.ones((48, 48), np.uint8)}, "every image has a mask already"),
    ([np.ones((48, 48))], "more_prompts must be a dict"),
    ({1: np.full((48, 48), 7, np.uint8)}, "the mask given for image 1 holds label 7, which the prompt mask does not "
                                          r"\(it holds 1\): use the prompt's label values"),
])
def test_bad_more_prompts_get_one_clear_message(more, message):
    images, truth = moving_disc_set(3)
    with pytest.raises(InputError, match=message):
        label_images(images, 0, truth[0].astype(np.uint8), OracleModel(truth), more_prompts=more)


def test_cli_labelled_keeps_a_corrected_mask_and_guides_from_it(tmp_path, run_cli):
    images, truth = moving_disc_set(6)
    _write_set(tmp_path / "set", images, truth[0])
    corrected = tmp_path / "img_5_fixed.png"
    sitk.WriteImage(sitk.GetImageFromArray(truth[5].astype(np.uint8) * 3), str(corrected))
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--method", "copy", "--order", "given",
                   "--labelled", tmp_path / "set" / "img_5.png", corrected)
    assert proc.returncode == 0, proc.stderr
    assert "label 3 found in 4 of 4 images" in proc.stdout
    with open(tmp_path / "out" / "labels.csv") as fh:
        rows = {r["mask"]: r for r in csv.DictReader(fh)}
    assert rows["img_5_mask.png"]["guided_by"] == "(drawn)" and rows["img_0_mask.png"]["guided_by"] == "(drawn)"
    assert rows["img_4_mask.png"]["guided_by"] == str(tmp_path / "set" / "img_5.png")
    assert rows["img_1_mask.png"]["guided_by"] == str(tmp_path / "set" / "img_0.png")
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "img_5_mask.png")))
    np.testing.assert_array_equal(got, truth[5].astype(np.uint8) * 3)  # kept as drawn
    # its mask file is an input: -o may not write over it, and an image and its mask differ
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--labelled", corrected, corrected)
    assert proc.returncode == 2 and "the image and its mask are the same file" in proc.stderr
    # the prompt image given as a mask was a StopIteration traceback; the prompt mask given as an image
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--labelled", tmp_path / "set" / "img_5.png", tmp_path / "set" / "img_0.png")
    assert proc.returncode == 2 and "the mask is one of the labelled images" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--labelled", tmp_path / "mask.png", corrected)
    assert proc.returncode == 2 and "is a mask given with the prompt or another --labelled image" in proc.stderr
    # with --order given a labelled image outside the sequence has no place in it
    outside = tmp_path / "img_9.png"
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "set" / "img_5.png")), str(outside))
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out2", "--order", "given", "--labelled", outside, corrected)
    assert proc.returncode == 2 and "is not one of the images to label: with --order given it must be" in proc.stderr
    (tmp_path / "out" / "img_5_mask.png").unlink()
    (tmp_path / "out" / "img_5_mask.png").symlink_to(corrected)
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--method", "copy", "--labelled", tmp_path / "set" / "img_5.png", corrected)
    assert proc.returncode == 2 and "a symbolic link to the --labelled mask" in proc.stderr


def test_images_of_other_sizes_get_masks_on_their_own_grid():
    images, truth = moving_disc_set(3)
    big = _resize(images[1], (96, 96))  # the same picture at twice the size
    res = label_images([images[0], big, images[2]], 0, truth[0], OracleModel(truth), order="prompt")
    assert res.masks[1].shape == (96, 96)
    assert dice(res.masks[1] > 0, _resize(truth[1].astype(np.uint8), (96, 96), nearest=True) > 0) > 0.97


def test_several_labels_earlier_ones_keep_overlapping_pixels():
    images, truth = moving_disc_set(3)

    class Fixed(SlicePredictor):  # every label's mask is the guide's widened by 2 px left and right
        def predict(self, volume, guide_index, guide_mask, query_indices):
            wide = guide_mask | np.roll(guide_mask, 2, axis=1) | np.roll(guide_mask, -2, axis=1)
            wide |= np.roll(guide_mask, 1, axis=1) | np.roll(guide_mask, -1, axis=1)
            return SlicePrediction(wide[None].astype(np.float32))

    prompt = np.zeros((48, 48), np.uint8)
    prompt[10:20, 10:20] = 1
    prompt[10:20, 20:30] = 2
    res = label_images(images, 0, prompt, Fixed(), order="prompt")
    m = res.masks[1]
    # Label 1 covers columns 8-21 (140 px); label 2 columns 18-31, of which 18-21 went to label 1.
    assert (m == 1).sum() == 140 and (m == 2).sum() == 140 - 40
    assert res.labels == [1, 2]


def test_cancel_raises_and_returns_nothing():
    images, truth = moving_disc_set(5)
    token = CancelToken()
    calls = []

    def progress(fraction, message):
        calls.append(fraction)
        token.cancel()

    with pytest.raises(PropagationCancelled):
        label_images(images, 0, truth[0], OracleModel(truth), progress=progress, cancel=token)
    assert len(calls) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=[np.zeros((16, 16))], prompt_index=0), "at least 2 images"),
    (dict(prompt_index=5), "outside the 3 images"),
    (dict(prompt_mask=np.zeros((48, 48), np.uint8)), "prompt mask is empty"),
    (dict(prompt_mask=np.ones((40, 48), np.uint8)), "prompt mask is 40x48"),
    (dict(prompt_mask=np.full((48, 48), 0.5)), "integer label map"),
    (dict(labels=[4]), "label 4 is not in the prompt mask"),
    (dict(images=[np.zeros((48, 48))] * 3, prompt_mask=np.zeros((48, 48), np.uint8)), "prompt mask is empty"),
    (dict(order="random"), "order must be one of"),
    (dict(images=[np.zeros((48, 48, 3))] * 3), "must be a 2D image"),
])
def test_bad_input_gets_one_clear_message(kwargs, message):
    images, truth = moving_disc_set(3)
    args = dict(images=list(images), prompt_index=0, prompt_mask=truth[0].astype(np.uint8))
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        label_images(args.pop("images"), args.pop("prompt_index"), args.pop("prompt_mask"), OracleModel(truth), **args)


# ----------------------------------------------------------------------------- the shipped weights on real slices


def test_shipped_weights_label_a_shuffled_set_of_real_ct_slices():
    """The bundled CT's spleen (an organ never trained on): its 30 axial slices shuffled, the middle
    one labelled. Measured: mean Dice 0.90 (similar order) vs 0.67 (every image from the prompt)."""
    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.volumes import read_labelmap, read_volume

    default_model = load_model(None)
    image = read_volume(REPO / "Resources" / "Demo" / "abdomen_ct.nii.gz").array
    ref = read_labelmap(REPO / "Resources" / "Demo" / "abdomen_reference.nii.gz").array == 1
    ks = np.flatnonzero(ref.any(axis=(1, 2)))
    perm = np.random.default_rng(0).permutation(ks)
    prompt = int(np.flatnonzero(perm == ks[len(ks) // 2])[0])
    res = label_images([image[k] for k in perm], prompt, ref[perm[prompt]].astype(np.uint8), default_model)
    scores = [dice(m > 0, ref[k]) for n, (m, k) in enumerate(zip(res.masks, perm)) if n != prompt]
    assert len(scores) == 29
    assert np.mean(scores) > 0.85


# ----------------------------------------------------------------------------- 2D image files


def test_colour_images_read_as_grey_and_masks_keep_the_image_geometry(tmp_path):
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: grey 0.299 x 200
    path = tmp_path / "red.png"
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))
    arr, ref = read_image_2d(path)
    assert arr.shape == (6, 8) and arr[0, 0] == pytest.approx(59.8, abs=1e-3)
    nrrd = sitk.GetImageFromArray(np.zeros((6, 8), np.float32))
    nrrd.SetSpacing((0.5, 0.25))
    nrrd.SetOrigin((10.0, -3.0))
    sitk.WriteImage(nrrd, str(tmp_path / "img.nrrd"))
    _, ref = read_image_2d(tmp_path / "img.nrrd")
    mask = np.zeros((6, 8), np.uint16)
    mask[1, 2] = 300
    out = write_labelmap_2d(mask, ref, tmp_path / "m.nrrd")
    back = sitk.ReadImage(str(out))
    assert back.GetSpacing() == (0.5, 0.25) and back.GetOrigin() == (10.0, -3.0)
    assert sitk.GetArrayFromImage(back)[1, 2] == 300
    with pytest.raises(InputError, match="use one of"):
        write_labelmap_2d(mask, ref, tmp_path / "m.jpg")  # lossy: never a mask format


def test_colour_mask_and_3d_files_are_refused(tmp_path):
    colour = np.zeros((6, 8, 3), np.uint8)
    colour[2:4, 3:5] = (200, 30, 30)  # (a mask whose red, green and blue are equal is read as grey: session 41)
    sitk.WriteImage(sitk.GetImageFromArray(colour, isVector=True), str(tmp_path / "c.png"))
    with pytest.raises(InputError, match="colour image; save the mask as a grey-level"):
        read_labelmap_2d(tmp_path / "c.png")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 6, 8), np.float32)), str(tmp_path / "v.nrrd"))
    with pytest.raises(InputError, match="is a 3D image .8 x 6 x 4., not a 2D image; for a volume use .pamsegment propagate"):
        read_image_2d(tmp_path / "v.nrrd")


def _write_set(folder, images, truth):
    folder.mkdir()
    for k, im in enumerate(images):
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(im, 0, 255).astype(np.uint8)), str(folder / f"img_{k}.png"))
    sitk.WriteImage(sitk.GetImageFromArray(truth.astype(np.uint8) * 3), str(folder.parent / "mask.png"))


def test_cli_labels_a_folder_and_writes_one_mask_per_image_and_a_table(tmp_path, run_cli):
    images, truth = moving_disc_set(6)
    _write_set(tmp_path / "set", images, truth[2])
    proc = run_cli("label-images", tmp_path / "set" / "img_2.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--method", "track")
    assert proc.returncode == 0, proc.stderr
    assert "label 3 found in 5 of 5 images" in proc.stdout
    with open(tmp_path / "out" / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["mask"] for r in rows] == [f"img_{k}_mask.png" for k in range(6)]  # the folder's order
    assert rows[2]["guided_by"] == "(drawn)"
    for k in range(6):
        got = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"img_{k}_mask.png")))
        assert set(np.unique(got)) <= {0, 3}
        assert dice(got > 0, truth[k]) > (0.99 if k == 2 else 0.6), k  # the drawn image keeps the drawing
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"img_{k}_mask.png" for k in range(6)] + ["labels.csv"])  # no temporary files left
    # the three least confident masks are named, as propagate names its least confident slices (a review:
    # only the counts were printed); they are the lowest confidences of labels.csv
    lowest = sorted((float(r["confidence"]), int(r["mask"][4])) for r in rows if r["guided_by"] != "(drawn)")[:3]
    named = ", ".join(f"img_{k}.png" for _, k in lowest)
    assert f"least confident masks, to check first: label 3: {named}" in proc.stdout


def test_cli_interrupted_while_writing_leaves_no_folder_it_made(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or a failure) while the masks are written: an -o folder this run made is removed
    again (it was left empty); one that was there stays, as it was."""
    from PAMSegmentLib import cli, volumes

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(volumes, "write_labelmap_2d", interrupted)
    run = ["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"), str(tmp_path / "set"),
           "--method", "copy", "-o"]
    assert cli.main([*run, str(tmp_path / "out")]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "mine").mkdir()
    assert cli.main([*run, str(tmp_path / "mine")]) == 130
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_cli_moves_the_masks_in_with_ctrl_c_ignored(tmp_path, monkeypatch):
    """Ctrl-C between two of the final renames would leave some new masks beside old ones."""
    import signal

    from PAMSegmentLib import cli

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])
    from doubles import record_ctrl_c_handler

    from PAMSegmentLib import imageset as imageset_module

    handlers = record_ctrl_c_handler(monkeypatch, imageset_module)
    assert cli.main(["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"),
                     str(tmp_path / "set"), "--method", "copy", "-o", str(tmp_path / "out")]) == 0
    moved = [str(tmp_path / "out" / f"img_{k}_mask.png") for k in range(3)] + [str(tmp_path / "out" / "labels.csv")]
    assert [handlers[path] for path in moved] == [signal.SIG_IGN] * 4
    assert handlers["wrote"] == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_cli_refuses_an_output_link_into_a_missing_folder_before_any_work(tmp_path, monkeypatch, capsys):
    """labels.csv in -o is a link whose target's folder is gone: the table's temporary could not be
    written there, after all the work (a FileNotFoundError traceback); now refused first."""
    from PAMSegmentLib import cli
    from PAMSegmentLib import imageset as imageset_module

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "labels.csv").symlink_to(tmp_path / "gone" / "labels.csv")
    monkeypatch.setattr(imageset_module, "label_images", lambda *a, **k: pytest.fail("no work before the refusal"))
    assert cli.main(["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"),
                     str(tmp_path / "set"), "--method", "copy", "-o", str(out)]) == 2
    assert capsys.readouterr().err == (f"pamsegment: error: {out / 'labels.csv'} is a symbolic link to "
                                       f"{tmp_path / 'gone' / 'labels.csv'}, whose folder does not exist; remove the "
                                       "link or choose another output\n")
    assert [p.name for p in out.iterdir()] == ["labels.csv"]


def test_cli_keeps_symbolic_links_among_the_outputs(tmp_path):
    """A mask or labels.csv in -o that is a symbolic link stays one: its target gets the new file
    (and no temporary is left beside it)."""
    from PAMSegmentLib import cli

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])
    out, elsewhere = tmp_path / "out", tmp_path / "targets"
    out.mkdir()
    elsewhere.mkdir()
    for name in ("img_1_mask.png", "labels.csv"):
        (elsewhere / name).write_text("old")
        (out / name).symlink_to(elsewhere / name)
    assert cli.main(["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"),
                     str(tmp_path / "set"), "--method", "copy", "-o", str(out)]) == 0
    assert (out / "img_1_mask.png").is_symlink() and (out / "labels.csv").is_symlink()
    assert not (out / "img_0_mask.png").is_symlink()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["img_1_mask.png", "labels.csv"]
    assert sorted(p.name for p in out.iterdir()) == ["img_0_mask.png", "img_1_mask.png", "img_2_mask.png",
                                                     "labels.csv"]
    got = sitk.GetArrayFromImage(sitk.ReadImage(str(elsewhere / "img_1_mask.png")))
    assert dice(got > 0, truth[1]) > 0.8  # measured 0.840
    with open(elsewhere / "labels.csv") as fh:
        assert [r["mask"] for r in csv.DictReader(fh)] == [f"img_{k}_mask.png" for k in range(3)]


def test_cli_refuses_a_mask_of_another_size_before_any_work(tmp_path, run_cli):
    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0][:40])
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 2
    assert "the mask mask.png is 48 x 40 pixels but its image is 48 x 48" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_names_a_bad_image_by_its_file(tmp_path, run_cli):
    images, truth = moving_disc_set(2)
    _write_set(tmp_path / "set", images, truth[0])
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 64), np.uint8)), str(tmp_path / "set" / "line.png"))
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 2
    assert "line.png is 64 x 1 pixels (width x height); images need at least 8 x 8" in proc.stderr


# IMG_1.png (session 29): names that differ only in case are one file on macOS and Windows
@pytest.mark.parametrize("other_name", ["img_1.png", "IMG_1.png"])
def test_cli_refuses_two_images_that_would_share_a_mask_name(tmp_path, run_cli, other_name):
    images, truth = moving_disc_set(2)
    _write_set(tmp_path / "set", images, truth[0])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / other_name).write_bytes((tmp_path / "set" / "img_1.png").read_bytes())
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   tmp_path / "b", "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 2 and "would both be written as img_1_mask" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_to_write_masks_among_the_images(tmp_path, run_cli):
    images, truth = moving_disc_set(2)
    _write_set(tmp_path / "set", images, truth[0])
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "set", "--method", "copy")
    assert proc.returncode == 2 and f"the prompt image {tmp_path / 'set' / 'img_0.png'} lies in -o " in proc.stderr
    assert "write the masks to a folder of their own" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["img_0.png", "img_1.png"]
    # The drawn mask kept in the masks folder (as img_0_mask.png) is never written over.
    (tmp_path / "masks").mkdir()
    drawn = tmp_path / "masks" / "img_0_mask.png"
    drawn.write_bytes((tmp_path / "mask.png").read_bytes())
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", drawn, tmp_path / "set",
                   "-o", tmp_path / "masks", "--method", "copy")
    assert proc.returncode == 2 and f"the prompt mask {drawn} lies in -o {tmp_path / 'masks'}" in proc.stderr
    assert drawn.read_bytes() == (tmp_path / "mask.png").read_bytes()
    # A mask corrected in place after a first run, given back with --labelled: named as such.
    fixed = tmp_path / "masks" / "img_1_mask.png"
    fixed.write_bytes((tmp_path / "mask.png").read_bytes())
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", tmp_path / "masks", "--method", "copy", "--labelled", tmp_path / "set" / "img_1.png", fixed)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"pamsegment: error: the --labelled mask {fixed} lies in -o {tmp_path / 'masks'}, where this run writes its "
        f"masks; copy the corrected mask out of {tmp_path / 'masks'} (or write to another -o folder)")
    assert fixed.read_bytes() == (tmp_path / "mask.png").read_bytes()
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "set" / "img_0.png", tmp_path / "set",
                   "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 2 and "are the same file" in proc.stderr


def test_cli_refuses_an_output_folder_it_cannot_write_before_labelling(tmp_path, run_cli, monkeypatch):
    """-o in a folder that takes no files (a read-only share; /proc here, which even root cannot
    write) was found only after the whole set was labelled: a PermissionError traceback, exit 1."""
    images, truth = moving_disc_set(2)
    _write_set(tmp_path / "set", images, truth[0])
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                   "-o", "/proc/pamsegment-masks", "--method", "copy")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "pamsegment: error: cannot write the masks folder pamsegment-masks in folder /proc (")
    assert "labelling" not in proc.stdout + proc.stderr  # refused before any work


def test_masks_that_are_not_label_maps_are_refused_and_palette_pngs_read(tmp_path):
    from PIL import Image
    from scipy import ndimage

    square = np.zeros((40, 40), np.float32)
    square[10:30, 10:30] = 255
    smooth = np.round(ndimage.gaussian_filter(square, 1.5)).astype(np.uint8)  # anti-aliased edges
    Image.fromarray(smooth).save(tmp_path / "aa.png")
    with pytest.raises(InputError, match=r"aa.png has \d+ grey values, \d+ of them only along the edges"):
        read_labelmap_2d(tmp_path / "aa.png")
    Image.fromarray(square.astype(np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(InputError, match="is a JPEG"):
        read_labelmap_2d(tmp_path / "m.jpg")
    labels = np.zeros((40, 40), np.uint8)
    labels[10:30, 10:20], labels[10:30, 20:30] = 1, 2
    pal = Image.fromarray(labels, mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # label 1 red, 2 green
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(read_labelmap_2d(tmp_path / "pal.png"), labels)  # the indices, not the colours
    # Several genuine labels side by side are not mistaken for edges.
    three = np.zeros((40, 40), np.uint8)
    three[5:15, 5:15], three[5:15, 15:25], three[20:30, 5:15] = 1, 2, 3
    Image.fromarray(three).save(tmp_path / "three.png")
    assert np.array_equal(read_labelmap_2d(tmp_path / "three.png"), three)
    grey_alpha = Image.fromarray(labels * 100).convert("LA")
    grey_alpha.save(tmp_path / "la.png")
    assert np.array_equal(read_image_2d(tmp_path / "la.png")[0], labels * 100.0)


def test_a_one_slice_volume_gets_its_mask_where_it_lies(tmp_path, run_cli):
    """A coronal slice of a scan saved as a one-slice 3D NIfTI: its mask keeps the slice's 3D origin
    and orientation (it was written as 2D, losing both)."""
    images, truth = moving_disc_set(2)
    _write_set(tmp_path / "set", images[:1], truth[0])
    one = sitk.GetImageFromArray(images[1][None].astype(np.float32))
    one.SetOrigin((5.0, 6.0, 70.0))
    one.SetDirection((1, 0, 0, 0, 0, 1, 0, -1, 0))
    sitk.WriteImage(one, str(tmp_path / "coronal.nii.gz"))
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "coronal.nii.gz",
                   "-o", tmp_path / "out", "--format", "nii.gz", "--method", "copy")
    assert proc.returncode == 0, proc.stderr
    mask = sitk.ReadImage(str(tmp_path / "out" / "coronal_mask.nii.gz"))
    assert mask.GetSize() == (48, 48, 1) and mask.GetOrigin() == (5.0, 6.0, 70.0)
    assert np.allclose(mask.GetDirection(), (1, 0, 0, 0, 0, 1, 0, -1, 0))


def test_cli_names_a_missing_image_in_one_line_before_any_work(tmp_path, capsys):
    """A mistyped image path (or one in a missing folder, with -o already there) was a
    FileNotFoundError traceback with exit status 1."""
    from PAMSegmentLib import cli

    images, truth = moving_disc_set(2)
    _write_set(tmp_path / "set", images, truth[0])

    def run(image):
        return cli.main(["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"),
                         str(tmp_path / "set"), str(image), "--method", "copy", "-o", str(tmp_path / "out")])

    missing = tmp_path / "missing.png"
    assert run(missing) == 2
    assert capsys.readouterr().err == f"pamsegment: error: {missing} does not exist; check the path\n"
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    nodir = tmp_path / "nodir" / "missing.png"
    assert run(nodir) == 2
    assert capsys.readouterr().err == f"pamsegment: error: {nodir} does not exist; check the path\n"
    assert not any((tmp_path / "out").iterdir())


def test_cli_refuses_outputs_that_link_to_its_inputs_before_any_work(tmp_path, capsys, monkeypatch):
    """A mask name or labels.csv in -o that is a symbolic link to the prompt mask or an image: the
    link's target would get the new file, so the drawn mask lost its label 2 (a link to a file that
    is not an input stays a link: test_cli_keeps_symbolic_links_among_the_outputs)."""
    from PAMSegmentLib import cli
    from PAMSegmentLib import imageset as imageset_module

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])
    drawn = truth[0].astype(np.uint8)
    drawn[:4, :4] = 2  # a second structure the user drew
    sitk.WriteImage(sitk.GetImageFromArray(drawn), str(tmp_path / "mask.png"))
    before = {p.name: p.read_bytes() for p in [tmp_path / "mask.png", *(tmp_path / "set").iterdir()]}
    monkeypatch.setattr(imageset_module, "label_images", lambda *a, **k: pytest.fail("no work before the refusal"))
    out = tmp_path / "out"
    out.mkdir()
    run = ["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"), str(tmp_path / "set"),
           "--method", "copy", "--label", "1", "-o", str(out)]
    for name, target, what in (("img_0_mask.png", tmp_path / "mask.png", "the prompt mask"),
                               ("img_1_mask.png", tmp_path / "set" / "img_2.png", "the image"),
                               ("labels.csv", tmp_path / "set" / "img_0.png", "the prompt image")):
        (out / name).symlink_to(target)
        assert cli.main(run) == 2
        assert capsys.readouterr().err == (f"pamsegment: error: {out / name} is a symbolic link to {what} {target}, "
                                           "which this run would write over; remove the link or choose another "
                                           "-o folder\n")
        (out / name).unlink()
    assert {p.name: p.read_bytes() for p in [tmp_path / "mask.png", *(tmp_path / "set").iterdir()]} == before
    assert np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mask.png")))).tolist() == [0, 1, 2]
    assert not any(out.iterdir())


def test_cli_refuses_a_folder_where_a_mask_or_the_table_goes_before_any_work(tmp_path, capsys, monkeypatch):
    """A folder named like a mask (or labels.csv) in -o made the final move fail half-way, with a
    traceback, after the earlier masks were replaced."""
    from PAMSegmentLib import cli
    from PAMSegmentLib import imageset as imageset_module

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])
    monkeypatch.setattr(imageset_module, "label_images", lambda *a, **k: pytest.fail("no work before the refusal"))
    out = tmp_path / "out"
    run = ["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"), str(tmp_path / "set"),
           "--method", "copy", "-o", str(out)]
    for name, what in (("img_1_mask.png", "a mask"), ("labels.csv", "labels.csv")):
        (out / name).mkdir(parents=True)
        assert cli.main(run) == 2
        assert capsys.readouterr().err == (f"pamsegment: error: {out / name} is a folder, where this run would write "
                                           f"{what}; move it away or choose another -o folder\n")
        assert [p.name for p in out.iterdir()] == [name]
        (out / name).rmdir()


@pytest.mark.parametrize("fail_at, message", [  # labels.csv goes in first, then the masks in order
    ("labels.csv", "cannot write {out}/labels.csv (Permission denied): nothing was replaced; fix that and run again"),
    # the files moved in before the failure are put back (they mixed two runs before)
    ("img_0_mask.png", "cannot write {out}/img_0_mask.png (Permission denied): nothing was replaced (labels.csv put "
                       "back as it was); fix that and run again"),
    ("img_1_mask.png", "cannot write {out}/img_1_mask.png (Permission denied): nothing was replaced (labels.csv, "
                       "img_0_mask.png put back as they were); fix that and run again"),
])
def test_cli_a_failed_final_move_says_what_was_and_was_not_replaced(tmp_path, capsys, monkeypatch, fail_at, message):
    """A move that fails at the end (after the checks: a permission, a full disk) was an OSError
    traceback (exit 1) that left a mix of new and old masks unsaid; then it said the mix; now the
    files moved in before it are put back: the earlier run's outputs, whole."""
    import os

    from PAMSegmentLib import cli

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])
    out = tmp_path / "out"
    run = ["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"), str(tmp_path / "set"),
           "--method", "copy", "-o", str(out)]
    assert cli.main(run) == 0  # the earlier run: label 3
    capsys.readouterr()
    sitk.WriteImage(sitk.GetImageFromArray(truth[0].astype(np.uint8) * 5), str(tmp_path / "mask.png"))  # now label 5
    replace = os.replace

    def failing(src, dst):
        if os.fspath(dst) == str(out / fail_at):
            raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    assert cli.main(run) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"pamsegment: error: {message.format(out=out)}"  # after the bar
    labels = [int(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"img_{k}_mask.png"))).max()) for k in range(3)]
    assert labels == [3, 3, 3]  # the earlier run's masks, all of them
    with open(out / "labels.csv", encoding="utf-8") as fh:  # and its table
        assert {r["label"] for r in csv.DictReader(fh)} == {"3"}
    assert sorted(p.name for p in out.iterdir()) == ["img_0_mask.png", "img_1_mask.png", "img_2_mask.png",
                                                     "labels.csv"]  # no temporaries left


def test_cli_sorts_a_folder_by_name_with_numbers_by_value(tmp_path, capsys):
    """frame_1, 2, 3, 10, 11 in a folder: a plain string sort walked frame_1 -> frame_10 -> frame_11
    -> frame_2 -> frame_3 with --order given, scrambling the sequence. Files without an image
    extension (e.g. a DICOM file without .dcm) are not taken from a folder."""
    from PAMSegmentLib import cli

    images, truth = moving_disc_set(5)
    (tmp_path / "frames").mkdir()
    for n, im in zip((1, 2, 3, 10, 11), images):
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(im, 0, 255).astype(np.uint8)),
                        str(tmp_path / "frames" / f"frame_{n}.png"))
    (tmp_path / "frames" / "notes").write_text("not an image")
    sitk.WriteImage(sitk.GetImageFromArray(truth[0].astype(np.uint8)), str(tmp_path / "mask.png"))
    assert cli.main(["label-images", str(tmp_path / "frames" / "frame_1.png"), str(tmp_path / "mask.png"),
                     str(tmp_path / "frames"), "--method", "copy", "--order", "given",
                     "-o", str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "labels.csv") as fh:
        rows = [(Path(r["image"]).name, Path(r["guided_by"]).name) for r in csv.DictReader(fh)]
    assert rows == [("frame_1.png", "(drawn)"), ("frame_2.png", "frame_1.png"), ("frame_3.png", "frame_2.png"),
                    ("frame_10.png", "frame_3.png"), ("frame_11.png", "frame_10.png")]
    from PAMSegmentLib.imageset import _natural

    names = ["b10.png", "B2.png", "a.png", "b02.png", "b1.png"]
    assert sorted(names, key=lambda n: _natural(Path(n))) == ["a.png", "b1.png", "B2.png", "b02.png", "b10.png"]


def test_cli_labels_an_image_given_twice_once(tmp_path, capsys):
    """A folder and one of its files: the error said "set/img_1.png and set/img_1.png would both be
    written as img_1_mask; rename one", which renaming cannot fix (it is one file)."""
    from PAMSegmentLib import cli

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images, truth[0])
    (tmp_path / "link.png").symlink_to(tmp_path / "set" / "img_2.png")
    assert cli.main(["label-images", str(tmp_path / "set" / "img_0.png"), str(tmp_path / "mask.png"),
                     str(tmp_path / "set"), str(tmp_path / "set" / "img_1.png"), str(tmp_path / "link.png"),
                     "--method", "copy", "-o", str(tmp_path / "out")]) == 0
    assert (f"note: {tmp_path / 'set' / 'img_1.png'} is given twice (and 1 more); each image is labelled once"
            ) in capsys.readouterr().out  # by itself and in its folder: the same path, named once
    with open(tmp_path / "out" / "labels.csv") as fh:
        assert [r["mask"] for r in csv.DictReader(fh)] == ["img_0_mask.png", "img_1_mask.png", "img_2_mask.png"]


def test_the_readme_quotes_the_evaluation_commands_that_give_its_figures():
    """The quoted `evaluate_image_sets.py ... --sets evaluation` ran the script's default configs
    (pam and pam-nogate, similar and prompt): no `given`, `track` or `copy` column. And `pam-reg0`,
    "the network without registration", also has the drift test off."""
    import inspect
    import re
    import sys

    text = (REPO / "README.md").read_text()
    start = text.index("### Sets of 2D images")
    section = " ".join(text[start:text.index("### Cells in large 2D images")].split())
    commands = dict(re.findall(r"--sets (evaluation|validation) --configs (\S+?)[`,]?[`;]", section))
    assert commands["evaluation"].split(",") == ["pam:similar", "pam:prompt", "pam:given", "track:similar",
                                                 "copy:prompt"]
    assert ("| set (held-out structures) | sets | `similar` (default) | `prompt` | `given` (true order) | "
            "`track`, similar order | `copy` from the prompt |") in section
    assert commands["validation"].split(",") == ["pam:similar", "pam:prompt", "pam-reg0:similar", "track:similar",
                                                 "pam:given"]
    assert "the network alone (`pam-reg0`: without the registration and without the drift test) 0.596" in section
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import evaluate_image_sets
    finally:
        sys.path.remove(str(REPO / "scripts"))
    source = inspect.getsource(evaluate_image_sets.make_predictor)
    assert 'if method == "pam-reg0":\n        model.inference = replace(model.inference, intensity_gate=False)' in source


class GuideCopy2D(SlicePredictor):
    """Predicts the guide's mask unchanged: far from the prompt the masks drift from the truth."""

    threshold, min_area, presence_threshold = 0.5, 0, 0.5

    def predict(self, volume, guide_index, guide_mask, query_indices):
        return SlicePrediction(np.stack([guide_mask.astype(np.float32)] * len(query_indices)))


def test_the_image_set_correction_rounds_draw_the_worst_image_and_score_the_rest():
    """scripts/evaluate_image_sets.py --corrections: each round the worst labelled image is drawn
    (as the simulated user would correct it) and every round is scored over the same images, the
    ones never drawn. On a moving disc copied from image 0 the worst is the last image; drawn, it
    guides its neighbours, whose masks then overlap the truth better."""
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import evaluate_image_sets
    finally:
        sys.path.remove(str(REPO / "scripts"))
    images, truth = moving_disc_set(8)
    predictor = GuideCopy2D()
    first = label_images(images, 0, truth[0], predictor, order="given")
    rounds = evaluate_image_sets.correction_rounds(list(images), list(truth), 0, predictor, "given", first, 1)
    kept = range(1, 7)  # image 7, the worst, was drawn: scored neither before nor after
    before = np.mean([dice(first.masks[q] > 0, truth[q]) for q in kept])
    assert rounds[0] == pytest.approx(before)
    after = label_images(images, 0, truth[0], predictor, order="given", more_prompts={7: truth[7].astype(np.uint8)})
    assert rounds[1] == pytest.approx(np.mean([dice(after.masks[q] > 0, truth[q]) for q in kept]))
    assert rounds[1] > rounds[0] + 0.1


def test_cli_refuses_a_multi_page_tiff_among_the_images(tmp_path, run_cli):
    """A stack given as one of the images is refused as a 3D image (ITK reads every page); the
    adversarial review's "first page only" was a (3, H, W) array that tifffile writes as one
    planar RGB page, a colour image by its own tags."""
    from PIL import Image

    images, truth = moving_disc_set(3)
    _write_set(tmp_path / "set", images[:1], truth[0])
    pages = [Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)) for im in images]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "stack.tif",
                   "-o", tmp_path / "out", "--method", "copy")
    assert proc.returncode == 2
    assert "stack.tif is a 3D image" in proc.stderr and "for a volume use `pamsegment propagate`" in proc.stderr
    # a 2D review: channels of a microscopy TIFF were only told to use propagate
    assert "(a TIFF of several pages: channels, or a stack?)" in proc.stderr
    assert "save the channel or plane to label as a file of its own" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_output_folder_that_is_a_broken_link_before_labelling(tmp_path, run_cli):
    """-o a dangling link (or a loop of links) passed the checks, then mkdir raised FileExistsError
    after the whole set was labelled: a traceback, exit 1."""
    images, truth = moving_disc_set(2)
    _write_set(tmp_path / "set", images, truth[0])
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    for link in ("dangling", "loop1"):
        proc = run_cli("label-images", tmp_path / "set" / "img_0.png", tmp_path / "mask.png", tmp_path / "set",
                       "-o", tmp_path / link, "--method", "copy")
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == (
            f"pamsegment: error: -o {tmp_path / link} is a symbolic link to nothing (or one of a loop of links); give a "
            "folder, or point the link at one")


def test_tiled_and_grey_alpha_tiffs_keep_their_values(tmp_path, monkeypatch):
    """ITK reads a tiled TIFF through an 8-bit RGBA fallback (a 16-bit slide export lost its
    values: 0 cells found) and interleaves a grey + alpha TIFF's two samples into one grey row."""
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    from PAMSegmentLib import volumes
    from PAMSegmentLib.errors import InputError

    rng = np.random.default_rng(0)
    grey16 = rng.integers(0, 4000, size=(64, 96), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "tiled.tif", grey16, tile=(32, 32), compression="zlib")
    arr, _ = volumes.read_image_2d(tmp_path / "tiled.tif")
    assert arr.shape == (64, 96) and np.array_equal(arr, grey16.astype(np.float32))
    grey8 = rng.integers(0, 255, size=(64, 96), dtype=np.uint8)
    Image.fromarray(np.stack([grey8, np.full_like(grey8, 255)], -1), "LA").save(tmp_path / "la.tif")
    arr, _ = volumes.read_image_2d(tmp_path / "la.tif")
    assert arr.shape == (64, 96) and np.array_equal(arr, grey8.astype(np.float32))
    # An ordinary TIFF is ITK's read, as before; one neither reader can decode faithfully is refused.
    tifffile.imwrite(tmp_path / "strip.tif", grey16)
    assert np.array_equal(volumes.read_image_2d(tmp_path / "strip.tif")[0], grey16.astype(np.float32))
    monkeypatch.setattr(volumes, "_tiff_pixels", lambda p: None)
    with pytest.raises(InputError, match=r"tiled.tif is a tiled TIFF of 1 sample\(s\) x 16 bits per pixel that ITK "
                                         r"reads as 4 x 8 bits .*install tifffile and imagecodecs"):
        volumes.read_image_2d(tmp_path / "tiled.tif")


def test_an_image_given_as_a_mask_is_named_as_such(tmp_path):
    """The image given by mistake as a mask (label-cells --background, label-images' mask) was
    called "an anti-aliased (smoothed) mask"."""
    from PIL import Image

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap_2d

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "image.png")
    with pytest.raises(InputError, match=r"image.png has 255 grey values and looks like an image, not a label map: was "
                                         r"the image given in the mask's place\?"):
        read_labelmap_2d(tmp_path / "image.png")


def test_tiffs_itk_reads_faithfully_are_read_as_before(tmp_path, monkeypatch):
    """Only the two cases where ITK loses values are read again: a 1-bit TIFF (a traceback), a stack
    of tiled pages (read as its first page instead of refused as 3D) and a palette TIFF (read as its
    indices) came out differently once every TIFF whose bits ITK reported otherwise was read again."""
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    from PAMSegmentLib import volumes
    from PAMSegmentLib.errors import InputError

    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2, size=(40, 56)).astype(bool)
    Image.fromarray(bits).save(tmp_path / "bilevel.tif")
    palette = Image.fromarray(rng.integers(0, 4, size=(40, 56), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
    palette.save(tmp_path / "palette.tif")
    for name in ("bilevel.tif", "palette.tif"):
        itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name)))
        if itk.ndim == 3:
            itk = np.tensordot(itk[..., :3].astype(np.float32), np.asarray(volumes._LUMA, np.float32), axes=([-1], [0]))
        np.testing.assert_array_equal(volumes.read_image_2d(tmp_path / name)[0], itk.astype(np.float32))
    stack = rng.integers(0, 4000, size=(3, 32, 32), dtype=np.uint16)
    with tifffile.TiffWriter(tmp_path / "stack.tif") as writer:  # three tiled pages (a z-stack)
        for page in stack:
            writer.write(page, tile=(16, 16))
    with pytest.raises(InputError, match="3D image"):
        volumes.read_image_2d(tmp_path / "stack.tif")
    # Without tifffile's decoder (a compression it needs imagecodecs for), Pillow reads the tiled 16-bit file.
    grey16 = rng.integers(0, 4000, size=(64, 96), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "tiled.tif", grey16, tile=(32, 32), compression="zlib")
    monkeypatch.setitem(sys.modules, "tifffile", None)
    np.testing.assert_array_equal(volumes.read_image_2d(tmp_path / "tiled.tif")[0], grey16.astype(np.float32))


def _three_squares():
    """Three noisy 48 x 48 images holding the same bright square, and its mask."""
    rng = np.random.default_rng(0)
    images = [rng.normal(100, 10, (48, 48)) for _ in range(3)]
    mask = np.zeros((48, 48), np.uint8)
    mask[15:30, 15:30] = 1
    for image in images:
        image[mask > 0] += 80
    return images, mask


def test_normalised_sets_widen_the_drift_test_unless_the_predictor_sets_it(monkeypatch):
    """The floor used per run (recorded from the gate each begin builds), and put back after it."""
    from PAMSegmentLib import baselines
    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.imageset import NORMALISED_DRIFT_FLOOR, label_images
    from PAMSegmentLib.pam_predictor import PAMPredictor

    used, real = [], baselines.IntensityGate.from_prompt.__func__

    def recording(cls, *args, sd_floor=0.02, **kwargs):
        used.append(sd_floor)
        return real(cls, *args, sd_floor=sd_floor, **kwargs)

    monkeypatch.setattr(baselines.IntensityGate, "from_prompt", classmethod(recording))
    images, mask = _three_squares()
    predictor = PAMPredictor(load_model())
    for normalize, expected in ((True, NORMALISED_DRIFT_FLOOR), (False, 0.02)):
        used.clear()
        label_images(images, 0, mask, predictor, normalize=normalize)
        assert used and set(used) == {expected}
        assert predictor.gate_sd_floor == 0.02 and "gate_sd_floor" not in vars(predictor)  # put back
    predictor.gate_sd_floor = 0.03  # set by the caller (scripts/evaluate_image_sets.py pam-floorF): used as given
    used.clear()
    label_images(images, 0, mask, predictor)
    assert set(used) == {0.03} and predictor.gate_sd_floor == 0.03


def test_image_sets_test_drift_against_the_guide_where_the_checkpoint_says_both(monkeypatch):
    """Session 27's shipped "both" (chosen on volumes) scored lower on the image-set validation
    sets (0.662 vs 0.665 against the guide): label_images runs the checkpoint's "both" against the
    guide image, then puts the predictor back; a reference the caller set otherwise is kept."""
    import dataclasses

    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.imageset import label_images
    from PAMSegmentLib.pam_predictor import PAMPredictor

    images, mask = _three_squares()
    model = load_model()
    model.inference = dataclasses.replace(model.inference, intensity_gate=True, intensity_gate_reference="both")
    seen = []
    real = PAMPredictor.predict

    def recording(self, *args, **kwargs):
        seen.append(self.gate_reference)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PAMPredictor, "predict", recording)
    predictor = PAMPredictor(model)
    label_images(images, 0, mask, predictor)
    assert seen and set(seen) == {"guide"} and predictor.gate_reference == "both"
    seen.clear()
    label_images(images, 0, mask, PAMPredictor(model, gate_reference="prompt"))
    assert set(seen) == {"prompt"}
    seen.clear()  # a second review: "both" asked for (evaluate_image_sets.py pam-both) is kept too
    label_images(images, 0, mask, PAMPredictor(model, gate_reference="both"))
    assert set(seen) == {"both"}


def test_a_damaged_image_of_a_known_type_is_called_damaged(tmp_path):
    """A damaged .png was told the list of extensions it could be (.png among them)."""
    from PAMSegmentLib.volumes import read_image_2d

    bad = tmp_path / "img_021.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(InputError, match=r"img_021.png as an image \(.*\); is the file damaged\? copy or export it "
                                         r"again$"):
        read_image_2d(bad)
    odd = tmp_path / "img_022.xyz"
    odd.write_bytes(b"\0" * 40)
    with pytest.raises(InputError, match=r"expected \.png, \.jpg"):
        read_image_2d(odd)


def test_images_stored_flipped_or_transposed_are_labelled_in_the_prompts_orientation(tmp_path, capsys):
    """A review: label-images matched images by pixel order, so an image stored flipped or
    transposed against the prompt image (the same picture in every viewer) got its mask mirrored
    (Dice 0.89 with --method copy) or transposed (0.82). Where the files place themselves in space,
    each image is now labelled in the prompt image's orientation and its mask written as it is
    stored: in physical space the masks are the prompt's."""
    from PAMSegmentLib import cli

    rng = np.random.default_rng(3)
    j, i = np.mgrid[:40, :50]
    picture = (100 + 80 * (((j - 15) / 9.0) ** 2 + ((i - 30) / 12.0) ** 2 <= 1) + rng.normal(0, 3, (40, 50)))
    prompt = sitk.GetImageFromArray(picture.astype(np.float32))
    prompt.SetSpacing((0.7, 0.7))
    prompt.SetOrigin((5.0, -3.0))
    truth = (((j - 15) / 9.0) ** 2 + ((i - 30) / 12.0) ** 2 <= 1).astype(np.uint8)
    mask = sitk.GetImageFromArray(truth)
    mask.CopyInformation(prompt)
    (tmp_path / "set").mkdir()
    sitk.WriteImage(prompt, str(tmp_path / "prompt.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "prompt_mask.nii.gz"))
    sitk.WriteImage(sitk.Flip(prompt, [True, False]), str(tmp_path / "set" / "flipped.nii.gz"))
    sitk.WriteImage(sitk.PermuteAxes(prompt, [1, 0]), str(tmp_path / "set" / "transposed.nii.gz"))
    assert cli.main(["label-images", str(tmp_path / "prompt.nii.gz"), str(tmp_path / "prompt_mask.nii.gz"),
                     str(tmp_path / "set"), "-o", str(tmp_path / "out"), "--method", "copy", "--format",
                     "nii.gz"]) == 0
    out = capsys.readouterr().out
    assert "note: flipped.nii.gz is stored flipped horizontally against the prompt image" in out
    assert "note: transposed.nii.gz is stored transposed against the prompt image" in out
    for name in ("flipped", "transposed"):
        written = sitk.ReadImage(str(tmp_path / "out" / f"{name}_mask.nii.gz"))
        back = sitk.GetArrayFromImage(sitk.Resample(written, prompt, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        assert np.array_equal(back > 0, truth > 0), name


@pytest.mark.parametrize("flat", [0, 1])  # a sagittal (i) and a coronal (j) one-slice file
def test_one_slice_files_of_any_plane_are_2d_images(tmp_path, flat):
    """A review: a one-slice 3D file whose single slice is not along k (a coronal or sagittal slice
    saved from a volume) was refused by label-images ("a 3D image ... use propagate") and by
    propagate ("a single slice ... needs a 3D volume"). It is a 2D image: read, and its mask written
    on the file's own 3D grid."""
    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_image_2d

    rng = np.random.default_rng(1)
    size = [30, 30, 24]
    size[flat] = 1
    files = {}
    for name in ("prompt", "other"):
        volume = sitk.GetImageFromArray(rng.normal(100, 5, tuple(reversed(size))).astype(np.float32))
        volume.SetSpacing((0.8, 0.9, 2.0))
        volume.SetOrigin((1.0, 2.0, 3.0))
        files[name] = tmp_path / f"{name}.nii.gz"
        sitk.WriteImage(volume, str(files[name]))
    arr, original = read_image_2d(files["prompt"])
    assert arr.shape == tuple(n for a, n in reversed(list(enumerate(size))) if a != flat)
    assert original.GetSize() == tuple(size)
    mask = sitk.GetImageFromArray((np.arange(arr.size).reshape(arr.shape) % 7 == 0).astype(np.uint8)[..., None]
                                  .reshape(tuple(reversed(size))))
    mask.CopyInformation(original)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    assert cli.main(["label-images", str(files["prompt"]), str(tmp_path / "mask.nii.gz"), str(files["other"]),
                     "-o", str(tmp_path / "out"), "--method", "copy", "--format", "nii.gz"]) == 0
    written = sitk.ReadImage(str(tmp_path / "out" / "other_mask.nii.gz"))
    assert written.GetSize() == tuple(size) and written.GetSpacing() == pytest.approx((0.8, 0.9, 2.0))


def test_one_slice_volumes_are_turned_and_their_masks_checked_in_the_slices_plane(tmp_path, capsys):
    """A review: a DICOM file or a one-slice volume (read as 3D) stored flipped got its mask
    mirrored without a note (only 2D files were turned), and a mask on the same pixels whose file
    gave the single slice another thickness (ITK gives a DICOM file 1, other tools its thickness)
    was refused as off the grid. Both are read in the slice's plane now."""
    from PAMSegmentLib import cli

    rng = np.random.default_rng(4)
    j, i = np.mgrid[:40, :50]
    truth = (((j - 15) / 9.0) ** 2 + ((i - 30) / 12.0) ** 2 <= 1).astype(np.uint8)
    picture = (100 + 80 * truth + rng.normal(0, 3, (40, 50))).astype(np.float32)
    prompt = sitk.GetImageFromArray(picture[None])  # 50 x 40 x 1
    prompt.SetSpacing((0.7, 0.7, 1.0))
    prompt.SetOrigin((5.0, -3.0, 12.0))
    (tmp_path / "set").mkdir()
    sitk.WriteImage(prompt, str(tmp_path / "prompt.nii.gz"))
    mask = sitk.GetImageFromArray(truth[None])
    mask.CopyInformation(prompt)
    mask.SetSpacing((0.7, 0.7, 3.0))  # the slice's thickness, as another tool writes it
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    sitk.WriteImage(sitk.Flip(prompt, [True, False, False]), str(tmp_path / "set" / "flipped.nii.gz"))
    assert cli.main(["label-images", str(tmp_path / "prompt.nii.gz"), str(tmp_path / "mask.nii.gz"),
                     str(tmp_path / "set"), "-o", str(tmp_path / "out"), "--method", "copy", "--format", "nii.gz"]) == 0
    assert "note: flipped.nii.gz is stored flipped horizontally against the prompt image" in capsys.readouterr().out
    written = sitk.ReadImage(str(tmp_path / "out" / "flipped_mask.nii.gz"))
    back = sitk.GetArrayFromImage(sitk.Resample(written, prompt, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    assert np.array_equal(back[0] > 0, truth > 0)
    shifted = sitk.GetImageFromArray(truth[None])
    shifted.CopyInformation(prompt)
    shifted.SetOrigin((5.0, -3.0, 16.0))  # another plane, 4 mm away
    sitk.WriteImage(shifted, str(tmp_path / "other_plane.nii.gz"))
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d, read_labelmap_2d

    with pytest.raises(InputError, match=r"the mask other_plane.nii.gz is not on its image's grid \(origin"):
        read_labelmap_2d(tmp_path / "other_plane.nii.gz", reference=read_image_2d(tmp_path / "prompt.nii.gz"))


def test_a_2d_file_oblique_to_a_one_slice_prompt_image_is_said(tmp_path):
    """A carried review finding: a 2D file rotated within its plane against a one-slice prompt
    volume of the same (axial) plane was matched as stored without the note a 2D prompt gives; a
    2D file against a slice of another plane (coronal) has nothing to be compared by: no note."""
    from PAMSegmentLib.imageset import orientation_to

    def saved(array, name, direction=None):  # as read from a file that places itself (NIfTI)
        image = sitk.GetImageFromArray(array)
        if direction is not None:
            image.SetDirection(direction)
        sitk.WriteImage(image, str(tmp_path / name))
        return sitk.ReadImage(str(tmp_path / name))

    axial = saved(np.zeros((1, 20, 30), np.float32), "axial.nii.gz")
    coronal = saved(np.zeros((20, 1, 30), np.float32), "coronal.nii.gz")
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    flat = saved(np.zeros((20, 30), np.float32), "turned.nii.gz", (c, -s, s, c))  # turned 30 degrees in its plane
    said = []
    assert orientation_to(axial, flat, "turned.nii.gz", said.append) is None
    assert said == ["turned.nii.gz is stored obliquely to the prompt image (its axes are not parallel to the prompt "
                    "image's): its pixels are matched as stored"]
    said.clear()
    assert orientation_to(coronal, flat, "turned.nii.gz", said.append) is None and said == []
    flat = saved(np.zeros((20, 30), np.float32), "flipped.nii.gz", (-1.0, 0.0, 0.0, 1.0))  # stored flipped
    assert orientation_to(axial, flat, "flipped.nii.gz", said.append) == (False, False, True)
    assert orientation_to(flat, axial, "axial.nii.gz") == (False, False, True)


def test_planar_16_bit_and_64_bit_float_tiffs_keep_their_values(tmp_path, monkeypatch):
    """A 2D review: a 16-bit TIFF whose samples are stored plane after plane (tifffile's default
    for a (3, H, W) array) went through ITK's 8-bit fallback (a dim 12-bit image: 3 grey levels,
    cell F1 0.817 -> 0.519, exit 0); a float64 TIFF, which ITK cannot read, was called damaged;
    a palette PNG mask past Pillow's pixel guard was a DecompressionBombError traceback."""
    tifffile = pytest.importorskip("tifffile")
    from PIL import Image

    from PAMSegmentLib import volumes

    rng = np.random.default_rng(2)
    dim = rng.integers(100, 453, size=(48, 64), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", np.stack([dim, dim, dim]), photometric="rgb", planarconfig="separate")
    arr, _ = volumes.read_image_2d(tmp_path / "planar.tif")
    assert np.abs(arr - dim).max() <= 1 and len(np.unique(arr)) > 200
    tifffile.imwrite(tmp_path / "f64.tif", dim.astype(np.float64) / 7)
    np.testing.assert_allclose(volumes.read_image_2d(tmp_path / "f64.tif")[0], dim / 7, rtol=1e-6)
    palette = Image.fromarray(rng.integers(0, 3, size=(64, 64), dtype=np.uint8), "P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "mask.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # as a 180 Mpx mask is to Pillow's default guard
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert volumes._palette_indices(tmp_path / "mask.png").shape == (64, 64)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_dicom_files_named_by_their_uids_are_labelled_under_their_whole_names(tmp_path, capsys):
    """A 2D review: DICOM files named by UID (CT.1.3.12...16583, the usual export) all lost their
    last part in their output names and clashed, so such a set could not be labelled; their folder
    was "no image files" without a word of why."""
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib import cli

    vol = make_volume(shape=(3, 40, 48), direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    write_dicom_series(tmp_path / "dcm", vol, "1.2.826.0.1.3680043.2.1125.7.51")
    files = []
    for n, f in enumerate(sorted((tmp_path / "dcm").iterdir())):
        files.append(f.rename(tmp_path / "dcm" / f"CT.1.2.826.0.1.3680043.2.1125.7.51.{1000 + n}"))
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 12:36] = 1
    from PIL import Image

    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert cli.main(["label-images", str(files[0]), str(tmp_path / "mask.png"), str(tmp_path / "dcm"), "-o",
                     str(tmp_path / "out")]) == 2
    assert "holds 3 DICOM files without .dcm in their names, left out of a folder: name them on the command " \
           "line" in capsys.readouterr().err
    assert cli.main(["label-images", str(files[0]), str(tmp_path / "mask.png"), *map(str, files), "-o",
                     str(tmp_path / "out"), "--method", "copy"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*_mask.png")) == [f"{f.name}_mask.png" for f in files]


def test_masks_lying_among_the_images_of_a_folder_are_left_out(tmp_path, capsys):
    """A 2D review: img.png beside img_mask.png (a common layout, or this command's own masks
    copied back) were labelled as images too (x_mask_mask.png), and could guide real images."""
    from PIL import Image

    from PAMSegmentLib import cli

    rng = np.random.default_rng(5)
    (tmp_path / "set").mkdir()
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 12:36] = 1
    for n in range(3):
        Image.fromarray((rng.normal(100, 5, (40, 48)) + 80 * mask).clip(0, 255).astype(np.uint8)).save(
            tmp_path / "set" / f"s{n}.png")
        Image.fromarray(mask).save(tmp_path / "set" / f"s{n}_mask.png")
    assert cli.main(["label-images", str(tmp_path / "set" / "s1.png"), str(tmp_path / "set" / "s1_mask.png"),
                     str(tmp_path / "set"), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    assert "note: left out 2 files named *_mask (s0_mask.png, s2_mask.png): masks, not images to label" in \
        capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["s0_mask.png", "s1_mask.png", "s2_mask.png"]


def test_images_a_label_was_not_found_in_and_an_earlier_runs_masks_are_named(tmp_path, capsys):
    """A 2D review: images where a label was missed were named nowhere on the console (only the
    least confident of those holding it), and a run into the folder of an earlier, larger run left
    that run's masks beside the new labels.csv without a word."""
    from PIL import Image

    from PAMSegmentLib import cli

    rng = np.random.default_rng(6)
    (tmp_path / "set").mkdir()
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 12:36] = 1
    for n in range(3):
        Image.fromarray((rng.normal(100, 5, (40, 48)) + 80 * mask * (n != 2)).clip(0, 255).astype(np.uint8)).save(
            tmp_path / "set" / f"s{n}.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    (tmp_path / "out").mkdir()
    Image.fromarray(mask).save(tmp_path / "out" / "old_mask.png")  # left by an earlier run
    assert cli.main(["label-images", str(tmp_path / "set" / "s0.png"), str(tmp_path / "m.png"),
                     str(tmp_path / "set"), "-o", str(tmp_path / "out"), "--method", "copy"]) == 0
    out = capsys.readouterr().out
    assert "label 1 not found in: s2.png" in out  # the object is absent there: copy's drift test ends it
    assert f"note: {tmp_path / 'out'} also holds 1 mask this run did not write (old_mask.png: an earlier run's?)" in out


def test_labels_csv_paths_never_begin_as_a_spreadsheet_formula(tmp_path, monkeypatch):
    """Session 31 (carried from the session-30 review): labels.csv named each image as given, so an
    image called ``=HYPERLINK(...).png`` in a shared folder gave a cell that Excel or LibreOffice
    runs as a formula when the table is opened. Such paths are written as ``./`` and the path,
    which names the same file."""
    from PAMSegmentLib.cli import main

    images, truth = moving_disc_set(4)
    folder = tmp_path / "set"
    folder.mkdir()
    names = ["=1+1.png", "-2.png", "@sum.png", "plain.png"]
    for name, im in zip(names, images):
        sitk.WriteImage(sitk.GetImageFromArray(np.clip(im, 0, 255).astype(np.uint8)), str(folder / name))
    sitk.WriteImage(sitk.GetImageFromArray(truth[3].astype(np.uint8)), str(tmp_path / "mask.png"))
    monkeypatch.chdir(folder)
    assert main(["label-images", "plain.png", str(tmp_path / "mask.png"), ".",
                 "-o", str(tmp_path / "out"), "--method", "copy", "--order", "given"]) == 0
    with open(tmp_path / "out" / "labels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == ["./-2.png", "./=1+1.png", "./@sum.png", "plain.png"]  # the folder's order
    assert [r["mask"] for r in rows] == ["./-2_mask.png", "./=1+1_mask.png", "./@sum_mask.png", "plain_mask.png"]
    assert [r["guided_by"] for r in rows] == ["./=1+1.png", "./@sum.png", "plain.png", "(drawn)"]
    for r in rows:  # the same files as before
        assert (tmp_path / "out" / r["mask"]).is_file() and (folder / r["image"]).is_file()
    cells = [cell for r in rows for cell in r.values()]
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)
