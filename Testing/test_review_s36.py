"""Session 36: carried findings of session 35's trials, and this session's trials."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk


def _png(path, array) -> str:
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, np.uint8)), str(path))
    return str(path)


@pytest.fixture
def image_set(tmp_path):
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 48), np.uint8)
    mask[14:30, 16:34] = 1
    files = {n: _png(tmp_path / f"{n}.png", rng.integers(0, 255, (48, 48)) // 2 + 100 * mask) for n in "abce"}
    for n in "ae":
        files[f"{n}_mask"] = _png(tmp_path / f"{n}_mask.png", mask)
    return files


@pytest.mark.parametrize("labelled", [True, False])
def test_an_image_and_its_mask_given_as_images_to_label_are_refused(tmp_path, image_set, labelled, capsys):
    """Session 35's trial: two pairs given to one --labelled (`--labelled a a_mask e e_mask b b_mask c`)
    made the second pair the prompt and labelled b_mask.png as an image, exit 0."""
    from PAMSegmentLib import cli

    f = image_set
    front = ["--labelled", f["b"], f["b"].replace("b.png", "b_mask.png")] if labelled else []
    if labelled:
        _png(tmp_path / "b_mask.png", np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(f["a_mask"]))))
    out = tmp_path / "out"
    code = cli.main(["label-images", *front, f["e"], f["e_mask"], f["a"], f["a_mask"], f["c"], "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "a_mask.png looks like the mask of a.png (2 values)" in err
    assert ("one --labelled takes one pair: repeat it for each" in err) == labelled
    assert (f"give it as --labelled {f['a']} {f['a_mask']}" in err) == (not labelled)


def test_a_grey_image_named_like_a_mask_is_still_labelled(tmp_path, image_set):
    """The refusal needs a few label values: a real image named x_mask beside x is labelled as asked."""
    from PAMSegmentLib import cli

    f = image_set
    grey = _png(tmp_path / "c_mask.png", np.random.default_rng(1).integers(0, 255, (48, 48)))
    out = tmp_path / "out"
    assert cli.main(["label-images", f["e"], f["e_mask"], f["c"], grey, "-o", str(out), "--method", "copy"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["c_mask.png", "c_mask_mask.png", "e_mask.png", "labels.csv"]
