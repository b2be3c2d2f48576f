"""The Python API as a researcher calls it: shared predictors across threads, ``previous=`` on
another image, option types, exception types, and no side effects on the caller's RNG."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import ellipsoid

from PAMSegmentLib import InputError
from PAMSegmentLib.baselines import CopyPredictor, TrackPredictor
from PAMSegmentLib.checkpoints import load_model
from PAMSegmentLib.imageset import label_images
from PAMSegmentLib.pam_predictor import PAMPredictor
from PAMSegmentLib.propagate import keyframes_from_edits, propagate


class _SlowCopy(CopyPredictor):
    """A copy predictor that records which thread called ``predict`` and gives the other thread
    time to run in between: walks of two calls sharing it interleave unless they take turns."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def predict(self, volume, guide_index, guide_mask, query_indices):
        self.calls.append(threading.current_thread().name)
        time.sleep(0.01)
        return super().predict(volume, guide_index, guide_mask, query_indices)


def _two_objects(ct_case):
    """ct_case's image with a second, darker object; prompts for each."""
    image = ct_case.image.copy()
    second = ellipsoid(image.shape, (10, 30, 12), (4.5, 5, 6)) & ~ct_case.truth
    image[second] = 90
    other = np.zeros_like(ct_case.prompt)
    other[10][second[10]] = 1
    return image, ct_case.prompt, other


def test_one_predictor_shared_by_two_threads_gives_the_sequential_results(ct_case):
    image, prompt_a, prompt_b = _two_objects(ct_case)
    shared = _SlowCopy()
    sequential = [propagate(image, p, ct_case.spacing, shared, threads=1).mask for p in (prompt_a, prompt_b)]
    shared.calls.clear()
    got = {}

    def run(name, prompt):
        got[name] = propagate(image, prompt, ct_case.spacing, shared, threads=1).mask

    threads = [threading.Thread(target=run, args=(n, p), name=n) for n, p in (("A", prompt_a), ("B", prompt_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(got["A"], sequential[0]) and np.array_equal(got["B"], sequential[1])
    # The walks took turns: all of one call's predictions, then all of the other's.
    switches = sum(a != b for a, b in zip(shared.calls, shared.calls[1:]))
    assert switches == 1, shared.calls
    # The state of the registration tracker, which differs per drawn slice, too.
    track = TrackPredictor()
    alone = [propagate(image, p, ct_case.spacing, track, threads=1).mask for p in (prompt_a, prompt_b)]
    threads = [threading.Thread(target=run, args=(n, p), name=n) for n, p in (("A", prompt_a), ("B", prompt_b))]
    shared = track
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.array_equal(got["A"], alone[0]) and np.array_equal(got["B"], alone[1])


def test_previous_of_another_image_is_not_reused(ct_case):
    first = propagate(ct_case.image, ct_case.prompt, ct_case.spacing, CopyPredictor(), threads=1)
    assert first.image_digest.startswith("crc32:")
    again = propagate(ct_case.image, ct_case.prompt, ct_case.spacing, CopyPredictor(), threads=1, previous=first)
    assert again.n_predicted == 0 and np.array_equal(again.mask, first.mask)  # same image: all reused
    changed = ct_case.image.copy()
    changed[13:][ct_case.truth[13:]] = -500  # the object ends early, away from the drawn slice 10
    fresh = propagate(changed, ct_case.prompt, ct_case.spacing, CopyPredictor(), threads=1)
    updated = propagate(changed, ct_case.prompt, ct_case.spacing, CopyPredictor(), threads=1, previous=first)
    assert not np.array_equal(fresh.mask, first.mask)
    assert np.array_equal(updated.mask, fresh.mask) and updated.n_predicted == fresh.n_predicted > 0
    # Another spacing is another image too (the walk's window counts millimetres).
    respaced = propagate(ct_case.image, ct_case.prompt, (1.0, 0.8, 0.7), CopyPredictor(), threads=1, previous=first)
    assert respaced.n_predicted > 0
    # A result without a digest (read back from a saved record) is trusted as before.
    first.image_digest = None
    assert propagate(ct_case.image, ct_case.prompt, ct_case.spacing, CopyPredictor(), threads=1,
                     previous=first).n_predicted == 0


def test_option_types_are_checked(ct_case):
    model = load_model(None)
    with pytest.raises(InputError, match="intensity_gate must be True, False or None .* got 'off'; the command line's "
                                         "'off' is False"):
        PAMPredictor(model, intensity_gate="off")
    with pytest.raises(InputError, match=r"registration_weight must be within \[0, 1\], got '0.5' \(text"):
        PAMPredictor(model, registration_weight="0.5")
    with pytest.raises(InputError, match="PAMPredictor needs a PAMModel"):
        PAMPredictor(None)
    assert PAMPredictor(model, intensity_gate=np.bool_(False)).intensity_gate is False
    assert PAMPredictor(model, intensity_gate=0).intensity_gate is False  # 0 and 1 are not ambiguous
    assert propagate(ct_case.image, ct_case.prompt, ct_case.spacing, CopyPredictor(), early_stop=1, threads=1).mask.any()
    args = (ct_case.image, ct_case.prompt, ct_case.spacing, CopyPredictor())
    for name, value in (("early_stop", "no"), ("remove_disconnected", 2), ("update", "yes")):
        with pytest.raises(InputError, match=f"{name} must be True or False, got {value!r}"):
            propagate(*args, **{name: value})
    called = []
    with pytest.raises(InputError, match="progress must be a function progress.fraction, message., got int"):
        propagate(*args, progress=5, cancel=None)
    with pytest.raises(InputError, match="cancel must be a CancelToken, got Event"):
        propagate(*args, progress=lambda f, m: called.append(f), cancel=threading.Event())
    assert called == []  # refused before any work
    for device in (5, "gpu"):
        with pytest.raises(InputError, match="device must be|unknown device"):
            propagate(ct_case.image, ct_case.prompt, ct_case.spacing, None, device=device)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device cuda:0 was asked for but this torch has no CUDA device"):
            propagate(ct_case.image, ct_case.prompt, ct_case.spacing, None, device="cuda:0")
    # Upper case is the same device: no contradictory "the model is on 'cpu'" refusal.
    assert propagate(ct_case.image, ct_case.prompt, ct_case.spacing, None, device="CPU", threads=1).mask.any()


def test_bad_prompts_and_results_raise_input_error(ct_case):
    args = (ct_case.image, ct_case.spacing, CopyPredictor())
    with pytest.raises(InputError, match="the prompt must be an integer label map, got values of type complex64"):
        propagate(args[0], ct_case.prompt.astype(np.complex64), *args[1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "invalid value encountered in cast" came from inside the library
        with pytest.raises(InputError, match=r"the prompt has label 1e\+10: labels must be whole numbers from 1 to "
                                             r"65535"):
            propagate(args[0], ct_case.prompt.astype(np.float32) * 1e10, *args[1:])
    with pytest.raises(InputError, match=r"the image is empty \(shape \(0, 40, 48\)\)"):
        propagate(np.zeros((0, 40, 48)), np.zeros((0, 40, 48), np.uint8), *args[1:])
    result = propagate(ct_case.image, ct_case.prompt, *args[1:], threads=1)
    with pytest.raises(InputError, match=r"label 2 was not propagated in this result \(its labels: 1\)"):
        result.review_first(2)


def test_earlier_keyframes_with_number_keys(ct_case):
    result = propagate(ct_case.image, ct_case.prompt, ct_case.spacing, CopyPredictor(), threads=1).mask
    edited = result.copy()
    edited[14] = 0  # erased: a wall
    text = keyframes_from_edits(ct_case.prompt, result, edited, earlier={"1": {"keyframes": [], "walls": [17]}})
    number = keyframes_from_edits(ct_case.prompt, result, edited, earlier={1: {"keyframes": [], "walls": [17]}})
    assert text.empty_slices == number.empty_slices == {1: [14, 17]}  # the earlier wall kept (was lost)
    with pytest.raises(InputError, match=r"earlier's label '1' must be \{'keyframes'"):
        keyframes_from_edits(ct_case.prompt, result, edited, earlier={"1": [3, 4]})
    with pytest.raises(InputError, match="earlier has the key 'one'"):
        keyframes_from_edits(ct_case.prompt, result, edited, earlier={"one": {}})


def test_a_second_round_from_the_result_keeps_the_first_rounds_corrections(ct_case):
    """The README's second round, keyframes_from_edits(prompt, result.mask, edited) without earlier=,
    lost every correction of the first round: given the result itself, they are kept."""
    args = (ct_case.image, ct_case.spacing, CopyPredictor())
    first = propagate(ct_case.image, ct_case.prompt, *args[1:], threads=1)
    edited = first.mask.copy()
    edited[14] = 0  # round 1: the object is absent on 14 (a wall)
    edited[9] = ct_case.truth[9]  # and redrawn on 9
    plan1 = keyframes_from_edits(ct_case.prompt, first, edited)
    second = propagate(ct_case.image, plan1.prompt, *args[1:], empty_slices=plan1.empty_slices, update=True, threads=1)
    assert not second.mask[14].any() and np.array_equal(second.mask[9] == 1, ct_case.truth[9])
    edited2 = second.mask.copy()
    edited2[7] = 0  # round 2 edits slice 7 only
    from_result = keyframes_from_edits(ct_case.prompt, second, edited2)
    from_record = keyframes_from_edits(ct_case.prompt, second.mask, edited2, earlier=plan1.record())
    from_mask = keyframes_from_edits(ct_case.prompt, second.mask, edited2)
    assert from_result.empty_slices == from_record.empty_slices == {1: [7, 14]}
    assert np.array_equal(from_result.prompt, from_record.prompt) and from_result.prompt[9].any()
    assert from_mask.empty_slices == {1: [7]} and not from_mask.prompt[9].any()  # what the mask alone knows
    third = propagate(ct_case.image, from_result.prompt, *args[1:], empty_slices=from_result.empty_slices, update=True,
                      threads=1)
    assert not third.mask[14].any() and not third.mask[7].any()
    assert np.array_equal(third.mask[9] == 1, ct_case.truth[9])


def test_label_images_checks_its_options_first():
    rng = np.random.default_rng(0)
    images = [rng.normal(0, 1, (32, 32)) for _ in range(3)]
    mask = np.zeros((32, 32), np.uint8)
    mask[10:20, 10:20] = 1
    for kwargs, message in (({"labels": 1}, "labels must be a list of label numbers, got 1"),
                            ({"progress": 5}, "progress must be a function"),
                            ({"cancel": threading.Event()}, "cancel must be a CancelToken, got Event")):
        with pytest.raises(InputError, match=message):
            label_images(images, 0, mask, CopyPredictor(), **kwargs)
    with pytest.raises(InputError, match="normalize must be True or False, got 'no'"):  # was taken as True
        label_images(images, 0, mask, CopyPredictor(), normalize="no")


def test_loading_the_model_leaves_the_callers_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    load_model(None)
    assert torch.equal(torch.rand(3), expected)


def test_remote_model_refuses_an_argument_propagate_does_not_take(ct_case):
    from PAMSegmentLib.remote import RemoteModel

    server = RemoteModel("http://127.0.0.1:9")  # nothing listens: the check comes before any request
    with pytest.raises(InputError, match="propagate.. got an unexpected argument 'early_stopping'"):
        server.propagate(ct_case.image, ct_case.prompt, ct_case.spacing, early_stopping=False)


def test_2d_labellers_give_the_same_result_whatever_the_unit_of_the_values():
    """label_images and label_cells normalised with at least 1e-6 of width, so an image in other
    units (x 1e-12) lost its contrast."""
    pytest.importorskip("sklearn")
    from test_cells import disc_image

    from PAMSegmentLib.cells import label_cells

    image, ref = disc_image()
    examples = np.where(np.isin(ref, [1, 4, 16]), ref, 0)
    plain, tiny = (label_cells(image.astype(np.float64) * s, examples).labels for s in (1.0, 1e-12))
    assert plain.max() == 16 and np.array_equal(plain, tiny)
    rng = np.random.default_rng(1)
    images = [np.where(ref > 0, 100.0, 20.0) + rng.normal(0, 5, ref.shape) for _ in range(3)]
    mask = (ref == 6).astype(np.uint8)
    got = [label_images([im * s for im in images], 0, mask, CopyPredictor()).masks for s in (1.0, 1e-12)]
    assert all(np.array_equal(a, b) for a, b in zip(*got)) and got[0][1].any()


def test_propagating_again_from_inside_a_run_with_its_predictor_is_refused_not_deadlocked(ct_case):
    shared = CopyPredictor()

    def progress(fraction, message):
        propagate(ct_case.image, ct_case.prompt, ct_case.spacing, shared, threads=1)

    with pytest.raises(InputError, match="propagate was called again with the same predictor while it runs a walk"):
        propagate(ct_case.image, ct_case.prompt, ct_case.spacing, shared, threads=1, progress=progress)
    # The lock was released: the predictor works again, and another predictor inside a callback too.
    assert propagate(ct_case.image, ct_case.prompt, ct_case.spacing, shared, threads=1).mask.any()
    inner = []
    propagate(ct_case.image, ct_case.prompt, ct_case.spacing, shared, threads=1, progress=lambda f, m: inner.append(
        propagate(ct_case.image, ct_case.prompt, ct_case.spacing, CopyPredictor(), threads=1)) if not inner else None)
    assert inner and inner[0].mask.any()


def test_a_predictor_that_ran_can_still_be_copied_and_pickled(ct_case):
    import copy
    import pickle

    track = TrackPredictor()
    first = propagate(ct_case.image, ct_case.prompt, ct_case.spacing, track, threads=1).mask
    for twin in (copy.deepcopy(track), pickle.loads(pickle.dumps(track))):
        assert np.array_equal(propagate(ct_case.image, ct_case.prompt, ct_case.spacing, twin, threads=1).mask, first)


def test_spacing_given_as_text_or_bools_is_refused(ct_case):
    for spacing in ("333", (True, True, True), ("2.5", 0.8, 0.7)):
        with pytest.raises(InputError, match="spacing must be three positive numbers"):
            propagate(ct_case.image, ct_case.prompt, spacing, CopyPredictor())
    assert propagate(ct_case.image, ct_case.prompt, np.array([2.5, 0.8, 0.7]), CopyPredictor(), threads=1).mask.any()


def test_label_images_and_propagate_sharing_a_predictor_take_turns(ct_case):
    shared = _SlowCopy()
    rng = np.random.default_rng(2)
    images = [np.where(ct_case.truth[10], 150.0, 40.0) + rng.normal(0, 5, ct_case.truth[10].shape) for _ in range(6)]
    mask = ct_case.prompt[10]

    def run_images():
        label_images(images, 0, mask, shared, threads=1)

    def run_volume():
        propagate(ct_case.image, ct_case.prompt, ct_case.spacing, shared, threads=1)

    threads = [threading.Thread(target=run_images, name="images"), threading.Thread(target=run_volume, name="volume")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(shared.calls) == {"images", "volume"}
    assert sum(a != b for a, b in zip(shared.calls, shared.calls[1:])) == 1, shared.calls


def test_a_huge_fill_value_outside_the_field_of_view_changes_nothing(ct_case):
    """The flat-region test was scaled by the slice's whole range: a fill value of -1e30 in a
    corner made every region look flat (PAM's Dice 0.987 -> 0.536 in a review)."""
    image = ct_case.image.astype(np.float64)
    results = []
    for fill in (-1000.0, -1e30):
        filled = image.copy()
        filled[:, :3, :3] = fill  # 9 of 1920 pixels a slice
        results.append(propagate(filled, ct_case.prompt, ct_case.spacing, None, threads=1).mask)
    assert results[0].sum() > 1.5 * ct_case.prompt.sum() and np.array_equal(results[0], results[1])


def test_simpleitk_images_are_named_not_flattened(tmp_path):
    """A SimpleITK image given to propagate became a 1D array ("got 1D with shape (6065928,)"); as
    the reference of write_labelmap / read_labelmap it raised AttributeError. propagate says what
    to pass; the readers and writers take it (Volume.from_sitk)."""
    import SimpleITK as sitk

    from PAMSegmentLib.volumes import read_labelmap, write_labelmap

    array = np.zeros((6, 8, 9), np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.0))
    with pytest.raises(InputError, match=r"^the image is a SimpleITK image; propagate takes numpy arrays \(k, j, i\): "
                                         r"pass sitk.GetArrayFromImage\(image\) and the spacing reversed"):
        propagate(image, np.zeros((6, 8, 9), np.uint8), (2.0, 0.8, 0.7))
    mask = np.zeros((6, 8, 9), np.uint8)
    mask[3, 2:5, 2:6] = 1
    out = write_labelmap(mask, image, tmp_path / "m.nii.gz")
    back = read_labelmap(out, reference=image)
    assert np.array_equal(back.array, mask) and back.spacing == pytest.approx((2.0, 0.8, 0.7))
    with pytest.raises(InputError, match="write_labelmap's reference must be a Volume .* got ndarray"):
        write_labelmap(mask, array, tmp_path / "n.nii.gz")
    # the project's own Volume ("got 0D with shape ()") and a 2D image as the reference (a reshape error)
    with pytest.raises(InputError, match=r"^the image is a Volume; propagate takes its array: pass image.array"):
        propagate(back, mask, (2.0, 0.8, 0.7))
    with pytest.raises(InputError, match="read_labelmap's reference must be a 3D single-component image, got a 2D"):
        read_labelmap(out, reference=image[:, :, 2])
