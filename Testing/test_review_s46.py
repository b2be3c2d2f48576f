"""Session 46."""

from __future__ import annotations

import numpy as np
import pytest


def _label_map(dtype=np.uint8) -> np.ndarray:
    """Three blocky labels on a zero background, 24 x 40 x 40."""
    labels = np.zeros((24, 40, 40), dtype)
    labels[3:20, 5:25, 5:25] = 3
    labels[6:18, 25:35, 10:30] = 7
    labels[10:14, 12:18, 28:36] = 1
    return labels


def _scan(dtype=np.int16, seed: int = 0) -> np.ndarray:
    """A CT-like volume: a bright block with texture and noise on a darker body."""
    rng = np.random.default_rng(seed)
    scan = rng.normal(-50, 15, (24, 40, 40))
    scan[3:20, 5:25, 5:25] += 110
    return scan.astype(dtype)


def test_flat_levels_tells_label_maps_from_scans():
    """A trial (session 45): a label map given as the image was propagated without a word.
    ``flat_levels`` gives its values for images of at most 256 whole values in flat regions, and
    None for scans, including an 8-bit one of few grey levels and a float one."""
    from PAMSegmentLib.propagate import flat_levels

    assert flat_levels(_label_map()) == (0, 1, 3, 7)
    assert flat_levels(_label_map(np.float32)) == (0.0, 1.0, 3.0, 7.0)
    assert flat_levels(_label_map(np.int32) * 100) == (0, 100, 300, 700)
    assert flat_levels(_label_map().astype(bool)) == (False, True)
    # an object outside the 16 sampled slices of a long volume is still seen (the whole image is read)
    long = np.zeros((400, 30, 30), np.uint8)
    long[101:104, 10:20, 10:20] = 1
    assert flat_levels(long) == (0, 1)
    assert flat_levels(_scan()) is None
    assert flat_levels(_scan(np.float32)) is None
    # 8 bits of 40 grey levels: few values, but noise makes neighbours differ
    eight_bit = np.clip(_scan(np.float64) / 4 + 40, 0, 255).astype(np.uint8)
    assert len(np.unique(eight_bit)) <= 256 and flat_levels(eight_bit) is None
    # whole values in flat regions but too many of them (an image of 300 plateaus), and non-whole floats
    plateaus = np.repeat(np.arange(300, dtype=np.int16), 2)[None, None, :].repeat(3, 0).repeat(4, 1)
    assert flat_levels(plateaus) is None
    assert flat_levels(_label_map(np.float32) + 0.5) is None
    assert flat_levels(np.zeros((5, 8, 8), np.uint8)) is None  # nothing but background


def test_a_label_map_given_as_the_image_is_said_in_the_notes():
    """The note names the count and the values and what to do; a scan gets no such note."""
    from PAMSegmentLib.baselines import CopyPredictor
    from PAMSegmentLib.propagate import propagate

    prompt = np.zeros((24, 40, 40), np.uint8)
    prompt[11, 5:25, 5:25] = 1
    result = propagate(_label_map(), prompt, (2.0, 1.0, 1.0), model=CopyPredictor())
    assert result.image_levels == (0, 1, 3, 7)
    kinds = dict(result.kinds_of_notes())
    assert kinds["labelmap"] == ("the image holds only 4 distinct values (0, 1, 3, 7), in flat regions: it looks like "
                                 "a label map, not a scan; PAM follows a scan's intensities and edges, so if the "
                                 "label map was given in the scan's place, run again with the scan as the image")
    scan = propagate(_scan(), prompt, (2.0, 1.0, 1.0), model=CopyPredictor())
    assert scan.image_levels is None and "labelmap" not in dict(scan.kinds_of_notes())
    many = np.arange(24 * 40 * 40).reshape(24, 40, 40) // 1600 % 12  # 12 flat levels, one a slice
    assert propagate(many, prompt, (2.0, 1.0, 1.0), model=CopyPredictor()).label_map_notes()[0].startswith(
        "the image holds only 12 distinct values (0, 1, 2, 3, 4, 5, 6, 7, ...), in flat regions")


def test_the_command_line_prints_the_label_map_note(tmp_path, run_cli):
    import SimpleITK as sitk

    for name, array in (("labels.nrrd", _label_map()), ("scan.nrrd", _scan())):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / name))
    prompt = np.zeros((24, 40, 40), np.uint8)
    prompt[11, 5:25, 5:25] = 1
    sitk.WriteImage(sitk.GetImageFromArray(prompt), str(tmp_path / "prompt.nrrd"))
    given = run_cli("propagate", tmp_path / "labels.nrrd", tmp_path / "prompt.nrrd", "-o", tmp_path / "out.nrrd",
                    "--method", "copy")
    assert given.returncode == 0, given.stderr
    assert "note: the image holds only 4 distinct values (0, 1, 3, 7), in flat regions: it looks like a label map" \
        in given.stdout + given.stderr
    scan = run_cli("propagate", tmp_path / "scan.nrrd", tmp_path / "prompt.nrrd", "-o", tmp_path / "out2.nrrd",
                   "--method", "copy")
    assert scan.returncode == 0 and "label map, not a scan" not in scan.stdout + scan.stderr


@pytest.mark.parametrize("dtype", [np.uint8, np.int16])
def test_flat_levels_reads_a_large_scan_by_its_middle_slice(monkeypatch, dtype):
    """A scan is judged on its middle slice first: np.unique never sees the whole volume."""
    from PAMSegmentLib import propagate as engine

    scan = np.random.default_rng(1).integers(0, 255 if dtype is np.uint8 else 2000, (60, 64, 64)).astype(dtype)
    if dtype is np.uint8:
        scan[30] = np.arange(64 * 64).reshape(64, 64) // 64  # 64 values on the middle slice, noise elsewhere
    sizes = []
    unique = np.unique
    monkeypatch.setattr(engine.np, "unique", lambda a, *k, **kw: sizes.append(np.size(a)) or unique(a, *k, **kw))
    assert engine.flat_levels(scan) is None
    assert max(sizes) < scan.size
