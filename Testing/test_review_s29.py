"""Fixes from session 29's work (each test failed on the code before its fix)."""
from __future__ import annotations

import numpy as np
from test_engine import ISO, image_for, prompt_from, tube

from PAMSegmentLib.baselines import CopyPredictor
from PAMSegmentLib.propagate import predictor_settings, propagate


class _StricterCopy(CopyPredictor):
    """The copy baseline with another class-level default, as a subclass or a new release sets it."""

    presence_threshold = 0.999


def test_settings_name_inherited_class_defaults():
    """Carried from s28: predictor_settings named the instance's attributes and three chosen class
    options, so a class-level default (PAM's gate_k, the engine's thresholds a subclass changes)
    was in neither the evaluation's settings digest nor an update's reuse check."""
    from PAMSegmentLib.pam_predictor import PAMPredictor

    assert "presence_threshold=0.5" in predictor_settings(CopyPredictor())
    assert "presence_threshold=0.999" in predictor_settings(_StricterCopy())
    assert "gate_k=2.0" in {s for s in predictor_settings(PAMPredictor.__new__(PAMPredictor))}


def test_an_update_with_another_class_default_recomputes_but_an_older_record_is_reused():
    truth = tube(3, 25)
    image = image_for(truth) + 5 * truth
    first = propagate(image, prompt_from(truth, 12), ISO, CopyPredictor())
    fresh = propagate(image, prompt_from(truth, [12, 20]), ISO, _StricterCopy())
    update = propagate(image, prompt_from(truth, [12, 20]), ISO, _StricterCopy(), previous=first)
    np.testing.assert_array_equal(update.mask, fresh.mask)
    assert update.n_predicted == fresh.n_predicted > 0  # nothing of the first run's walks kept
    # A record written before class defaults were recorded names only the instance's settings: its
    # walks are still reused by the same predictor (an upgrade alone does not recompute everything).
    own = set(f"{k}=" for k in vars(CopyPredictor()))
    old_state = {lab: (key[0], key[1], tuple(s for s in key[2] if any(s.startswith(o) for o in own)))
                 for lab, key in first.begin_state.items()}
    assert all(len(v[2]) < len(first.begin_state[lab][2]) for lab, v in old_state.items())
    first.begin_state = old_state
    again = propagate(image, prompt_from(truth, [12, 20]), ISO, CopyPredictor(), previous=first)
    scratch = propagate(image, prompt_from(truth, [12, 20]), ISO, CopyPredictor())
    assert 0 < again.n_predicted < scratch.n_predicted
    np.testing.assert_array_equal(again.mask, scratch.mask)
