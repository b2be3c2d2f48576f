"""Session 34: the memory of a propagation in Slicer. Writing a result back held whole copies of
the segment's layer (a 512 x 512 x 100 job added 560 MB to Slicer, 320 MB now), and a job whose
peak did not fit what was free could end with the system stopping Slicer, unsaved work and all:
the Logic now estimates the peak first and refuses (``NotEnoughMemory``) unless told to run anyway."""

from __future__ import annotations

import numpy as np
import pytest

from conftest_mrml import *  # noqa: F401,F403 - fixtures (mrml_scene)
from conftest_mrml import ellipsoid, make_segmentation, make_volume_node

from PAMSegmentLib import mrml
from PAMSegmentLib.baselines import get_predictor
from PAMSegmentLib.errors import InputError, NotEnoughMemory

MiB = 2**20


# -- PackedMask read a slice at a time: the same bits as packing the whole array -------------------


def _fields(p):
    return p.shape, p.offset, p.box, p.bits.tobytes()


@pytest.mark.parametrize("case", ["random", "labels", "empty", "one voxel", "2d", "edge slices"])
def test_packed_mask_read_by_slices_packs_the_same_bits_as_the_whole_array(case):
    rng = np.random.default_rng(7)
    value = None
    if case == "random":
        mask = np.zeros((9, 13, 11), bool)
        mask[2:7, 3:10, 1:6] = rng.random((5, 7, 5)) > 0.5
    elif case == "labels":
        mask = rng.integers(0, 4, (6, 10, 12)).astype(np.uint8)
        mask[:, :2] = 0
        value = 2
    elif case == "empty":
        mask = np.zeros((4, 5, 6), np.uint8)
    elif case == "one voxel":
        mask = np.zeros((4, 5, 6), bool)
        mask[3, 0, 5] = True
    elif case == "2d":
        mask = rng.random((7, 9)) > 0.7
    else:
        mask = np.zeros((5, 6, 7), np.uint8)
        mask[0, 1, 1] = mask[4, 5, 6] = 1
    whole = mrml.PackedMask._of_whole(np.asarray(mask) > 0 if value is None else np.asarray(mask) == value)
    packed = mrml.PackedMask.of(mask, value=value)
    assert _fields(packed) == _fields(whole)
    expected = np.asarray(mask) > 0 if value is None else np.asarray(mask) == value
    np.testing.assert_array_equal(packed.unpack(), expected)
    if case == "edge slices":
        assert packed.offset == (0, 1, 1) and packed.box == (5, 5, 6)


# -- LabelmapSnapshot read in place: shared layers and layers with other values -------------------


def test_snapshot_of_a_shared_layer_keeps_only_the_segments_own_voxels(mrml_scene):
    shape = (6, 8, 9)
    volume = make_volume_node(np.zeros(shape, np.float32))
    a = np.zeros(shape, np.uint8)
    a[1:4, 2:5, 2:6] = 1
    b = np.zeros(shape, np.uint8)
    b[2:5, 5:7, 1:8] = 1
    seg, ids = make_segmentation(volume, {"a": a, "b": b})
    segmentation = seg.GetSegmentation()
    segmentation.CollapseBinaryLabelmaps(False)  # one layer for both, as the Segment Editor keeps them
    assert mrml._sharing(segmentation, ids["a"]) == [ids["b"]]
    snap = mrml.LabelmapSnapshot.take(seg, ids["a"])
    assert snap.raw is None
    label = segmentation.GetSegment(ids["a"]).GetLabelValue()
    voxels = snap.voxels()
    assert set(np.unique(voxels).tolist()) == {0, label}
    assert int((voxels == label).sum()) == int(a.sum())  # b's voxels are not in a's snapshot


def test_snapshot_of_a_layer_with_other_values_keeps_them_raw(mrml_scene):
    shape = (5, 6, 7)
    volume = make_volume_node(np.zeros(shape, np.float32))
    a = np.zeros(shape, np.uint8)
    a[1:3, 1:4, 2:5] = 1
    seg, ids = make_segmentation(volume, {"a": a})
    stored = seg.GetSegmentation().GetSegment(ids["a"]).GetRepresentation(mrml._binary_name())
    from vtk.util import numpy_support

    values = numpy_support.vtk_to_numpy(stored.GetPointData().GetScalars())
    values[0] = 7  # a value that is neither 0 nor the label (no segment of this layer)
    snap = mrml.LabelmapSnapshot.take(seg, ids["a"])
    assert snap.packed is None and snap.raw is not None
    np.testing.assert_array_equal(snap.raw.ravel(), values)
    values[1] = 9  # a copy: later changes of the layer do not reach it
    assert snap.raw.ravel()[1] != 9


# -- the estimate -----------------------------------------------------------------------------------


def test_job_memory_estimate_is_the_stated_formula():
    shape = (100, 512, 512)
    voxels = 100 * 512 * 512
    assert mrml.job_memory_bytes(shape, 0, [50], network=None) == 50 * MiB + 6 * voxels
    assert mrml.job_memory_bytes(shape, 0, [50], network="small", torch_loaded=True) == 150 * MiB + 8 * voxels
    assert mrml.job_memory_bytes(shape, 0, [50], network="small", torch_loaded=False) == 300 * MiB + 8 * voxels
    assert mrml.job_memory_bytes(shape, 0, [50], network="large", torch_loaded=True) == 950 * MiB + 8 * voxels
    # two drawn slices 50 apart: 8 bytes a voxel (3 without the network) of the 49 slices between
    # them, spread over the 100
    assert mrml.job_memory_bytes(shape, 0, [10, 60], network="small") == 150 * MiB + int(voxels * (8 + 8 * 49 / 100))
    assert mrml.job_memory_bytes(shape, 0, [60, 10, 30], network="small") == 150 * MiB + int(voxels * (8 + 8 * 29 / 100))
    assert mrml.job_memory_bytes(shape, 0, [10, 60], network=None) == 50 * MiB + int(voxels * (6 + 3 * 49 / 100))
    with pytest.raises(ValueError, match='network must be None, "small" or "large"'):
        mrml.job_memory_bytes(shape, 0, [50], network=False)  # (a bool before session 34's mend)


def test_which_jobs_run_which_network_here(tmp_path, monkeypatch):
    from doubles import OracleModel

    from PAMSegmentLib.checkpoints import load_model
    from PAMSegmentLib.pam_predictor import PAMPredictor
    from PAMSegmentLib.remote import RemoteModel

    assert mrml._network_of(None) == "small"  # the job loads the shipped weights
    big = tmp_path / "propmask.pth"
    with open(big, "wb") as fh:
        fh.truncate(130 * MiB)  # the official checkpoint's size (sparse: no disk used)
    assert mrml._network_of(None, str(big)) == "large"
    assert mrml._network_of(None, str(tmp_path / "missing.pt")) == "small"
    monkeypatch.setenv("PAMSEGMENT_MODEL", str(big))  # what the job loads without a checkpoint
    assert mrml._network_of(None) == "large" and mrml._network_of(None, "") == "large"
    monkeypatch.delenv("PAMSEGMENT_MODEL")
    assert mrml._network_of(get_predictor("copy")) is None
    assert mrml._network_of(get_predictor("track")) is None
    assert mrml._network_of(RemoteModel("http://127.0.0.1:9")) is None
    assert mrml._network_of(OracleModel(np.zeros((4, 4, 4), bool))) is None  # a stand-in without a network
    shipped = load_model()
    assert mrml._network_of(shipped) == "small" and mrml._network_of(PAMPredictor(shipped)) == "small"


# -- the refusal, on real nodes ---------------------------------------------------------------------


@pytest.fixture
def drawn_ball(mrml_scene):
    shape = (20, 40, 40)
    truth = ellipsoid(shape, (10, 20, 20), (6, 10, 10))
    volume = make_volume_node((truth * 100.0).astype(np.int16), name="ct")
    prompt = np.zeros(shape, np.uint8)
    prompt[10] = truth[10]
    seg, ids = make_segmentation(volume, {"ball": prompt})
    return volume, seg, ids["ball"], prompt


def test_a_job_that_does_not_fit_what_is_free_is_refused_before_it_starts(drawn_ball, monkeypatch):
    volume, seg, sid, prompt = drawn_ball
    before = mrml.segment_mask(seg, sid, volume).copy()
    need = mrml.job_memory_bytes((20, 40, 40), 0, [10], network=None)
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: need - 1)
    with pytest.raises(NotEnoughMemory) as info:
        mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy"))
    text = str(info.value)
    assert isinstance(info.value, InputError)  # (the command line's and the panel's handling of bad input)
    assert text.startswith('propagating "ball" on "ct" (40 x 40 x 20 voxels) needs about 50 MB more memory')
    assert "and about 50 MB is free now" in text and "memory_check=False" in text and "memoryCheck=False" in text
    # too little for the fixed part alone: no volume size is suggested
    assert "too little is free now for a volume of any size" in text and "Crop Volume" not in text
    assert "memory_check" not in info.value.reason  # what the panel shows, asking to run it anyway
    np.testing.assert_array_equal(mrml.segment_mask(seg, sid, volume), before)

    monkeypatch.setattr(mrml, "_memory_free_now", lambda: need)  # just enough: runs
    job = mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy"))
    assert job.state == "pending"
    # 3 GB free: (free + the copy it held - the fixed part) / (6 + 2 bytes a voxel) fit
    monkeypatch.setattr(mrml, "job_memory_bytes", lambda *a, **k: 0)  # (not used by the check itself)
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 3 * 2**30)
    monkeypatch.setattr(mrml, "_job_memory_parts", lambda *a, **k: (50 * MiB, 6.0 + 2**40))  # needs more
    with pytest.raises(NotEnoughMemory) as info:
        mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy"))
    assert "Crop Volume" not in str(info.value)  # (2**40 bytes a voxel: none fit)


def test_a_refused_job_runs_when_told_to_and_the_api_passes_it_on(drawn_ball, monkeypatch):
    volume, seg, sid, prompt = drawn_ball
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 1 * MiB)
    with pytest.raises(NotEnoughMemory):
        mrml.propagate_segment(volume, seg, sid, model=get_predictor("copy"))
    history = mrml.PropagationHistory()
    written = mrml.propagate_segment(volume, seg, sid, model=get_predictor("copy"), memory_check=False,
                                     history=history)
    assert written == sid
    result = mrml.segment_mask(seg, sid, volume)
    assert result[10].sum() == prompt[10].sum() and result.any(axis=(1, 2)).sum() > 1  # propagated


def test_an_update_is_refused_for_memory_too(drawn_ball, monkeypatch):
    volume, seg, sid, prompt = drawn_ball
    history = mrml.PropagationHistory()
    mrml.propagate_segment(volume, seg, sid, model=get_predictor("copy"), history=history)
    edited = mrml.segment_mask(seg, sid, volume)
    edited[12] = 0
    import slicer

    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, seg, sid, volume)
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 1 * MiB)
    with pytest.raises(NotEnoughMemory) as info:
        mrml.update_segment(volume, seg, sid, history, model=get_predictor("copy"))
    assert str(info.value).startswith('updating "ball" on "ct"')
    np.testing.assert_array_equal(mrml.segment_mask(seg, sid, volume), edited)
    job = mrml.update_segment(volume, seg, sid, history, model=get_predictor("copy"), memory_check=False)
    assert job.state == "finished"


def test_memory_check_must_be_a_flag(drawn_ball):
    volume, seg, sid, _ = drawn_ball
    with pytest.raises(InputError, match="memory_check must be True or False"):
        mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy"), memory_check="off")


def test_free_memory_is_the_least_of_available_the_groups_room_and_the_address_space_left(monkeypatch, tmp_path):
    import resource

    import PAMSegmentLib.volumes as volumes

    with open("/proc/meminfo", encoding="ascii") as fh:
        available = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    monkeypatch.setattr(volumes, "_cgroup_levels", lambda *a: [])
    monkeypatch.setattr(resource, "getrlimit", lambda what: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    room = volumes.memory_room()
    assert abs(room - available) < 200 * MiB  # (what is available moves a little between the two reads)
    # a control group of 1 GB of which the whole group holds 900 MB: 100 MB left, whatever this process holds
    monkeypatch.setattr(volumes, "_cgroup_levels", lambda *a: [(2**30, 900 * MiB)])
    assert volumes.memory_room() == 2**30 - 900 * MiB
    # ulimit -v: the limit less the address space the process maps (not what it holds)
    with open("/proc/self/status", encoding="ascii") as fh:
        mapped = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    monkeypatch.setattr(volumes, "_cgroup_levels", lambda *a: [])
    monkeypatch.setattr(resource, "getrlimit", lambda what: (mapped + 64 * MiB, resource.RLIM_INFINITY))
    assert 0 < volumes.memory_room() <= 64 * MiB


def test_a_groups_usage_is_read_beside_its_limit(tmp_path):
    from PAMSegmentLib.volumes import _cgroup_levels

    root = tmp_path / "cg"
    (root / "job").mkdir(parents=True)
    (root / "job" / "memory.max").write_text(str(4 * 2**30))
    (root / "job" / "memory.current").write_text(str(3 * 2**30))
    (root / "memory.max").write_text("max")
    own = tmp_path / "cgroup"
    own.write_text("0::/job\n")
    assert _cgroup_levels(str(root), str(own)) == [(4 * 2**30, 3 * 2**30)]
    # file cache the kernel can drop is not held: its inactive part is left out of the usage
    (root / "job" / "memory.stat").write_text(f"anon 1000\nfile {2 * 2**30}\ninactive_file {2**30}\nactive_file 5\n")
    assert _cgroup_levels(str(root), str(own)) == [(4 * 2**30, 2 * 2**30)]
    (root / "job" / "memory.current").unlink()
    assert _cgroup_levels(str(root), str(own)) == [(4 * 2**30, None)]
    # cgroup v1: memory.usage_in_bytes less total_inactive_file
    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text(str(2**30))
    (v1 / "memory" / "job" / "memory.usage_in_bytes").write_text(str(900 * MiB))
    (v1 / "memory" / "job" / "memory.stat").write_text(f"inactive_file 1\ntotal_inactive_file {400 * MiB}\n")
    own.write_text("4:memory:/job\n")
    assert _cgroup_levels(str(v1), str(own)) == [(2**30, 500 * MiB)]


def test_the_check_of_a_server_job_counts_the_float32_copy_of_a_float64_volume(monkeypatch):
    from PAMSegmentLib.remote import RemoteModel, _compact

    parts = []
    real = mrml._job_memory_parts
    monkeypatch.setattr(mrml, "_job_memory_parts", lambda *a: parts.append(real(*a)) or parts[-1])
    monkeypatch.setattr(mrml, "_memory_free_now", lambda: 0)
    image = np.zeros((10, 20, 30), np.float64)
    for dtype in (np.float64, np.float32, np.int16):
        with pytest.raises(NotEnoughMemory):
            mrml.check_job_memory(image.astype(dtype), 0, [5], RemoteModel("http://127.0.0.1:9"), "x")
    with pytest.raises(NotEnoughMemory):  # a local method keeps the volume as it is
        mrml.check_job_memory(image, 0, [5], get_predictor("copy"), "x")
    # 50 MB + 6 bytes a voxel, + 4 for the float32 copy a server job of a float64 volume sends
    assert parts == [(50 * MiB, 10.0), (50 * MiB, 6.0), (50 * MiB, 6.0), (50 * MiB, 6.0)]
    # whole numbers within int16 go as int16, a slice at a time (same values as before)
    whole = np.arange(6000, dtype=np.float64).reshape(10, 20, 30) - 3000
    assert _compact(whole).dtype == np.int16 and np.array_equal(_compact(whole), whole)
    half = whole + 0.5
    assert _compact(half).dtype == np.float32
    half[9, 19, 29] = np.nan
    assert _compact(half).dtype == np.float32


# -- a segment holding a remembered result, propagated again from Python ----------------------------


def test_propagating_a_remembered_result_again_names_update_and_undo(drawn_ball):
    volume, seg, sid, prompt = drawn_ball
    history = mrml.PropagationHistory()
    mrml.propagate_segment(volume, seg, sid, model=get_predictor("copy"), history=history)
    with pytest.raises(InputError) as info:
        mrml.SegmentPropagation(volume, seg, sid, model=get_predictor("copy"))
    text = str(info.value)
    assert "3D mask" in text and "Update from my edits" in text and "Undo propagation" in text
    # a 3D mask PAMSegment did not write (or no longer remembers) gets no such advice
    other = ellipsoid((20, 40, 40), (10, 20, 20), (6, 10, 10)).astype(np.uint8)
    seg2, ids2 = make_segmentation(volume, {"solid": other})
    with pytest.raises(InputError) as info:
        mrml.SegmentPropagation(volume, seg2, ids2["solid"], model=get_predictor("copy"))
    assert "3D mask" in str(info.value) and "Update from my edits" not in str(info.value)


# -- Windows: what is free from GlobalMemoryStatusEx (a stand-in kernel32: no Windows here) --------


def test_windows_room_is_the_least_of_available_physical_memory_and_what_may_be_committed(monkeypatch):
    import ctypes
    import types

    import PAMSegmentLib.volumes as volumes

    calls = []

    def global_memory_status_ex(ref):
        status = ref._obj
        calls.append(int(status.dwLength))
        status.ullTotalPhys, status.ullAvailPhys = 16 * 2**30, 5 * 2**30
        status.ullTotalPageFile, status.ullAvailPageFile = 20 * 2**30, 3 * 2**30
        return 1

    kernel32 = types.SimpleNamespace(GlobalMemoryStatusEx=global_memory_status_ex)
    monkeypatch.setattr(ctypes, "windll", types.SimpleNamespace(kernel32=kernel32), raising=False)
    assert volumes._windows_room() == 3 * 2**30
    assert calls == [64]  # the structure's size, as the call requires (2 DWORDs + 7 DWORDLONGs)
    monkeypatch.setattr(volumes, "_on_windows", lambda: True)
    assert volumes.memory_room() == 3 * 2**30  # (not /proc, which Windows has not)
    assert volumes.memory_budget() == (16 * 2**30, 3 * 2**30)  # the command line's check: limit, free
    kernel32.GlobalMemoryStatusEx = lambda ref: 0  # the call failed: nothing is known
    assert volumes.memory_room() is None and volumes.memory_budget() == (None, None)
    monkeypatch.delattr(ctypes, "windll")
    assert volumes._windows_room() is None
