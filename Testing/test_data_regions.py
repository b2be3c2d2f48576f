"""Region cutting of unlabelled volumes and the download-free pieces of the extra sources
(InVesalius project reader, Debian copyright parsing, apt-get missing, stardist stack reader)."""

import io
import plistlib
import tarfile

import numpy as np
import pytest

from PAMSegmentLib.training import data as D

pytest.importorskip("skimage")

SHAPE = (12, 24, 24)
EDGE_I = 12  # the step edge lies between i = 11 and i = 12


def step_volume(noise=0.02, seed=0):
    rng = np.random.default_rng(seed)
    vol = np.full(SHAPE, 0.2, dtype=np.float32)
    vol[:, :, EDGE_I:] = 0.8
    return vol + noise * rng.standard_normal(SHAPE).astype(np.float32)


def cut(vol, **kw):
    args = dict(n_segments=16, compactness=0.05, sigma_mm=0.5, merge_threshold=0.1,
                min_voxels=50, min_extent=4, max_fraction=0.3, min_edge_fraction=0.0,
                max_bbox_fraction=1.0)
    args.update(kw)
    return D.cut_regions(vol, (2.0, 1.0, 1.0), **args)


def test_regions_do_not_straddle_a_step_edge():
    lab = cut(step_volume())
    assert lab.dtype == np.int16 and lab.shape == SHAPE
    ids = [int(v) for v in np.unique(lab) if v]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 2
    for r in ids:
        i_idx = np.nonzero(lab == r)[2]
        assert i_idx.max() < EDGE_I or i_idx.min() >= EDGE_I, f"region {r} straddles the edge"
    # both sides are used
    assert (lab[:, :, :EDGE_I] > 0).any() and (lab[:, :, EDGE_I:] > 0).any()


def test_merging_recovers_the_two_sides():
    # no size limit: supervoxels merge up to the edge and not across it; the first merged
    # region must not be lost (skimage's merge_hierarchical numbers its output from 0)
    lab = cut(step_volume(), merge_threshold=0.3, max_fraction=1.0)
    assert lab.max() == 2
    left, right = lab[:, :, :EDGE_I], lab[:, :, EDGE_I:]
    assert len(np.unique(left)) == 1 and len(np.unique(right)) == 1
    assert left.flat[0] != right.flat[0] and left.flat[0] > 0 and right.flat[0] > 0


def test_size_and_extent_filters():
    vol = step_volume()
    lab = cut(vol)
    counts = np.bincount(lab.ravel())[1:]
    assert counts.min() >= 50
    assert cut(vol, min_voxels=int(np.prod(SHAPE))).max() == 0       # nothing that big
    assert cut(vol, min_extent=max(SHAPE) + 1).max() == 0           # nothing that long
    # max_fraction 0.3 of the volume: no region covers a whole side (half the volume)
    assert counts.max() <= 0.3 * np.prod(SHAPE)
    # the cap keeps a subset, still relabelled 1..n
    capped = cut(vol, max_regions=1)
    assert capped.max() == 1 and np.count_nonzero(capped) > 0


def test_edge_fraction_drops_cuts_inside_homogeneous_tissue():
    # bright 6x8x8 boxes in a dark background: the size limit chops the background into
    # pieces whose borders are mostly other background pieces (no edge); only the boxes,
    # bounded by real edges all round, survive min_edge_fraction
    rng = np.random.default_rng(1)
    vol = np.full(SHAPE, 0.2, dtype=np.float32)
    boxes = [(slice(3, 9), slice(2, 10), slice(2, 10)), (slice(3, 9), slice(14, 22), slice(14, 22))]
    for b in boxes:
        vol[b] = 0.8
    vol += 0.02 * rng.standard_normal(SHAPE).astype(np.float32)
    in_box = np.zeros(SHAPE, dtype=bool)
    for b in boxes:
        in_box[b] = True
    kw = dict(n_segments=24, max_fraction=0.1, min_voxels=100)
    loose = cut(vol, min_edge_fraction=0.0, **kw)
    strict = cut(vol, min_edge_fraction=0.5, **kw)
    assert (loose[~in_box] > 0).any()            # background pieces exist without the filter
    assert strict.max() >= 2 and not (strict[~in_box] > 0).any()
    for b in boxes:                              # each box is found as (nearly) one region
        ids, counts = np.unique(strict[b], return_counts=True)
        assert ids[np.argmax(counts)] > 0 and counts.max() >= 0.9 * strict[b].size


def test_mask_is_respected():
    vol = step_volume()
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2:10, 4:20, 4:20] = True
    lab = cut(vol, mask=mask, min_voxels=20)
    assert lab.max() > 0 and not (lab[~mask] > 0).any()


def test_ct_body_mask_and_features():
    hu = np.full((6, 20, 20), -1000.0, dtype=np.float32)
    hu[:, 4:16, 4:16] = 40.0          # body
    hu[:, 8:12, 8:12] = -900.0        # air inside the body (sinus): filled
    hu[:, 0, :] = 200.0               # table, not connected to the body
    m = D.ct_body_mask(hu)
    assert m[:, 4:16, 4:16].all() and m.sum() == 6 * 12 * 12
    f = D.ct_features(hu)
    assert f.shape == hu.shape + (2,) and f.min() >= 0 and f.max() <= 1


def test_read_invesalius_project(tmp_path):
    vol = np.arange(3 * 4 * 5, dtype="<i2").reshape(3, 4, 5) - 1024
    meta = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": [3, 4, 5]},
            "spacing": [0.5, 0.6, 2.0], "modality": "CT", "name": "toy"}
    path = tmp_path / "toy.inv3"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in (("main.plist", plistlib.dumps(meta)), ("matrix.dat", vol.tobytes())):
            info = tarfile.TarInfo(f"tmpxyz/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out, spacing, m = D.read_invesalius_project(path)
    assert np.array_equal(out, vol) and out.dtype == np.int16
    assert np.allclose(spacing, [2.0, 0.6, 0.5]) and m["name"] == "toy"


def test_deb_copyright_licence(tmp_path):
    doc = tmp_path / "usr" / "share" / "doc" / "pkg"
    doc.mkdir(parents=True)
    (doc / "copyright").write_text(
        "Format: https://example.invalid/copyright-format/1.0/\nUpstream-Name: X\n\n"
        "Files: *\nCopyright: someone\nLicense: GPL-2\n\n"
        "Files: other/*\nCopyright: else\nLicense: BSD-3-Clause\n")
    assert D.deb_copyright_licence(tmp_path, "pkg") == "GPL-2"
    assert D.deb_copyright_licence(tmp_path, "missing") is None


def test_missing_apt_get_is_a_clear_error(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(D.SourceUnavailable, match="apt-get is not available"):
        D.ensure_deb_unpacked(tmp_path, D.DEB_SOURCES["invesalius"])


def test_read_stardist_stack(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    d = tmp_path / "stardist" / "data" / "images"
    d.mkdir(parents=True)
    img = np.random.default_rng(0).integers(100, 400, (4, 6, 6)).astype(np.uint16)
    mask = np.zeros((4, 6, 6), dtype=np.uint16)
    mask[1:3, 1:3, 1:3] = 7
    mask[1:3, 4:6, 4:6] = 42
    tifffile.imwrite(d / "img3d.tif", img, photometric="minisblack")
    tifffile.imwrite(d / "mask3d.tif", mask, photometric="minisblack")
    out, lab, orig = D.read_stardist_nuclei_3d(tmp_path)
    assert out.dtype == np.float32 and lab.dtype == np.int16
    assert sorted(np.unique(lab).tolist()) == [0, 1, 2] and orig == {1: 7, 2: 42}
    assert np.array_equal(lab > 0, mask > 0)
