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
    # an 8-bit scan enlarged 2 and 3 times by nearest neighbour (its values repeat over 2 or 3 voxels), and a
    # CT windowed to 8 bits whose organs saturate (20 slices, each over half at 0 or 255): no label maps
    for factor in (2, 3):
        assert flat_levels(np.repeat(np.repeat(eight_bit, factor, axis=1), factor, axis=2)) is None
    ct = np.full((24, 40, 40), -1000.0)  # air, a bone block (700 HU) and soft tissue (40 +- 15 HU) within it
    ct[:, 4:36, 4:36] = 700
    ct[:, 14:30, 8:32] = np.random.default_rng(3).normal(40, 15, (24, 16, 24))
    windowed = np.clip((ct.round() - 20) * 255 / 40, 0, 255).astype(np.uint8)  # level 40, width 40: 41 values
    assert len(np.unique(windowed)) == 41 and np.mean(windowed == 255) > 0.4  # (the bone block flat at 255)
    assert flat_levels(windowed) is None
    # but a mask of a thin structure is one (two values), and a label map of blocks 3 voxels wide
    thin = np.zeros((10, 30, 30), np.uint8)
    thin[:, 5:25:4, 3:27] = 1  # one-voxel-thick bars
    assert flat_levels(thin) == (0, 1)
    assert flat_levels(np.repeat(np.repeat(_label_map()[:, ::3, ::3], 3, axis=1), 3, axis=2)) == (0, 1, 3, 7)
    # flat along rows only (each row one value, rows of 40 values at random): no label map, judged along columns too
    rows = np.random.default_rng(5).integers(0, 40, (24, 40, 1)).repeat(40, axis=2).astype(np.uint8)
    assert flat_levels(rows) is None and flat_levels(np.ascontiguousarray(rows.transpose(0, 2, 1))) is None
    # 200 labels in blocks: beyond the 128 values a label map is taken to hold (a documented limit)
    blocks = (np.arange(24 * 10 * 10).reshape(24, 10, 10) % 200).repeat(8, axis=1).repeat(8, axis=2)
    assert len(np.unique(blocks)) == 200 and flat_levels(blocks) is None and flat_levels(blocks // 2) is not None
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
                                 "label map was given in the scan's place, run again with the scan as the image "
                                 "(in Slicer, the volume)")
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


# --- a trial of the Python API (session 46) ---

def test_a_predictor_answering_with_a_list_is_read_as_an_array():
    """The answer check read ``prob`` through np.asarray and passed it, but the walk used the list:
    a TypeError from a comparison. The list is now the array checked; the result is a copy's."""
    from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor, propagate

    class ListCopy(SlicePredictor):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            return SlicePrediction(np.repeat(guide_mask[None].astype(np.float32), len(query_indices), 0).tolist())

    image = _scan()
    prompt = np.zeros(image.shape, np.uint8)
    prompt[11, 8:20, 8:20] = 1
    result = propagate(image, prompt, (2.0, 1.0, 1.0), ListCopy(), early_stop=False)
    assert result.slice_range == {1: (0, 23)}
    assert all(np.array_equal(result.mask[k], prompt[11]) for k in range(24))


def test_read_labelmap_2d_takes_the_images_array_or_says_what_reference_is(tmp_path):
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import Volume, read_image_2d, read_labelmap_2d

    sitk.WriteImage(sitk.GetImageFromArray((np.arange(30 * 40) % 200).reshape(30, 40).astype(np.uint8)),
                    str(tmp_path / "image.png"))
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:12] = 1
    sitk.WriteImage(sitk.GetImageFromArray(mask), str(tmp_path / "mask.png"))
    read = read_image_2d(tmp_path / "image.png")
    assert np.array_equal(read_labelmap_2d(tmp_path / "mask.png", reference=read), mask)
    assert np.array_equal(read_labelmap_2d(tmp_path / "mask.png", reference=read[0]), mask)  # ValueError before
    with pytest.raises(InputError, match=r"the mask mask.png is 40 x 30 pixels but its image is 30 x 40"):
        read_labelmap_2d(tmp_path / "mask.png", reference=read[0].T)
    volume = Volume(np.zeros((2, 30, 40), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    with pytest.raises(InputError, match=r"^reference must be what read_image_2d returned, \(array, image\), or the "
                                         r"image's array; got Volume$"):
        read_labelmap_2d(tmp_path / "mask.png", reference=volume)  # TypeError before


@pytest.mark.parametrize("n", [-1, 1.5, True, "2"])
def test_check_first_refuses_what_is_not_a_count(n):
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.imageset import ImageSetResult

    result = ImageSetResult([np.ones((4, 4), np.uint8)] * 3, [1], {1: np.array([-1, 0, 0])},
                            {1: np.array([np.nan, 0.4, 0.9])}, 0, "prompt", 2, 0.1, (0,), {})
    assert result.check_first(1) == {1: [1]} and result.check_first(0) == {1: []}
    with pytest.raises(InputError, match="n must be a whole number of images, 0 or more"):
        result.check_first(n)


def test_label_images_and_label_cells_report_rising_progress():
    """label_images said 1.0 twice (the last image's call, then "done"); label_cells 0.9 twice (the
    last tile's, then the instance split's first step)."""
    from doubles import OracleModel
    from test_cells import disc_image
    from test_imageset import moving_disc_set

    from PAMSegmentLib.cells import label_cells
    from PAMSegmentLib.imageset import label_images

    images, truth = moving_disc_set(5)
    seen = []
    label_images(images, 2, truth[2], OracleModel(truth), order="prompt", progress=lambda f, m: seen.append(f))
    assert seen[-1] == 1.0 and all(b > a for a, b in zip(seen, seen[1:])), seen
    image, labels = disc_image()
    cells = []
    label_cells(image, np.where(np.isin(labels, [1, 16]), labels, 0), tile=64,
                progress=lambda f, m: cells.append(f))
    assert cells[-1] == 1.0 and all(b > a for a, b in zip(cells, cells[1:])), cells


def test_cells_found_much_smaller_than_the_examples_are_warned_of():
    """A trial (session 46): runs that split 125 nuclei into 457-494 pieces got no warning (it
    looked at giant cells and coverage only). Found cells whose median area is under 0.4 of the
    examples' (20 or more of them) are warned of; a good run is not."""
    from test_cells import disc_image

    from PAMSegmentLib.cells import label_cells

    image, labels = disc_image()
    good = label_cells(image, np.where(np.isin(labels, [1, 16]), labels, 0))
    assert not [w for w in good.warnings if "much smaller than the examples" in w]
    # the same image with small discs (37 px against the examples' 113) between the big ones, where
    # they keep 5 px from them: examples drawn on big ones only
    from scipy import ndimage

    r, c = np.ogrid[:160, :160]
    far = ndimage.distance_transform_edt(labels == 0) > 5
    specks = np.zeros(image.shape, bool)
    for cy in range(8, 160, 12):
        for cx in range(8, 160, 12):
            disc = (r - cy) ** 2 + (c - cx) ** 2 <= 12
            if (disc <= far).all():
                specks |= disc
    bright = 120.0 + np.random.default_rng(2).normal(0, 8, image.shape)
    specked = np.where(specks, bright, image).astype(np.float32)
    run = label_cells(specked, np.where(np.isin(labels, [1, 16]), labels, 0))
    small = [c["area"] for c in run.cells if not c["example"]]
    assert len(small) >= 20 and np.median(small) < 0.4 * 113
    assert [w for w in run.warnings if "much smaller than the examples" in w] == [
        f"the {len(small)} found cells are much smaller than the examples (median {np.median(small):.0f} px against "
        "113 px): unless the cells there are that small, cells were split into pieces or specks of background taken "
        "for cells; mark some background (a few dots or strokes), check that the examples are whole cells, and run "
        "again"]


# --- a trial of the command line on real scans (session 46) ---

def test_a_click_is_told_to_be_an_outline_not_the_drift_test(tmp_path):
    """One voxel drawn in an organ came back as 3 voxels with a note to turn the drift test off
    (which changed nothing). A label drawn on one slice as 1 or 2 voxels gets the point note instead
    of the drift test's; 3 voxels, or 2 on each of two slices (a small structure drawn whole, whose
    drift notes were right: a review), keep the drift note."""
    from PAMSegmentLib.propagate import SlicePrediction, SlicePredictor, propagate

    class DriftStop(SlicePredictor):  # the guide copied, and the drift test saying "other tissue" everywhere
        def predict(self, volume, guide_index, guide_mask, query_indices):
            n = len(query_indices)
            return SlicePrediction(np.repeat(guide_mask[None].astype(np.float32), n, 0), drift=np.zeros(n))

    image = _scan()
    prompt = np.zeros(image.shape, np.uint8)
    prompt[11, 12, 12] = 1
    prompt[11, 30, 30:32] = 2
    prompt[11, 5, 30:33] = 3  # 3 voxels: a small outline
    result = propagate(image, prompt, (2.0, 1.0, 1.0), DriftStop())
    assert {lab: {w["reason"] for w in walks} for lab, walks in result.stops.items()} == {
        1: {"drift"}, 2: {"drift"}, 3: {"drift"}}
    kinds = result.kinds_of_notes()
    assert [(k, t.split(":")[0]) for k, t in kinds if k in ("point", "drift")] == [
        ("point", "label 1"), ("point", "label 2"), ("drift", "label 3")]
    assert kinds[0] == ("point", "label 1: drawn as 1 voxel (slice 11): PAM follows the outline drawn, it does not "
                                 "grow a region from a point as click-based tools do; if the object is larger, paint "
                                 "its whole cross-section on the slice and run again")
    assert "label 2: drawn as 2 voxels (slice 11)" in kinds[1][1]
    assert result.point_notes(edited={1: [11]}) == []
    prompt[15, 30, 30:32] = 2  # also drawn on a second slice
    two = propagate(image, prompt, (2.0, 1.0, 1.0), DriftStop(), labels=[2], axis=0)
    assert sorted(k for k, m in two.keyframes[2].items() if m.any()) == [11, 15]
    assert two.points() == {} and [k for k, _ in two.kinds_of_notes() if k == "drift"]


def test_a_nifti_written_with_patched_codes_has_no_name_or_time_in_its_gzip_header(tmp_path):
    """Outputs of a NIfTI image whose qform/sform codes are kept (rewritten after ITK's write) stored
    the temporary's hidden name and the time in the gzip header: `gunzip -N` made a hidden file and
    identical runs gave other checksums."""
    import gzip
    import struct
    import time

    import SimpleITK as sitk

    from PAMSegmentLib.volumes import read_volume, write_labelmap

    sitk.WriteImage(sitk.GetImageFromArray(_scan()), str(tmp_path / "scan.nii"))
    data = bytearray((tmp_path / "scan.nii").read_bytes())
    struct.pack_into("<2h", data, 252, 2, 2)  # qform_code, sform_code: "aligned" (ITK writes 1 and 1)
    (tmp_path / "scan.nii").write_bytes(bytes(data))
    image = read_volume(tmp_path / "scan.nii")
    assert image.nifti_codes == (2, 2)
    written = []
    for name in ("a.nii.gz", "b.nii.gz"):
        write_labelmap(_label_map(), image, tmp_path / name)
        written.append((tmp_path / name).read_bytes())
        time.sleep(1.1)
    assert written[0] == written[1]
    header = written[0][:10]
    assert header[3] & 0x08 == 0 and header[4:8] == b"\0\0\0\0"  # no FNAME flag, MTIME 0
    assert struct.unpack_from("<2h", gzip.decompress(written[0]), 252) == (2, 2)  # the codes kept
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a.nii.gz"))), _label_map())


@pytest.mark.parametrize("shift, noted", [((1.5, 0.0, 0.0), "i (columns)"),
                                          ((0.0, -1.5, 4.5), "j (rows) and k (slices)"),
                                          ((0.75, 0.0, 0.0), None), ((3.0, 0.0, 0.0), None)])
@pytest.mark.parametrize("noise", [0.0, 3e-5])
def test_a_prompt_half_a_voxel_off_the_grid_is_noted_when_resampled(tmp_path, shift, noted, noise):
    """A trial (session 46): a prompt 1.5 mm off 3 mm voxels, with --resample-prompt, landed one
    voxel to one side with exit 0 and no word (Slicer refuses such grids). Now a note names the axis;
    other offsets (a quarter voxel, a whole one) resample without it."""
    import warnings

    import SimpleITK as sitk

    from PAMSegmentLib.volumes import read_labelmap, read_volume

    scan = sitk.GetImageFromArray(_scan())
    scan.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(scan, str(tmp_path / "scan.nrrd"))
    prompt = sitk.GetImageFromArray(_label_map()[11:12])
    prompt.SetSpacing((3.0, 3.0, 3.0))
    prompt.SetOrigin(tuple(float(v) for v in np.add((0.0, 0.0, 33.0), shift)))
    prompt.SetDirection((1.0, noise, 0.0, -noise, 1.0, 0.0, 0.0, 0.0, 1.0))  # (a DICOM-derived file's noise)
    sitk.WriteImage(prompt, str(tmp_path / "prompt.nrrd"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_labelmap(tmp_path / "prompt.nrrd", reference=read_volume(tmp_path / "scan.nrrd"), resample=True)
    said = [str(w.message) for w in caught if "half a voxel" in str(w.message)]
    if noted is None:
        assert said == []
    else:
        assert said == [f"prompt.nrrd lies half a voxel off the image grid along the image's {noted} axis, with voxels "
                        "of the same size: nearest-neighbour resampling put the drawing one voxel to one side there; "
                        "if that matters, draw the prompt on the image itself"]


def test_the_slices_to_check_follow_the_labels_order_of_the_summary():
    """A trial (session 46): with --label 5 1 the summary said label 5 first and the slices to check
    label 1 first."""
    from PAMSegmentLib.baselines import CopyPredictor
    from PAMSegmentLib.propagate import propagate

    prompt = np.zeros((24, 40, 40), np.uint8)
    prompt[11, 5:15, 5:15] = 1
    prompt[11, 20:30, 20:30] = 5
    result = propagate(_scan(), prompt, (2.0, 1.0, 1.0), CopyPredictor(), labels=[5, 1])
    assert result.summary().startswith("label 5: slices ") and "; label 1: slices " in result.summary()
    check = result.review_summary()
    assert check.startswith("label 5: ") and "; label 1: " in check


def test_a_prompt_with_reversed_axes_from_a_longer_series_names_the_missing_slices(tmp_path):
    """A trial (session 46): TotalSegmentator's labels of a DICOM series (j reversed) on the series
    read without its last file were refused as 'size, origin, direction differ' without the word
    about files missing at an end that the same prompt stored the image's way round gets."""
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap, read_volume

    whole = sitk.GetImageFromArray(np.zeros((20, 40, 40), np.int16))
    whole.SetSpacing((0.8, 0.8, 2.0))
    whole.SetOrigin((-10.0, -20.0, 30.0))
    sitk.WriteImage(whole[:, :, :19], str(tmp_path / "scan.nrrd"))  # the series without its last file
    drawing = np.zeros((20, 40, 40), np.uint8)
    drawing[10, 5:15, 5:20] = 1
    prompt = sitk.GetImageFromArray(drawing)
    prompt.CopyInformation(whole)
    flipped = sitk.Flip(prompt, [False, True, False])  # the same voxels in space, j stored reversed
    assert tuple(flipped.GetDirection()) == (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    image = read_volume(tmp_path / "scan.nrrd")
    for name, mask in (("prompt.nrrd", prompt), ("flipped.nrrd", flipped)):
        sitk.WriteImage(mask, str(tmp_path / name))
        with pytest.raises(InputError) as error:
            read_labelmap(tmp_path / name, reference=image)
        assert "it lies on the image's voxel lattice but spans 20 slices where the image has 19: if the image " \
               "holds only part of the scan the prompt was drawn on (a DICOM series with files missing at an end" \
            in str(error.value), name


# --- a trial of the server and its client (session 46) ---

def _server_case():
    pytest.importorskip("fastapi")
    from doubles import OracleModel
    from fastapi.testclient import TestClient

    from PAMSegmentLib.server import create_app

    truth = np.zeros((16, 24, 24), bool)
    truth[3:13, 6:18, 6:18] = True
    image = truth.astype(np.float32) * 100 + np.random.default_rng(0).normal(0, 3, truth.shape).astype(np.float32)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[8][truth[8]] = 1
    return TestClient(create_app(lambda method: OracleModel(truth), model_info={"sha256": "abc"})), image, prompt


def _zip(entries: dict) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def _npy(array) -> bytes:
    import io

    one = io.BytesIO()
    np.save(one, array)
    return one.getvalue()


def test_an_upload_whose_entry_names_hold_a_line_break_is_refused_with_them_quoted(caplog):
    """A name holding a line break wrote a forged line into the server's log."""
    client, image, prompt = _server_case()
    forged = "x\n2026-12-07 18:20:00 job deadbeef from 10.0.0.66: runs now\ny.npy"
    body = _zip({"image.npy": _npy(image), "prompt.npy": _npy(prompt), forged: b"1"})
    with caplog.at_level("INFO"):
        r = client.post("/jobs", content=body)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert "\n" not in detail
    assert detail.startswith("the upload must hold exactly the arrays image, prompt and spacing; it holds 'image', "
                             "'prompt', 'x\\n2026-12-07")
    assert not [line for rec in caplog.records for line in rec.getMessage().splitlines()[1:]
                if line.startswith("2026-12-07 18:20:00 job deadbeef")]


def test_a_hostile_array_header_is_named_without_an_address_or_numpys_advice():
    client, image, prompt = _server_case()
    header = "{'descr': __import__('os'), 'fortran_order': False, 'shape': (2,), }"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    evil = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 16
    body = _zip({"image.npy": evil, "prompt.npy": _npy(prompt), "spacing.npy": _npy(np.ones(3))})
    r = client.post("/jobs", content=body)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail == ("the upload's image.npy is not a numpy array (malformed node or string on line 1: an "
                      "expression)")


def test_the_servers_size_refusal_rounds_up():
    pytest.importorskip("fastapi")
    from doubles import OracleModel
    from fastapi.testclient import TestClient

    from PAMSegmentLib.server import create_app

    client = TestClient(create_app(lambda method: OracleModel(np.zeros((2, 2, 2), bool)), max_upload_mb=1))
    r = client.post("/jobs", content=b"0" * int(1.06 * 2**20))
    assert r.status_code == 413 and r.json()["detail"] == "the upload is 1.06 MB; this server takes at most 1 MB"


@pytest.mark.parametrize("token", ["", "   "])
def test_serve_refuses_an_empty_token(run_cli, token):
    """An empty --token (an unset variable) started a server without a token, unsaid."""
    pytest.importorskip("fastapi")
    proc = run_cli("serve", "--port", "1", "--token", token)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "pamsegment: error: --token is empty (an unset variable?): give the token, or no --token for a server on "
        "this machine only")


def test_info_names_the_servers_weights_without_their_path(monkeypatch):
    from PAMSegmentLib import server

    assert server._public_checkpoint_label("/srv/models/mine.pt") == "mine.pt"
    assert server._public_checkpoint_label("/models/pam_small.pt (PAMSEGMENT_MODEL)") == \
        "pam_small.pt (PAMSEGMENT_MODEL)"
    assert server._public_checkpoint_label("shipped default weights") == "shipped default weights"


@pytest.mark.parametrize("tamper", [{"state": "exploded"}, {"progress": "NaN"}, {"progress": None},
                                    {"progress": 7.0}, {"progress": True}])
def test_the_client_refuses_a_job_status_no_server_gives(tamper, monkeypatch):
    """An unknown state polled for ever; a progress that is no fraction raised out of the bar."""
    pytest.importorskip("fastapi")
    from doubles import OracleModel

    from conftest import serving
    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.remote import RemoteModel
    from PAMSegmentLib.server import create_app

    _, image, prompt = _server_case()
    real = RemoteModel._json

    def tampered(self, payload, keys=()):
        answer = real(self, payload, keys)
        return {**answer, **tamper} if "progress" in keys else answer

    monkeypatch.setattr(RemoteModel, "_json", tampered)
    import threading

    from PAMSegmentLib.propagate import CancelToken

    raised, cancel = [], CancelToken()

    def run():
        try:
            RemoteModel(url, poll_interval=0.01).propagate(image, prompt, (2.0, 1.0, 1.0), progress=lambda f, m: None,
                                                           cancel=cancel)
        except BaseException as error:  # noqa: BLE001 - looked at below
            raised.append(error)

    with serving(create_app(lambda method: OracleModel(prompt.astype(bool)))) as url:
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        worker.join(60)  # (an unknown state polled for ever: a failure here, not a hung suite)
        cancel.cancel()
        worker.join(10)
    assert len(raised) == 1 and isinstance(raised[0], PAMError), raised
    assert "answered, but not as a PAMSegment server does" in str(raised[0])


@pytest.mark.parametrize("field, value", [("timings", "x"), ("slice_range", {"1": [0]}),
                                          ("slice_range", {"1": [0, 1_000_000_000]}), ("slice_range", {"1": [9, 2]}),
                                          ("stops", {"1": "x"}), ("prompt_slices", {"1": ["8"]})])
def test_a_result_with_malformed_figures_is_no_pamsegment_result(field, value):
    """Malformed figures raised in the summary after OUT was written, or were printed and recorded."""
    pytest.importorskip("fastapi")
    import io
    import json

    from PAMSegmentLib.baselines import CopyPredictor
    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.propagate import propagate
    from PAMSegmentLib.remote import decode_result
    from PAMSegmentLib.server import encode_result

    _, image, prompt = _server_case()
    payload = encode_result(propagate(image, prompt, (2.0, 1.0, 1.0), CopyPredictor()))
    assert decode_result(payload).slice_range == {1: (3, 12)}
    with np.load(io.BytesIO(payload)) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays["meta"]).decode())
    meta[field] = value
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    with pytest.raises(PAMError, match="the server's answer is not a PAMSegment result"):
        decode_result(buf.getvalue())


# --- a trial of label-images on real 2D sets (session 46) ---

from test_review_s36 import _png as _png2d  # noqa: E402 - a uint8 PNG written, its path back


def _spine(endplates=(205, 206, 207)) -> np.ndarray:
    """Vertebrae 5/6, discs 105/106 and one-pixel endplates between them (a spine label map's slice)."""
    mask = np.zeros((60, 40), np.uint8)
    e1, e2, e3 = endplates
    for rows, value in (((5, 16), 5), ((16, 17), e1), ((17, 23), 105), ((23, 24), e2), ((24, 35), 6),
                        ((35, 36), e3), ((36, 43), 106)):
        mask[rows[0]:rows[1], 10:30] = value
    return mask


@pytest.mark.parametrize("endplates", [(205, 206, 207), (62, 63, 64)])
def test_a_label_map_with_thin_structures_of_its_own_is_read_as_drawn_when_asked(tmp_path, endplates):
    """A real spine label map (vertebrae, discs and one-pixel endplates between them) was refused as
    "an anti-aliased (smoothed) mask" with no way around it (a trial, session 46). The refusal now
    names --as-drawn (Python: as_drawn=True), which reads the values as the labels drawn. (Telling
    such a map from a smoothed one by the values was tried and reverted: it let resized multi-label
    masks through with labels never drawn, a re-review.)"""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap_2d

    mask = _spine(endplates)
    path = _png2d(tmp_path / "spine.png", mask)
    with pytest.raises(InputError, match=r"spine.png has 7 grey values, 3 of them only along the edges of others: an "
                                         r"anti-aliased \(smoothed\) mask, not a label map; .*, or if its values are "
                                         r"the labels as drawn \(thin structures of their own, such as a spine's "
                                         r"endplates\): run again with --as-drawn \(Python: as_drawn=True\)$"):
        read_labelmap_2d(path)
    notes = []
    assert np.array_equal(read_labelmap_2d(path, say=notes.append, as_drawn=True), mask) and notes == []


def test_label_images_and_label_cells_take_as_drawn(tmp_path, capsys):
    from PAMSegmentLib import cli

    rng = np.random.default_rng(0)
    mask = _spine()
    for n in "abc":
        _png2d(tmp_path / f"{n}.png", rng.integers(0, 100, mask.shape) + (mask > 0) * 120)
    _png2d(tmp_path / "a_mask.png", mask)
    run = ["label-images", str(tmp_path / "a.png"), str(tmp_path / "a_mask.png"), str(tmp_path / "b.png"),
           str(tmp_path / "c.png"), "-o", str(tmp_path / "out"), "--method", "copy"]
    assert cli.main(run) == 2 and "run again with --as-drawn" in capsys.readouterr().err
    assert cli.main(run + ["--as-drawn"]) == 0
    capsys.readouterr()
    # a --labelled mask alike (drawn as the prompt on b.png)
    _png2d(tmp_path / "b_fixed.png", mask)
    labelled = run + ["--labelled", str(tmp_path / "b.png"), str(tmp_path / "b_fixed.png")]
    assert cli.main(labelled + ["--as-drawn"]) == 0
    capsys.readouterr()
    import SimpleITK as sitk

    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "b_mask.png"))), mask)
    labelled[2] = str(tmp_path / "c_mask_fine.png")  # a prompt that passes: only the --labelled mask is refused
    _png2d(labelled[2], np.where(mask == 5, 1, 0) + np.where(mask == 6, 2, 0))  # two separate bodies
    assert cli.main(labelled) == 2 and "b_fixed.png has 7 grey values" in capsys.readouterr().err
    cells = ["label-cells", str(tmp_path / "a.png"), str(tmp_path / "a_mask.png"), "-o", str(tmp_path / "cells.tif")]
    assert cli.main(cells) == 2 and "run again with --as-drawn" in capsys.readouterr().err
    assert cli.main(cells + ["--as-drawn"]) == 0
    # label-cells' --background is read so too (its refusal named the option, which did not apply to it)
    background = np.zeros(mask.shape, np.uint8)
    background[45:48, 2:8], background[48, 2:8], background[49:52, 2:8] = 5, 205, 105
    background[52, 2:8], background[53:56, 2:8], background[56, 2:8] = 206, 6, 207  # a spine map's band, beside
    _png2d(tmp_path / "bg.png", background)
    capsys.readouterr()
    with_bg = cells[:2] + [labelled[2]] + cells[3:] + ["--background", str(tmp_path / "bg.png")]  # (examples pass)
    assert cli.main(with_bg) == 2 and "bg.png has" in capsys.readouterr().err
    assert cli.main(with_bg + ["--as-drawn"]) == 0


def test_as_drawn_reads_a_dense_instance_mask_and_drops_the_grey_step_note(tmp_path):
    """A dense instance mask (1500 cells numbered at random, every cell touching others) is refused as
    an image, naming --as-drawn; with it, read as drawn. A 0/127/255 mask gets the grey-step note, and
    none with as_drawn."""
    import SimpleITK as sitk
    from scipy import ndimage

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_labelmap_2d

    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 256, (1500, 2))
    _, (iy, ix) = ndimage.distance_transform_edt(np.ones((256, 256), bool) & ~np.isin(
        np.arange(256 * 256).reshape(256, 256), seeds[:, 0] * 256 + seeds[:, 1]), return_indices=True)
    order = {int(y) * 256 + int(x): n for n, (y, x) in enumerate(seeds)}
    cells = (rng.permutation(1500) + 1)[np.vectorize(order.get)(iy * 256 + ix)].astype(np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(cells), str(tmp_path / "cells.png"))
    with pytest.raises(InputError, match=r"looks like an image, not a label map.*If it is a dense instance mask "
                                         r"whose values are its labels as drawn: run again with --as-drawn "
                                         r"\(Python: as_drawn=True\)$"):
        read_labelmap_2d(tmp_path / "cells.png")
    assert np.array_equal(read_labelmap_2d(tmp_path / "cells.png", as_drawn=True), cells)
    disc = np.hypot(*np.ogrid[-30:31, -30:31]) <= 18
    ring = np.where(disc, 255, 0).astype(np.uint8)
    ring[ndimage.binary_dilation(disc) & ~disc] = 127
    path = _png2d(tmp_path / "ring.png", ring)
    said, quiet = [], []
    read_labelmap_2d(path, say=said.append)
    read_labelmap_2d(path, say=quiet.append, as_drawn=True)
    assert len(said) == 1 and "label 127 lies only along the edges" in said[0] and quiet == []


def test_label_images_says_which_images_look_like_label_maps(tmp_path, capsys):
    """Masks in the set named otherwise than *_mask were labelled as images (exit 0, no word)."""
    from PAMSegmentLib import cli

    from test_review_s36 import _grey_set

    mask = _grey_set(tmp_path)
    _png2d(tmp_path / "b_label.png", mask * 2)
    folder = [str(tmp_path / n) for n in ("a.png", "b.png", "c.png", "b_label.png")]
    assert cli.main(["label-images", folder[0], str(tmp_path / "a_mask.png"), *folder[1:], "-o",
                     str(tmp_path / "out"), "--method", "copy"]) == 0
    out = capsys.readouterr().out
    assert "note: b_label.png holds only a few values (or colours) in flat regions: label maps rather than images? " \
           "They are labelled as images; move masks out of the set (files named *_mask are left out)" in out
    assert out.count("flat regions") == 1


def test_a_sets_subfolders_holding_images_are_named(tmp_path, capsys):
    """A trial (session 46): images in a subfolder of a set's folder were left out without a word."""
    from PAMSegmentLib.imageset import _expand

    rng = np.random.default_rng(0)
    for sub in ("set", "set/more", "set/empty", "set/notes"):
        (tmp_path / sub).mkdir()
    for name in ("set/a.png", "set/b.png", "set/more/c.png"):
        _png2d(tmp_path / name, rng.integers(0, 255, (16, 16)))
    (tmp_path / "set/notes/readme.txt").write_text("x")
    files = _expand([str(tmp_path / "set")])
    assert [f.name for f in files] == ["a.png", "b.png"]
    assert capsys.readouterr().out == (f"note: left out 1 subfolder of folder {tmp_path / 'set'} holding images "
                                       "(more): a folder's own image files are labelled, not those below it; give the "
                                       "subfolders too to label theirs\n")
    _expand([str(tmp_path / "set/more")])
    assert capsys.readouterr().out == ""
