"""PAM's registration fusion (``InferenceParams.registration_weight``): the network's probability
fused with the previous slice's mask warped by demons registration, chained within a window.

The network is replaced by a double (``_predict_network``) so the tests check the fusion itself:
what is warped onto what, what decides where the object ends, and what w = 0 leaves untouched.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy import ndimage

from PAMSegmentLib.baselines import TrackPredictor, _crop_around
from PAMSegmentLib.checkpoints import InferenceParams
from PAMSegmentLib.metrics import dice
from PAMSegmentLib.pam_predictor import MemoryPAMPredictor, PAMPredictor
from PAMSegmentLib.preprocess import PreprocessingParams
from PAMSegmentLib.propagate import SlicePrediction, propagate


# What the predictor reads of a network's config: no prior channel, an object-present head.
PLAIN_NETWORK = SimpleNamespace(mask_prior=False, presence_head=True)


def sliding_square(n: int = 12, size: int = 64, step: int = 2, side: int = 18, seed: int = 0):
    """A bright square in noise moving ``step`` px per slice along the columns; slices 0..n-1."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((n, size, size), bool)
    for k in range(n):
        c0 = 10 + step * k
        truth[k, 22:22 + side, c0:c0 + side] = True
    img = 0.2 + 0.6 * truth + rng.normal(0, 0.03, truth.shape)
    return img.astype(np.float32), truth


class StaleNetwork(PAMPredictor):
    """A network double that copies the guide's mask unchanged onto every query (it misses all
    motion), with presence ``present`` (or 0 from slice ``absent_from`` on)."""

    def __init__(self, registration_weight: float, window: int = 4, absent_from: int | None = None):
        model = SimpleNamespace(inference=InferenceParams(window_mm=float(window), max_window=window,
                                                          registration_weight=registration_weight),
                                preprocessing=PreprocessingParams(input_size=64),
                                config=PLAIN_NETWORK)
        super().__init__(model)
        self.absent_from = absent_from
        self.network_calls: list[tuple[int, list[int]]] = []

    def _predict_network(self, volume, guide_index, guide_mask, query_indices, priors=None):
        self.network_calls.append((int(guide_index), [int(q) for q in query_indices]))
        prob = np.repeat(np.asarray(guide_mask, np.float32)[None], len(query_indices), axis=0)
        presence = np.ones(len(query_indices), np.float32)
        if self.absent_from is not None:
            presence[[q >= self.absent_from for q in query_indices]] = 0.0
        return SlicePrediction(prob, presence)


def test_weight_zero_is_the_network_alone():
    img, truth = sliding_square()
    p = StaleNetwork(0.0)
    p.begin(img, 0, truth[0])
    assert p.registration is None  # no registration is even set up
    out = p.predict(img, 0, truth[0], [1, 2, 3])
    assert np.array_equal(out.prob, np.repeat(truth[0][None].astype(np.float32), 3, axis=0))


def _expected_chain(p: PAMPredictor, img, guide, guide_mask, queries, w):
    """The fusion by hand: registrations on the crop around the guide mask (the track
    baseline's padding), each query registered to the previous slice, the fused mask carried."""
    crop = _crop_around(guide_mask, 0.5, 8)
    low, high = p.window.low, p.window.high

    def prepared(k):
        return np.clip((ndimage.gaussian_filter(img[k][crop], 1.0) - low) / (high - low), 0, 1).astype(np.float32)

    inf = p.model.inference
    reg = TrackPredictor(max_side=inf.registration_max_side, iterations=inf.registration_iterations,
                         coarse_iterations=inf.registration_coarse_iterations)
    carried, out, prev = guide_mask[crop], [], guide
    for q in queries:
        fused = (1 - w) * guide_mask.astype(np.float32)  # the stale network's share
        fused[crop] += w * reg.warp(reg.register(prepared(q), prepared(prev)), carried)
        out.append(fused)
        carried, prev = fused[crop] >= 0.5, q
    return np.stack(out)


def test_weight_one_carries_the_mask_slice_by_slice():
    """w = 1: each query is the previous query's (fused) mask warped onto it by demons
    registration of the two slices: a chain from the guide, not the guide warped 4 slices at once."""
    img, truth = sliding_square()
    p = StaleNetwork(1.0)
    p.begin(img, 0, truth[0])
    out = p.predict(img, 0, truth[0], [1, 2, 3, 4])
    np.testing.assert_allclose(out.prob, _expected_chain(p, img, 0, truth[0], [1, 2, 3, 4], 1.0), atol=1e-5)
    # ... and that chain follows the square 8 px away from the guide (measured 0.741 with the
    # format's 10 iterations; a uniform square gives demons little to pull on inside it).
    assert dice(out.prob[3] >= 0.5, truth[4]) > 0.7
    assert dice(truth[0], truth[4]) < 0.56  # what the stale network alone would score (0.556)


def test_registrations_run_beside_the_network_and_give_the_same_result_in_any_number_of_threads():
    img, truth = sliding_square()
    got = {}
    for workers in (1, 2, 4):
        p = StaleNetwork(0.6)
        p.registration_workers = workers
        p.begin(img, 0, truth[0])
        got[workers] = p.predict(img, 0, truth[0], [1, 2, 3, 4]).prob
    np.testing.assert_array_equal(got[1], got[2])
    np.testing.assert_array_equal(got[1], got[4])


def test_a_run_limited_to_one_thread_registers_in_the_calling_thread_and_gives_the_same_result():
    """--threads 1 ran the network in one torch thread and the registrations in two more threads
    beside it. Limited to one thread (torch_threads(1)), the registrations run in turn in the
    calling thread and SimpleITK's own filters use one thread; both counts are restored after."""
    import threading

    import SimpleITK as sitk
    import torch

    from PAMSegmentLib.propagate import torch_threads

    img, truth = sliding_square()
    before = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    got, where = {}, {}
    for threads in (1, 2):
        p = StaleNetwork(0.6)
        seen = []
        with torch_threads(threads):
            p.begin(img, 0, truth[0])
            original = p.registration.register_pyramids

            def register(*a, _seen=seen, _original=original):
                _seen.append((threading.get_ident(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()))
                return _original(*a)

            p.registration.register_pyramids = register
            got[threads] = p.predict(img, 0, truth[0], [1, 2, 3, 4]).prob
        where[threads] = seen
    assert [t for t, _ in where[1]] == [threading.get_ident()] * 4
    assert {n for _, n in where[1]} == {1}
    assert threading.get_ident() not in {t for t, _ in where[2]} and {n for _, n in where[2]} == {2}
    np.testing.assert_array_equal(got[1], got[2])
    assert (torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()) == before


def test_each_slice_is_put_on_the_registration_grids_once_per_window():
    """A chained window of 4 queries registers 4 pairs over 5 slices: the guide and each query's
    grid images are made once (5 pyramids, not 8), and the result is the one ``register`` gives."""
    img, truth = sliding_square()
    p = StaleNetwork(1.0)
    p.model.inference = InferenceParams(window_mm=4.0, max_window=4, registration_weight=1.0,
                                        registration_coarse_iterations=5)
    p.begin(img, 0, truth[0])
    made = []
    original = p.registration.pyramid
    p.registration.pyramid = lambda arr: made.append(arr.shape) or original(arr)
    out = p.predict(img, 0, truth[0], [1, 2, 3, 4])
    assert len(made) == 5
    p.registration.pyramid = original
    assert p.registration.coarse_iterations == 5
    np.testing.assert_array_equal(out.prob, _expected_chain(p, img, 0, truth[0], [1, 2, 3, 4], 1.0))


def test_a_window_split_into_batches_carries_on_from_its_last_fused_slice():
    """The engine splits a window into batches when --batch-size is below the window: the
    second batch continues the chain (slice 3 -> 4), it is not registered 3 slices from the guide."""
    img, truth = sliding_square()
    whole, split = StaleNetwork(0.6), StaleNetwork(0.6)
    for p in (whole, split):
        p.begin(img, 0, truth[0])
    a = whole.predict(img, 0, truth[0], [1, 2, 3, 4, 5, 6]).prob
    b = np.concatenate([split.predict(img, 0, truth[0], [1, 2, 3]).prob, split.predict(img, 0, truth[0], [4, 5, 6]).prob])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_fused_probability_is_the_weighted_mean():
    img, truth = sliding_square()
    w = 0.3
    p = StaleNetwork(w)
    p.begin(img, 0, truth[0])
    got = p.predict(img, 0, truth[0], [1, 2]).prob
    np.testing.assert_allclose(got, _expected_chain(p, img, 0, truth[0], [1, 2], w), atol=1e-5)
    # Outside the registered crop only the network's share is left: (1 - w) x its 0 or 1.
    assert set(np.unique(got[0][:, :2])) <= {0.0, np.float32(1 - w)}


def test_fusion_follows_motion_the_network_misses_through_the_engine():
    img, truth = sliding_square(n=16)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[8] = truth[8]
    scores = {}
    for w in (0.0, 0.6, 1.0):
        res = propagate(img, prompt, (1.0, 1.0, 1.0), StaleNetwork(w), axis=0, early_stop=True)
        scores[w] = dice(res.mask > 0, truth)
        assert np.array_equal(res.mask[8] > 0, truth[8])  # the drawn slice is kept exactly
    # The stale copy drifts off the square (slices 0 and 15 are 14-16 px away from slice 8);
    # the more weight on the registration, the closer the walk follows it. Measured (seed 0, the
    # format's 64 px / 10-iteration registration): 0.556, 0.654, 0.730. At w = 0.6 the warped
    # mask's soft leading edge (linear interpolation) is pulled below 0.5 by the stale network's
    # 0 there, so it lags behind the registration alone.
    assert scores[0.0] < 0.6
    assert scores[0.6] > scores[0.0] + 0.06
    assert scores[1.0] > scores[0.6] + 0.04 and scores[1.0] > 0.68


def test_the_network_decides_where_the_object_ends():
    """The tracker's own drift gate is off: with w = 1 the walk still ends where the network
    says the object is absent, although the warped mask would go on."""
    img, truth = sliding_square(n=16)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[4] = truth[4]
    res = propagate(img, prompt, (1.0, 1.0, 1.0), StaleNetwork(1.0, absent_from=11), axis=0)
    assert res.slice_range[1] == (0, 10)


def test_queries_not_walked_from_the_guide_are_warped_directly():
    """A back-prediction (the forward-backward check asks for the guide from a later slice) is
    not a chain: the guide's mask is warped straight onto the query."""
    img, truth = sliding_square()
    p = StaleNetwork(1.0)
    p.begin(img, 0, truth[0])
    out = p.predict(img, 3, truth[3], [1])
    np.testing.assert_allclose(out.prob, _expected_chain(p, img, 3, truth[3], [1], 1.0), atol=1e-5)


def test_queries_that_skip_slices_are_each_warped_from_the_guide():
    """Queries 2 and 4 from guide 0 are no walk (steps of 2): each is registered to the guide and
    gets the guide's mask warped straight onto it; slice 4 is not reached through slice 2."""
    img, truth = sliding_square()
    p = StaleNetwork(1.0)
    p.begin(img, 0, truth[0])
    out = p.predict(img, 0, truth[0], [2, 4])
    direct = np.concatenate([_expected_chain(p, img, 0, truth[0], [q], 1.0) for q in (2, 4)])
    np.testing.assert_allclose(out.prob, direct, atol=1e-5)


def test_weight_out_of_range_is_refused_and_memory_bank_stays_network_only():
    model = SimpleNamespace(inference=InferenceParams(registration_weight=0.5),
                            preprocessing=PreprocessingParams(input_size=64),
                            config=PLAIN_NETWORK)
    with pytest.raises(ValueError, match=r"registration_weight must be within \[0, 1\], got 1.5"):
        PAMPredictor(model, registration_weight=1.5)
    assert PAMPredictor(model).registration_weight == 0.5
    assert MemoryPAMPredictor(model).registration_weight == 0.0


def test_registration_settings_come_from_the_checkpoint():
    img, truth = sliding_square()
    p = StaleNetwork(0.5)
    p.begin(img, 0, truth[0])
    assert (p.registration.max_side, p.registration.iterations) == (64, 10)  # the format's defaults
    p.model.inference = InferenceParams(registration_weight=0.5, registration_max_side=32, registration_iterations=5)
    p.begin(img, 0, truth[0])
    assert (p.registration.max_side, p.registration.iterations) == (32, 5)
    assert p.registration.coarse_iterations == 0  # one level unless the checkpoint asks for two
    p.registration_options = {"iterations": 7}  # scripts/validate.py's override
    p.begin(img, 0, truth[0])
    assert (p.registration.max_side, p.registration.iterations) == (32, 7)
    p.model.inference = InferenceParams(registration_weight=0.5, registration_coarse_iterations=10)
    p.registration_options = {}
    p.begin(img, 0, truth[0])
    assert (p.registration.max_side, p.registration.iterations, p.registration.coarse_iterations) == (64, 10, 10)


@pytest.mark.parametrize("field,value", [("registration_coarse_iterations", -1), ("registration_iterations", 0),
                                         ("registration_max_side", 4)])
def test_registration_settings_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        InferenceParams(**{field: value})
    assert InferenceParams.from_dict(InferenceParams(registration_coarse_iterations=10).to_dict()) \
        .registration_coarse_iterations == 10


def assert_round_trips_and_old_headers_mean(field: str, value, default):
    """An inference parameter survives to_dict/from_dict, and a header written before it existed
    reads as ``default``."""
    params = InferenceParams(**{field: value})
    assert getattr(InferenceParams.from_dict(params.to_dict()), field) == value
    old = params.to_dict()
    del old[field]  # a checkpoint written before the parameter existed
    assert getattr(InferenceParams.from_dict(old), field) == default


def test_registration_weight_round_trips_and_old_headers_mean_zero():
    assert_round_trips_and_old_headers_mean("registration_weight", 0.6, 0.0)


def test_agreement_is_the_dice_of_the_network_and_warped_masks():
    """``SlicePrediction.agreement``: Dice between the network's own mask and the registration's
    warped mask, per query. The stale network keeps the guide's square while the warped mask
    follows the moving one, so the agreement falls with the distance from the guide."""
    img, truth = sliding_square()
    p = StaleNetwork(1.0)
    p.begin(img, 0, truth[0])
    out = p.predict(img, 0, truth[0], [1, 2, 3, 4])
    warped = _expected_chain(p, img, 0, truth[0], [1, 2, 3, 4], 1.0) >= 0.5  # w = 1: fused = warped
    expected = [dice(truth[0], warped[n]) for n in range(4)]
    np.testing.assert_allclose(out.agreement, expected, atol=1e-6)
    assert list(np.argsort(-out.agreement)) == [0, 1, 2, 3]  # falls with distance
    assert out.agreement[0] > 0.9 and out.agreement[3] < 0.87  # measured 0.948 and 0.845
    # Without registration (w = 0) nothing is computed.
    p0 = StaleNetwork(0.0)
    p0.begin(img, 0, truth[0])
    assert p0.predict(img, 0, truth[0], [1, 2]).agreement is None


def test_keyframe_agreement_setting_is_validated_and_reaches_the_predictor():
    with pytest.raises(ValueError, match=r"keyframe_outward_min_agreement must be within \[0, 1\], got 1.2"):
        InferenceParams(keyframe_outward_min_agreement=1.2)
    params = InferenceParams(registration_weight=0.5, keyframe_outward_min_agreement=0.4)
    assert InferenceParams.from_dict(params.to_dict()).keyframe_outward_min_agreement == 0.4
    old = params.to_dict()
    del old["keyframe_outward_min_agreement"]  # a checkpoint written before the parameter existed: off
    assert InferenceParams.from_dict(old).keyframe_outward_min_agreement == 0.0
    model = SimpleNamespace(inference=params, preprocessing=PreprocessingParams(input_size=64),
                            config=PLAIN_NETWORK)
    assert PAMPredictor(model).keyframe_outward_min_agreement == 0.4


class PriorEcho(StaleNetwork):
    """A prior-channel network double (``query_prior`` "carried") that returns its prior as its
    probability, and records the priors it was given."""

    def __init__(self, registration_weight: float, window: int = 4):
        super().__init__(registration_weight, window)
        self.model.config = SimpleNamespace(mask_prior=True, presence_head=True)
        self.model.inference = InferenceParams(window_mm=float(window), max_window=window,
                                               registration_weight=registration_weight, query_prior="carried")
        self.query_prior = "carried"
        self.priors: list[np.ndarray] = []

    def _predict_network(self, volume, guide_index, guide_mask, query_indices, priors=None):
        assert priors is not None and len(priors) == len(query_indices) == 1  # one slice at a time
        self.network_calls.append((int(guide_index), [int(q) for q in query_indices]))
        self.priors.append(np.asarray(priors[0]).copy())
        return SlicePrediction(np.asarray(priors, np.float32), np.ones(1, np.float32))


def test_a_prior_network_sees_the_previous_slice_mask_carried_onto_each_query():
    """With the carried prior, each query's prior is the previous slice's final mask warped onto
    it. A network that trusts its prior completely, at w = 0, therefore gives the registration's
    own chain (the w = 1 chain of the fusion above), although no warp enters its output directly."""
    img, truth = sliding_square()
    p = PriorEcho(0.0)
    p.begin(img, 0, truth[0])
    assert p.registration is not None  # the registration runs for the prior even at w = 0
    out = p.predict(img, 0, truth[0], [1, 2, 3, 4])
    expected = _expected_chain(p, img, 0, truth[0], [1, 2, 3, 4], 1.0) >= 0.5
    np.testing.assert_array_equal(out.prob >= 0.5, expected)
    np.testing.assert_array_equal(np.stack(p.priors) > 0, expected)
    # The priors moved with the square (8 px by slice 4), unlike the guide's mask.
    assert dice(p.priors[3] > 0, truth[4]) > 0.7 > dice(truth[0], truth[4])
    assert p.network_calls == [(0, [1]), (0, [2]), (0, [3]), (0, [4])]


def test_a_prior_network_output_is_fused_with_the_warp_at_the_registration_weight():
    """Slice 1: the prior is the guide's mask warped onto it (binarised); at w = 0.5 the output is
    the mean of the network's output (here that prior) and the soft warp itself."""
    img, truth = sliding_square()
    p = PriorEcho(0.5)
    p.begin(img, 0, truth[0])
    out = p.predict(img, 0, truth[0], [1])
    warped = _expected_chain(p, img, 0, truth[0], [1], 1.0)[0]  # the soft warp, 0 outside the crop
    np.testing.assert_allclose(out.prob[0], 0.5 * (warped >= 0.5) + 0.5 * warped, atol=1e-5)
    assert 0.0 < warped[(warped > 0) & (warped < 1)].size  # a soft edge exists, so the mean is tested


def test_the_guide_prior_needs_no_registration_and_unknown_priors_are_refused():
    p = PriorEcho(0.0)
    p.query_prior = "guide"
    img, truth = sliding_square()
    p.begin(img, 0, truth[0])
    assert p.registration is None
    with pytest.raises(ValueError, match="query_prior must be one of guide, carried, got 'warp'"):
        InferenceParams(query_prior="warp")
    with pytest.raises(ValueError, match="query_prior must be one of guide, carried"):
        PAMPredictor(p.model, query_prior="warp")


def test_a_real_prior_network_runs_through_the_engine_with_carried_priors():
    """Shapes and plumbing with the actual network (random weights): every slice is predicted one
    at a time with its carried prior, and the drawn slice is kept."""
    import torch

    from PAMSegmentLib.checkpoints import PAMModel
    from PAMSegmentLib.network import build_network

    torch.manual_seed(0)
    model = PAMModel.from_network(build_network("small-prior"),
                                  inference=InferenceParams(window_mm=3.0, max_window=3, registration_weight=0.5,
                                                            query_prior="carried", presence_threshold=0.0))
    img, truth = sliding_square(n=8)
    prompt = np.zeros(truth.shape, np.uint8)
    prompt[4] = truth[4]
    seen = []
    predictor = PAMPredictor(model)
    original = model.network.proposing_stage.decode_queries
    model.network.proposing_stage.decode_queries = lambda q, k, v, g=None, prior=None: (
        seen.append(None if prior is None else tuple(prior.shape)) or original(q, k, v, g, prior))
    res = propagate(img, prompt, (1.0, 1.0, 1.0), predictor, axis=0, early_stop=False)
    assert np.array_equal(res.mask[4] > 0, truth[4])
    assert seen and all(shape == (1, 1, 1, 128, 128) for shape in seen)


@pytest.mark.parametrize("override, expected", [(None, 1.5), (2.0, 2.0), (1.25, 1.25)])
def test_network_crop_scale_is_the_checkpoints_unless_overridden(monkeypatch, override, expected):
    """``PAMPredictor.crop_scale`` (validate.py's ``pam+cropS``) replaces the checkpoint's crop scale
    for the network's crop only; None keeps the checkpoint's (1.5 here, its default)."""
    import PAMSegmentLib.pam_predictor as pp

    seen = []

    class Stop(Exception):
        pass

    def record(mask, params):
        seen.append(params.crop_scale)
        raise Stop

    monkeypatch.setattr(pp, "crop_box_for_mask", record)
    model = SimpleNamespace(inference=InferenceParams(), preprocessing=PreprocessingParams(input_size=64),
                            config=PLAIN_NETWORK, device="cpu", network=None)
    p = PAMPredictor(model)
    p.crop_scale = override
    img, truth = sliding_square()
    with pytest.raises(Stop):
        p._predict_network(img, 0, truth[0], [1])
    assert seen == [expected] and model.preprocessing.crop_scale == 1.5  # the checkpoint's own is untouched


def test_network_window_from_the_guide_is_an_option(monkeypatch):
    """``PAMPredictor.network_window`` (validate.py's ``pam+wguide``): "prompt" windows every slice
    the network sees with the drawn slice's window; "guide" with a window computed from that
    window's guide slice and mask (here twice as bright: twice the window)."""
    import PAMSegmentLib.pam_predictor as pp
    from PAMSegmentLib.preprocess import intensity_window

    seen = []

    class Stop(Exception):
        pass

    def record(slices, box, size, window=None, is_mask=False, antialias=True):
        if is_mask:
            return pp.torch.zeros((len(slices), 1, size, size))
        seen.append((round(window.low, 3), round(window.high, 3)))
        if len(seen) == 2:  # the guide's, then the queries'
            raise Stop
        return pp.torch.zeros((len(slices), 1, size, size))

    stage = SimpleNamespace(encode_guide=lambda img, mask: (None, None))
    model = SimpleNamespace(inference=InferenceParams(), preprocessing=PreprocessingParams(input_size=64),
                            config=PLAIN_NETWORK, device="cpu", network=SimpleNamespace(proposing_stage=stage))
    img, truth = sliding_square()
    img[5:] *= 2.0  # the object and its surroundings brighten from slice 5 on
    prompt_window = intensity_window(img[0], truth[0], model.preprocessing)
    guide_window = intensity_window(img[6], truth[6], model.preprocessing)
    expected = {"prompt": (round(prompt_window.low, 3), round(prompt_window.high, 3)),
                "guide": (round(guide_window.low, 3), round(guide_window.high, 3))}
    assert expected["guide"][1] > 1.5 * expected["prompt"][1]
    monkeypatch.setattr(pp, "crop_slices", record)
    for mode in ("prompt", "guide"):
        p = PAMPredictor(model, registration_weight=0.0)
        p.network_window = mode
        p.begin(img, 0, truth[0])
        seen.clear()
        with pytest.raises(Stop):
            p._predict_network(img, 6, truth[6], [7, 8])
        assert seen == [expected[mode]] * 2, mode


def test_network_window_from_the_keyframe_each_walk_started_from(monkeypatch):
    """``network_window = "origin"`` (validate.py's ``pam+kfwin``): a walk from another drawn slice
    (a guide no walk predicted) uses that slice's window, and so do the guides its walk predicts;
    "prompt" uses the first drawn slice's for every walk."""
    import PAMSegmentLib.pam_predictor as pp
    from PAMSegmentLib.preprocess import intensity_window

    seen = []

    def record(slices, box, size, window=None, is_mask=False, antialias=True):
        if not is_mask:
            seen.append((round(window.low, 3), round(window.high, 3)))
        return pp.torch.zeros((len(slices), 1, size, size))

    stage = SimpleNamespace(encode_guide=lambda img, mask: (None, None),
                            decode_queries=lambda *a: SimpleNamespace(logits=[pp.torch.zeros((1, 2, 1, 64, 64))],
                                                                      presence=None))
    model = SimpleNamespace(inference=InferenceParams(), preprocessing=PreprocessingParams(input_size=64),
                            config=PLAIN_NETWORK, device="cpu", network=SimpleNamespace(proposing_stage=stage))
    img, truth = sliding_square()
    img[5:] *= 2.0
    first = intensity_window(img[0], truth[0], model.preprocessing)
    other = intensity_window(img[8], truth[8], model.preprocessing)
    w0, w8 = (round(first.low, 3), round(first.high, 3)), (round(other.low, 3), round(other.high, 3))
    assert w8 != w0
    monkeypatch.setattr(pp, "crop_slices", record)
    monkeypatch.setattr(pp, "fuse_scales", lambda logits, size, **kw: pp.torch.zeros((2, size, size)))
    for mode, expected in (("prompt", [w0] * 6), ("origin", [w0, w0, w8, w8, w8, w8])):  # guide, queries each
        p = PAMPredictor(model, registration_weight=0.0)
        p.network_window = mode
        p.begin(img, 0, truth[0])
        seen.clear()
        p._predict_network(img, 0, truth[0], [1, 2])  # the walk from the first drawn slice
        p._predict_network(img, 8, truth[8], [9, 10])  # a walk from a second drawn slice, 8
        p._predict_network(img, 10, truth[10], [11])  # ... going on from its predicted slice 10
        assert seen == expected, mode
