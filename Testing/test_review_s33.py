"""Findings of session 33, each reproduced here on the code before its fix."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene) for the Slicer test below

tifffile = pytest.importorskip("tifffile")


def _stack(path, planes, subfile_types=None, **kwargs):
    """A TIFF of ``planes``, page k with NewSubfileType ``subfile_types[k]`` (None: no such tag)."""
    with tifffile.TiffWriter(path, **kwargs) as tif:
        for k, plane in enumerate(planes):
            kind = None if subfile_types is None else subfile_types[k]
            tif.write(plane, metadata=None, photometric="minisblack",
                      extratags=[] if kind is None else [(254, "I", 1, kind, True)])


def test_a_stack_whose_pages_are_marked_inconsistently_is_refused_not_a_crash(tmp_path):
    """A review (session 33): ITK reads as slices the pages whose NewSubfileType is 0 when any page
    says so, but writes every page into the volume: a stack with the tag on some pages only (pages
    added by another program) crashed the process (free(): invalid next size; `propagate` first
    said "has a single slice"). Tagged on every page or on none reads as before."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d, read_volume

    planes = np.arange(5 * 12 * 16, dtype=np.uint8).reshape(5, 12, 16)
    _stack(tmp_path / "mixed.tif", planes, [0, None, None, None, None])
    _stack(tmp_path / "mixed2.tif", planes, [0, 2, 2, 2, 2])
    for name in ("mixed.tif", "mixed2.tif"):
        with pytest.raises(InputError, match=rf"^{name}: its pages are marked inconsistently \(1 of 5 carry "
                                             r"NewSubfileType 0, the others not\), which crashes the TIFF reader"):
            read_volume(tmp_path / name)
        with pytest.raises(InputError, match="marked inconsistently"):
            read_image_2d(tmp_path / name)
    for kinds in ([0] * 5, [None] * 5, [2] * 5, [2, None, 2, None, 2]):
        _stack(tmp_path / "fine.tif", planes, kinds)
        np.testing.assert_array_equal(read_volume(tmp_path / "fine.tif").array, planes)


def test_pages_storing_pixels_differently_are_refused_not_read_wrong(tmp_path):
    """A review (session 33): ITK reads every page as the first one is stored, so a 16-bit stack
    with one 8-bit page gave that slice values up to 65 535 off without a word (also grey with a
    colour page, integers with a float page)."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    planes = [np.full((8, 8), 1000 * (k + 1), np.uint16) for k in range(3)]
    planes[1] = np.full((8, 8), 7, np.uint8)
    _stack(tmp_path / "bits.tif", planes)
    with pytest.raises(InputError, match=r"^bits.tif: its pages store their pixels differently \(1 sample of 8-bit "
                                         r"unsigned integers; 1 sample of 16-bit unsigned integers\), and the TIFF "
                                         r"reader reads every page as the first one is stored"):
        read_volume(tmp_path / "bits.tif")
    _stack(tmp_path / "floats.tif", [np.zeros((8, 8), np.float32), np.zeros((8, 8), np.int16)])
    with pytest.raises(InputError, match=r"\(1 sample of 16-bit signed integers; 1 sample of 32-bit floats\)"):
        read_volume(tmp_path / "floats.tif")
    # a stack of one layout (whatever the compression of each page) reads as before
    with tifffile.TiffWriter(tmp_path / "same.tif") as tif:
        for k, plane in enumerate(np.arange(3 * 64, dtype=np.uint16).reshape(3, 8, 8)):
            tif.write(plane, metadata=None, compression="zlib" if k == 1 else None)
    np.testing.assert_array_equal(read_volume(tmp_path / "same.tif").array,
                                  np.arange(3 * 64, dtype=np.uint16).reshape(3, 8, 8))


def test_a_tiled_stack_given_as_a_volume_is_named_so(tmp_path):
    """ITK reads a tiled TIFF through its RGBA reader: a tiled grey stack was refused as a colour
    volume of 4 components, which it is not."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    with tifffile.TiffWriter(tmp_path / "tiled.tif") as tif:
        for plane in np.zeros((3, 32, 32), np.uint8):
            tif.write(plane, tile=(16, 16), metadata=None)
    with pytest.raises(InputError, match=r"^tiled.tif is a tiled TIFF of 3 pages, which the TIFF reader reads as "
                                         r"colour \(red, green, blue, alpha\), not as the values stored"):
        read_volume(tmp_path / "tiled.tif")


def test_every_page_is_looked_at_not_only_the_first_2000(tmp_path):
    """A review (session 33): only the tags of the first 2000 pages were read, so a preview page or a
    larger page after that crashed ITK or was cropped to the first page's size."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume

    planes = np.zeros((2100, 4, 4), np.uint8)
    kinds = [None] * 2100
    kinds[2050] = 1  # a reduced-resolution page between slices
    _stack(tmp_path / "late_preview.tif", planes, kinds)
    with pytest.raises(InputError, match="late_preview.tif: a page between its images is a reduced-resolution"):
        read_volume(tmp_path / "late_preview.tif")
    with tifffile.TiffWriter(tmp_path / "late_large.tif") as tif:
        for k in range(2100):
            tif.write(np.zeros((8, 8) if k == 2050 else (4, 4), np.uint8), metadata=None)
    with pytest.raises(InputError, match=r"late_large.tif is no volume: its pages are images of different sizes "
                                         r"\(4 x 4, 8 x 8 px\)"):
        read_volume(tmp_path / "late_large.tif")


def test_a_tiff_of_more_pages_than_itk_can_count_is_refused(tmp_path):
    """ITK counts a TIFF's pages in 16 bits: 65 537 pages read as a 2D image of the first page and
    100 000 as 34 464 slices, without a word. 65 535 is the most it reads."""
    import SimpleITK as sitk

    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_image_2d, read_volume

    tifffile.imwrite(tmp_path / "many.tif", np.zeros((65537, 1, 1), np.uint8), metadata=None,
                     photometric="minisblack")
    assert sitk.ReadImage(str(tmp_path / "many.tif")).GetDimension() == 2  # what ITK makes of it
    for read in (read_volume, read_image_2d):
        with pytest.raises(InputError, match="^many.tif has more than 65,535 pages, more than the TIFF reader can "
                                             "count"):
            read(tmp_path / "many.tif")


@pytest.mark.parametrize("byteorder", ["<", ">"])
@pytest.mark.parametrize("bigtiff", [False, True])
def test_the_page_tags_are_read_from_classic_and_big_tiffs_of_either_byte_order(tmp_path, byteorder, bigtiff):
    """The pages' tags are read here (every page, a few bytes each) rather than by tifffile or Pillow:
    they must be what tifffile reads, in every TIFF variant, whatever the tags' value types."""
    from PAMSegmentLib.volumes import tiff_pages

    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder=byteorder) as tif:
        tif.write(np.zeros((70000, 3), np.uint16), metadata=None)  # a width over 65 535: a LONG value
        tif.write(np.zeros((20, 30, 3), np.uint8), photometric="rgb", metadata=None)  # 3 bits values: elsewhere
        tif.write(np.zeros((16, 32), np.float32), tile=(16, 16), subfiletype=1, metadata=None)
        tif.write(np.zeros((3, 8, 8), np.int16), photometric="rgb", planarconfig="separate", metadata=None)
    pages = tiff_pages(path)
    assert [(p.columns, p.rows, p.samples, p.bits, p.sample_format, p.planar, p.tiled, p.flagged) for p in pages] == [
        (3, 70000, 1, 16, 1, 1, False, False), (30, 20, 3, 8, 1, 1, False, False),
        (32, 16, 1, 32, 3, 1, True, True), (8, 8, 3, 16, 2, 2, False, False)]
    with tifffile.TiffFile(path) as tif:
        assert [(p.imagewidth, p.imagelength, p.samplesperpixel, p.bitspersample) for p in tif.pages] == [
            (p.columns, p.rows, p.samples, p.bits) for p in pages]


def test_a_damaged_page_chain_ends_the_list_and_is_left_to_the_reader(tmp_path):
    """Untrusted files: a chain of pages that loops back on itself ends (it does not run forever),
    one pointing past the file's end ends there, and a file that is no TIFF gives None."""
    from PAMSegmentLib.volumes import tiff_pages

    path = tmp_path / "loop.tif"
    tifffile.imwrite(path, np.zeros((2, 4, 4), np.uint8), metadata=None, photometric="minisblack")
    data = bytearray(path.read_bytes())
    first = struct.unpack_from("<I", data, 4)[0]
    count = struct.unpack_from("<H", data, first)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * count)[0]
    count2 = struct.unpack_from("<H", data, second)[0]
    struct.pack_into("<I", data, second + 2 + 12 * count2, first)  # the second page's next is the first again
    path.write_bytes(bytes(data))
    assert len(tiff_pages(path)) == 2
    struct.pack_into("<I", data, second + 2 + 12 * count2, len(data) + 1000)  # next: past the end
    path.write_bytes(bytes(data))
    assert len(tiff_pages(path)) == 2
    struct.pack_into("<I", data, 4, len(data) + 1000)  # the first page past the end
    path.write_bytes(bytes(data))
    assert tiff_pages(path) is None
    (tmp_path / "no.tif").write_bytes(b"P5 4 4 255\n" + bytes(16))
    assert tiff_pages(tmp_path / "no.tif") is None


def test_a_2d_tiff_with_a_mask_page_reads_without_tifffile(tmp_path, monkeypatch):
    """A review (session 33): without tifffile (no dependency of the package) the page count came
    from Pillow, which raised a raw SyntaxError ("unknown pixel mode") on the mask page."""
    from PAMSegmentLib.volumes import read_image_2d

    image = np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) % 251
    with tifffile.TiffWriter(tmp_path / "masked.tif") as tif:
        tif.write(image.astype(np.uint8), metadata=None)
        tif.write(np.zeros((64, 80), bool), photometric=4, subfiletype=4, metadata=None)
    monkeypatch.setitem(sys.modules, "tifffile", None)
    np.testing.assert_array_equal(read_image_2d(tmp_path / "masked.tif")[0], image.astype(np.float32))


@pytest.mark.parametrize("order", [["5", "1"], ["1", "5"]])
def test_an_update_propagates_the_labels_of_the_run_it_corrects_not_every_label_of_the_prompt(ct_case, capsys,
                                                                                                order):
    """A review (session 33) of README's "a --label order of the run being corrected carries over":
    after `--label 5 1` (or 1 5) of a prompt with labels 1, 2, 3 and 5, an update without --label
    was refused ("the earlier result holds no label 2 of the prompt"): every label of the prompt was
    added to the record's, or taken in ascending order. The record's labels carry over, those
    left out are said."""
    from conftest import write_image
    from test_edits import _update

    from PAMSegmentLib import cli
    from PAMSegmentLib.volumes import read_volume

    d = ct_case.directory
    prompt = ct_case.prompt.copy()
    drawn = np.flatnonzero(prompt.reshape(prompt.shape[0], -1).any(axis=1))[0]
    for lab, shift in ((2, 6), (3, -6), (5, 12)):
        prompt[drawn][np.roll(ct_case.truth[drawn], shift, axis=1) & (prompt[drawn] == 0)] = lab
    write_image(prompt, ct_case.prompt_path, ct_case.spacing)
    first = d / "first.nii.gz"
    assert cli.main(["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(first),
                     "--method", "copy", "--label", *order]) == 0
    previous = read_volume(first).array
    assert sorted(np.unique(previous)) == [0, 1, 5]
    edited = previous.copy()
    erase = drawn + 3
    edited[erase][edited[erase] == 1] = 0  # label 1 erased on a slice
    write_image(edited.astype(np.uint8), d / "edited.nii.gz", ct_case.spacing)
    capsys.readouterr()
    assert _update(ct_case, first, d / "edited.nii.gz", d / "second.nii.gz") == 0
    said = capsys.readouterr().out
    # an order is said as one only when it is one (ascending, it may be a run without --label whose
    # prompt got a label since: a re-review)
    assert ("update: labels in the order 5, 1, as the run that made first.nii.gz (--label 5 1, from its record"
            in said) == (order == ["5", "1"])
    assert "update: labels in the order 1, 5" not in said
    assert (f"note: the prompt's labels 2, 3 are not among the labels of the run that made first.nii.gz "
            f"({', '.join(order)}, its record says: chosen with --label, or drawn since): left out; propagate them in "
            "a run of their own, or give --label to choose the labels") in said
    assert _update(ct_case, first, d / "edited.nii.gz", d / "explicit.nii.gz", "--label", *order) == 0
    second = read_volume(d / "second.nii.gz").array
    np.testing.assert_array_equal(second, read_volume(d / "explicit.nii.gz").array)
    assert sorted(np.unique(second)) == [0, 1, 5] and not (second[erase] == 1).any()


def test_a_full_disk_while_writing_nrrd_is_said_as_for_every_format(tmp_path, monkeypatch):
    """A review (session 33) on a full 64 KB file system: NRRD said its writer's own words
    ("[nrrd] _nrrdGzClose: failed to flush pending data"), every other format "no space left on
    the disk". A failure with space left keeps the writer's words."""
    import os

    from PAMSegmentLib import volumes
    from PAMSegmentLib.errors import InputError

    def nrrd_full(*args, **kwargs):
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: NrrdImageIO.cxx:1:\nITK ERROR: "
                           "NrrdImageIO(0x1): Write: Error writing o.nrrd:\n[nrrd] _nrrdGzClose: failed to flush "
                           "pending data")

    class Statvfs:
        def __init__(self, free):
            self.f_bavail, self.f_frsize = free // 4096, 4096

    monkeypatch.setattr(volumes.sitk, "WriteImage", nrrd_full)
    vol = volumes.Volume(np.zeros((3, 4, 5), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    (tmp_path / "o.nrrd").write_bytes(b"earlier result")
    monkeypatch.setattr(os, "statvfs", lambda folder: Statvfs(8192))
    with pytest.raises(InputError, match=r"^cannot write .*o.nrrd \(no space left on the disk\); nothing was "
                                         r"replaced$"):
        volumes.write_volume(vol, tmp_path / "o.nrrd")
    monkeypatch.setattr(os, "statvfs", lambda folder: Statvfs(10 * 2**30))
    with pytest.raises(InputError, match=r"_nrrdGzClose: failed to flush pending data\); nothing was replaced$"):
        volumes.write_volume(vol, tmp_path / "o.nrrd")
    assert (tmp_path / "o.nrrd").read_bytes() == b"earlier result"


def test_old_style_subfile_type_pages_and_damaged_tag_tables(tmp_path):
    """A re-review (session 33) of the page walk: the old SubfileType tag (255; 2 a reduced image, as
    libtiff and tifffile read it) was not read, so such a preview between slices reached ITK
    (a crash) and such a smaller last page was refused as a whole-slide image (ITK skips it); a
    page declaring 65 535 tags (overlapping tables of a 0.9 MB file) took 81 s to walk; a value
    stored past the file's end made the whole check give up (a pyramid read cropped)."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.volumes import read_volume, tiff_pages

    planes = np.arange(4 * 48 * 40, dtype=np.uint16).reshape(4, 48, 40)

    def old_style(path, kinds, last=None):
        with tifffile.TiffWriter(path) as tif:
            for plane, kind in zip(planes, kinds):
                tif.write(plane, metadata=None, extratags=[] if kind is None else [(255, "H", 1, kind, True)])
            if last is not None:
                tif.write(last, metadata=None, extratags=[(255, "H", 1, 2, True)])

    old_style(tmp_path / "small_last.tif", [1, 1, 1, 1], last=planes[0, ::4, ::4].copy())
    np.testing.assert_array_equal(read_volume(tmp_path / "small_last.tif").array, planes)
    old_style(tmp_path / "between.tif", [1, 2, 1, 1])
    assert [page.flagged for page in tiff_pages(tmp_path / "between.tif")] == [False, True, False, False]
    with pytest.raises(InputError, match="between.tif: a page between its images is a reduced-resolution preview"):
        read_volume(tmp_path / "between.tif")

    # a table of more tags than libtiff reads (4096) ends the walk there: the first page is unreadable
    path = tmp_path / "huge_table.tif"
    tifffile.imwrite(path, planes[0], metadata=None)
    data = bytearray(path.read_bytes())
    first = struct.unpack_from("<I", data, 4)[0]
    struct.pack_into("<H", data, first, 65535)
    path.write_bytes(bytes(data) + bytes(12 * 65535 + 4))
    assert tiff_pages(path) is None

    # a value stored past the file's end is taken as absent, not the end of the check
    path = tmp_path / "far_value.tif"
    with tifffile.TiffWriter(path) as tif:
        tif.write(np.zeros((20, 30, 3), np.uint8), photometric="rgb", metadata=None)  # bits: 3 values elsewhere
        tif.write(np.zeros((40, 60, 3), np.uint8), photometric="rgb", metadata=None)
    data = bytearray(path.read_bytes())
    count = struct.unpack_from("<H", data, first := struct.unpack_from("<I", data, 4)[0])[0]
    for k in range(count):
        at = first + 2 + 12 * k
        if struct.unpack_from("<H", data, at)[0] == 258:
            struct.pack_into("<I", data, at + 8, len(data) + 10**6)
    path.write_bytes(bytes(data))
    pages = tiff_pages(path)
    assert [(page.columns, page.rows, page.bits) for page in pages] == [(30, 20, 1), (60, 40, 8)]
    with pytest.raises(InputError, match="far_value.tif is no volume: its pages are images of different sizes"):
        read_volume(path)


def test_a_3d_mask_is_named_by_its_plane_where_the_planes_have_names():
    """A review (session 33) of the Slicer Logic: a segment filled in 3D was refused as "drawn on 13
    of 20 slices along axis 0", where the neighbouring messages (and the panel) say "axial"."""
    from PAMSegmentLib.errors import InputError
    from PAMSegmentLib.propagate import find_prompt_slices

    prompt = np.zeros((20, 16, 16), np.uint8)
    prompt[4:15, 1:15, 1:15] = 1
    with pytest.raises(InputError, match=r"^label 1 is drawn on 11 of 20 axial slices: that is a 3D mask, not a slice "
                                         r"prompt"):
        find_prompt_slices(prompt, plane_names=("axial", "coronal", "sagittal"))
    with pytest.raises(InputError, match=r"^label 1 is drawn on 11 of 20 slices along axis 0: that is a 3D mask"):
        find_prompt_slices(prompt)


def test_the_slicer_job_keeps_the_volume_in_its_own_type(mrml_scene):
    """A review (session 33) of the memory of a run: the Slicer job copied the volume as float32 (an
    int16 CT: 4 bytes a voxel instead of 2; 15.7 bytes a voxel at the job's peak against 6.6 on the
    command line), though the engine takes float32 slice by slice. The copy keeps the volume's type,
    the result is the same, and a change of the volume's voxels since the run is still seen."""
    from conftest_mrml import make_segmentation, make_volume_node, slicer
    from doubles import OracleModel
    from test_mrml import CENTER, one_slice, synthetic

    from PAMSegmentLib.mrml import SegmentPropagation

    truth, image = synthetic()
    ct = np.round(image * 10).astype(np.int16)
    results = []
    for volume in (ct, ct.astype(np.float32)):
        vol = make_volume_node(volume)
        seg, ids = make_segmentation(vol, {"tumor": one_slice(truth, CENTER[0])})
        job = SegmentPropagation(vol, seg, ids["tumor"], model=OracleModel(truth))
        assert job.image.dtype == volume.dtype and np.array_equal(job.image, volume)
        job.run()
        results.append(job.result.mask)
        assert job._voxels_unchanged()
        slicer.util.arrayFromVolume(vol)[3, 4, 5] += 1
        slicer.util.arrayFromVolumeModified(vol)
        assert not job._voxels_unchanged()
    np.testing.assert_array_equal(results[0], results[1])


def test_propagate_refuses_a_volume_its_memory_cannot_hold_before_the_walks(ct_case, monkeypatch, capsys):
    """A review (session 33) measured propagate's peak (the process, the image and about 7 bytes a
    voxel; both walks' probabilities between two drawn slices) and found no check before the
    walks: a run that did not fit ended in a MemoryError after every slice was predicted (or
    hung under `ulimit -v`). The command line and batch now refuse it first, naming what fits."""
    from PAMSegmentLib import cli, volumes

    mib = 2**20
    assert cli.propagation_memory_bytes((100, 512, 512), 2, 0, {1: [50]}, False) == 200 * mib + 26214400 * 8
    assert cli.propagation_memory_bytes((100, 512, 512), 2, 0, {1: [10, 60], 2: [5]}, True) == \
        500 * mib + 26214400 * 8 + 8 * 49 * 262144
    # one gap between neighbouring drawn slices is held at a time (a re-review: the whole span was
    # counted, and a run drawn on 9 slices of 300 was refused at 1.4 GB; it took 0.6 GB)
    assert cli.propagation_memory_bytes((100, 512, 512), 2, 0, {1: [10, 40, 60], 2: [70, 75]}, True) == \
        500 * mib + 26214400 * 8 + 8 * 29 * 262144
    voxels = ct_case.image.size
    need = cli.propagation_memory_bytes(ct_case.image.shape, 2, 0, {1: [ct_case.prompt_slice]}, False)
    assert need == 200 * mib + voxels * 8
    monkeypatch.setattr(volumes, "memory_budget", lambda: (int(need / 0.9) - mib, None))  # just too little
    out = ct_case.directory / "out.nii.gz"
    args = ["propagate", str(ct_case.image_path), str(ct_case.prompt_path), "-o", str(out), "--method", "copy"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "error: propagating image.nii.gz (" in err and "voxels of int16) needs about 0.2 GB of memory at its peak" \
        in err and "nothing was done. Crop the volume around the object first (at most about" in err
    assert not out.exists()
    assert cli.main(args + ["--no-memory-check"]) == 0 and out.exists()
    monkeypatch.setattr(volumes, "memory_budget", lambda: (int(need / 0.9) + mib, None))  # just enough
    assert cli.main(args) == 0
    # batch: the case fails with the same words, the others go on
    monkeypatch.setattr(volumes, "memory_budget", lambda: (int(need / 0.9) - mib, None))
    (ct_case.directory / "cases.csv").write_text(f"image,prompt\n{ct_case.image_path},{ct_case.prompt_path}\n")
    capsys.readouterr()
    assert cli.main(["batch", str(ct_case.directory / "cases.csv"), "-o", str(ct_case.directory / "b"),
                     "--method", "copy"]) != 0
    said = capsys.readouterr()
    assert "needs about 0.2 GB of memory at its peak" in said.out + said.err
    assert cli.main(["batch", str(ct_case.directory / "cases.csv"), "-o", str(ct_case.directory / "b"),
                     "--method", "copy", "--no-memory-check"]) == 0


def test_a_healthy_file_that_does_not_fit_is_not_called_damaged(tmp_path, monkeypatch):
    """A review (session 33): under a memory limit (`ulimit -v`, a container) a healthy volume ITK
    could not allocate was "its header declares more voxels than this machine's memory holds ...
    is the header damaged?" or "is the file damaged?"."""
    import SimpleITK as sitk

    from PAMSegmentLib import volumes

    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((60, 100, 100), np.int16)), str(path))
    monkeypatch.setattr(volumes, "_address_space_left", lambda: None)
    # 1.2 MB of voxels, read twice over (the reader's buffer and ITK's: a re-review found a healthy
    # NIfTI called damaged again when what was left lay between once and twice its voxels)
    monkeypatch.setattr(volumes, "memory_budget", lambda: (2**30, 1800000))
    error = volumes._read_error(path, "ITK ERROR: NiftiImageIO(0x1): nifti_image_load failed for file")
    assert str(error).startswith(f"cannot read {path}: not enough memory: reading it needs about 2 MB and about "
                                 "2 MB is left to this process (ITK ERROR: NiftiImageIO(0x1): nifti_image_load")
    # a file that ends early is damaged, whatever memory is left (a re-review: a cut .mha was "not
    # enough memory")
    assert "its voxel data ends early or is damaged" in str(volumes._read_error(path, "fread got only 10 bytes"))
    monkeypatch.setattr(volumes, "memory_budget", lambda: (2**30, 2**30))
    assert "is the file damaged?" in str(volumes._read_error(path, "ITK ERROR: nifti_image_load failed"))
    monkeypatch.setattr(volumes, "_address_space_left", lambda: 1000)  # `ulimit -v` leaves 1000 bytes
    assert "not enough memory" in str(volumes._read_error(path, "ITK ERROR: nifti_image_load failed"))


def test_the_command_asks_openblas_for_one_thread_unless_told(monkeypatch):
    """A review (session 33): under `ulimit -v` scipy's OpenBLAS, loaded after the image was read,
    retried its per-thread buffers for good, deaf to SIGTERM; with one thread the run ends with
    the memory message. A value the user set is kept."""
    import signal

    from PAMSegmentLib import __main__ as entry
    from PAMSegmentLib import cli

    monkeypatch.setattr(cli, "main", lambda ends_process=False: 0)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
        assert entry.run() == 0
        import os

        assert os.environ["OPENBLAS_NUM_THREADS"] == "1"
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
        entry.run()
        assert os.environ["OPENBLAS_NUM_THREADS"] == "4"
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


def test_a_float64_volume_is_uploaded_as_float32():
    """A re-review (session 33): since Slicer's job keeps a volume in its own type, a float64 volume
    went to a server as float64 (twice the upload, over the server's 1 GB limit sooner); the
    engine computes in float32, so that is what is sent."""
    from PAMSegmentLib.remote import _compact

    mr = np.linspace(0, 1, 4 * 5 * 6).reshape(4, 5, 6)
    sent = _compact(mr)
    assert sent.dtype == np.float32 and np.array_equal(sent, mr.astype(np.float32))
    assert _compact(mr.astype(np.float32)).dtype == np.float32
    assert _compact(np.round(mr * 1000)).dtype == np.int16


def test_the_command_loads_scipy_before_it_reads_an_image():
    """A re-review (session 33): even with one OpenBLAS thread, scipy's OpenBLAS, loaded after a
    large image was read under `ulimit -v`, retried its buffer for good, deaf to SIGTERM. The
    commands that read images load it first, while memory is free (`info` does not)."""
    import subprocess

    code = """
import sys
from PAMSegmentLib import cli
seen = []
resolve = cli._resolve
def spy(ref):  # the command itself is replaced by a look at what is loaded when it would start
    run = resolve(ref)
    if not getattr(run, "__name__", "").startswith("cmd_"):
        return run
    return lambda args: seen.append("scipy.ndimage" in sys.modules) or 0
cli._resolve = spy
cli.main([*sys.argv[1:]], ends_process=True)
print(seen)
"""
    for argv, loaded in ((["propagate", "a.nii.gz", "b.nii.gz", "-o", "c.nii.gz"], True), (["info"], False)):
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == f"[{loaded}]", out.stderr
