"""Training machinery (tiny runs only: no real training in CI) and the shipped weights."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from PAMSegmentLib.checkpoints import load_checkpoint_file, weights_sha256
from PAMSegmentLib.network import PAMConfig, PAMNetwork
from PAMSegmentLib.preprocess import PreprocessingParams
from PAMSegmentLib.training.samples import Case, SampleConfig, make_batch
from PAMSegmentLib.training.synthetic import generate_volume
from PAMSegmentLib.training.trainer import TrainConfig, _forward, boundary_band, pam_loss, train

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "Resources" / "Models" / "pam_small.pt"
CARD = ROOT / "Resources" / "Models" / "pam_small.json"

TINY = PAMConfig(name="tiny", input_size=32, n_stages=3, base_features=8, max_features=16,
                 n_attention_stages=2, presence_head=True)


def _cases(n=2, seed=0):
    cases = []
    for i in range(n):
        v = generate_volume(np.random.default_rng([seed, i]), shape=(24, 64, 64))
        cases.append(Case(f"synth_{i}", v.image, v.labels, tuple(v.spacing), sorted(int(x) for x in np.unique(v.labels) if x)))
    return cases


def _fixed_batch_loss(net, batch):
    with torch.no_grad():
        out = _forward(net, batch)
        loss, _ = pam_loss(out.logits, out.presence, batch.query_masks.flatten(0, 1), batch.present.flatten(), 0.5)
    return float(loss)


def test_boundary_band_marks_pixels_near_the_edge_on_both_sides():
    t = torch.zeros(1, 12, 12)
    t[0, 4:8, 4:8] = 1  # a 4 x 4 square
    band = boundary_band(t, 1)[0]
    # 1 px band: the square's outer ring of 4 x 4 - 2 x 2 = 12 px plus the 6 x 6 - 4 x 4 = 20 px around it.
    assert int(band.sum()) == 32
    assert not band[5, 5] and not band[6, 6]  # the square's 2 x 2 core
    assert band[4, 4] and band[3, 3] and not band[2, 2]
    assert not boundary_band(torch.zeros(1, 5, 5), 2).any()  # no edge, no band


def test_boundary_weight_raises_the_loss_of_edge_errors_only():
    t = torch.zeros(1, 12, 12)
    t[0, 4:8, 4:8] = 1

    def loss_with_error_at(r, c, weight):
        logits = torch.stack([1 - t, t], dim=1) * 8.0 - 4.0  # confident and right everywhere ...
        logits[0, :, r, c] = logits[0, :, r, c].flip(0)  # ... but one pixel
        _, parts = pam_loss([logits], None, t, torch.ones(1), 0.5, weight, 1)
        return parts["ce"]

    # weight 0 is the plain mean: an edge error and a far error cost the same.
    assert loss_with_error_at(4, 4, 0.0) == pytest.approx(loss_with_error_at(0, 0, 0.0))
    # weight 3: the edge pixel counts 4 times (32 band px of 144 -> weighted mean over 144 + 3 * 32).
    edge, far = loss_with_error_at(4, 4, 3.0), loss_with_error_at(0, 0, 3.0)
    assert edge / far == pytest.approx(4.0, rel=0.02)
    plain_edge = loss_with_error_at(4, 4, 0.0)
    assert edge == pytest.approx(plain_edge * 4 * 144 / (144 + 3 * 32), rel=0.02)


@pytest.mark.parametrize("flag, value, message", [("--boundary-band", "0", "--boundary-band must be at least 1 px"),
                                                   ("--boundary-weight", "-1",
                                                    "--boundary-weight: expected a number of at least 0"),
                                                   ("--p-rollout", "1.5", "--p-rollout is a probability")])
def test_train_script_rejects_a_bad_setting_before_loading_data(tmp_path, flag, value, message):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--cache", str(tmp_path), flag, value],
                       capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_samples_have_expected_shapes_and_targets():
    cases = _cases()
    pre = PreprocessingParams(input_size=32)
    b = make_batch(cases, np.array([0.5, 0.5]), np.random.default_rng(1), SampleConfig(preprocessing=pre), 3, rollout=True)
    assert b.guide_image.shape == (3, 1, 32, 32) and b.guide_mask.shape == (3, 1, 32, 32)
    assert b.query_images.shape == (3, 4, 1, 32, 32) and b.query_masks.shape == (3, 4, 32, 32)
    assert b.relay_image.shape == (3, 1, 32, 32)
    assert set(torch.unique(b.guide_mask).tolist()) <= {0.0, 1.0} and b.guide_mask.sum() > 0
    # present is exactly "the target has a voxel"
    assert torch.equal(b.present, (b.query_masks.flatten(2).amax(2) > 0).float())


def test_tiny_training_run_lowers_the_loss_and_writes_a_loadable_checkpoint(tmp_path):
    torch.manual_seed(0)
    cases = _cases()
    pre = PreprocessingParams(input_size=32)
    sample = SampleConfig(preprocessing=pre, n_queries=3)
    held_out = make_batch(cases, np.array([0.5, 0.5]), np.random.default_rng(123), sample, 4, rollout=False)
    before = _fixed_batch_loss(PAMNetwork(TINY).train(), held_out)  # same init as train() (seed 0)

    cfg = TrainConfig(network=TINY, preprocessing=pre, sample=sample, minutes=5, max_iterations=60, n_guides=4,
                      lr=3e-3, seed=0, threads=1, workers=0, rollout_after=0.5, provenance={"test": True})
    out, log = tmp_path / "tiny.pt", tmp_path / "log.csv"
    summary = train(cases, cfg, out, log)
    assert summary["iterations"] == 60
    model = load_checkpoint_file(out)
    assert model.config == TINY and model.provenance["test"] is True and model.provenance["iterations"] == 60
    after = _fixed_batch_loss(model.network.train(), held_out)
    assert after < 0.85 * before, (before, after)
    print(f"fixed-batch loss {before:.3f} -> {after:.3f}")
    rows = log.read_text().splitlines()
    assert rows[0].startswith("iteration,seconds,lr,loss") and len(rows) >= 6
    assert rows[-1].split(",")[0] == "60" and not (tmp_path / "log.partial.csv").exists()  # the last iteration too


def test_a_run_with_an_iteration_count_is_reproducible(tmp_path):
    """--max-iterations: the LR schedule and the start of rollouts follow the iteration count, not
    the clock, so a seed gives the same weights again, whether batches are sampled in the main
    process or in a worker; another seed gives other weights."""
    cases = _cases()
    pre = PreprocessingParams(input_size=32)

    def run(name, seed, workers):
        # rollout_after 0.5 of 8 iterations: rollouts (p 0.35) may start from iteration 4 on
        cfg = TrainConfig(network=TINY, preprocessing=pre, sample=SampleConfig(preprocessing=pre, n_queries=2),
                          minutes=5, max_iterations=8, n_guides=2, lr=3e-3, seed=seed, threads=1, workers=workers,
                          rollout_after=0.5)
        train(cases, cfg, tmp_path / f"{name}.pt", tmp_path / f"{name}.csv")
        return load_checkpoint_file(tmp_path / f"{name}.pt")

    first, again, in_worker, other = run("a", 0, 0), run("b", 0, 0), run("c", 0, 1), run("d", 1, 0)
    assert first.sha256 == again.sha256 == in_worker.sha256
    assert other.sha256 != first.sha256
    assert first.provenance["schedule"] == "iterations" and first.provenance["stopped_by"] == "iterations"
    assert first.provenance["iterations"] == 8


def test_sampling_in_the_main_process_keeps_the_training_threads(tmp_path):
    """--workers 0 samples batches in the main process; that must not drop the network's
    --threads to the one thread a sampling worker gets."""
    cases = _cases(1)
    pre = PreprocessingParams(input_size=32)
    cfg = TrainConfig(network=TINY, preprocessing=pre, sample=SampleConfig(preprocessing=pre, n_queries=2),
                      minutes=5, max_iterations=2, n_guides=2, seed=0, threads=2, workers=0)
    before = torch.get_num_threads()
    try:
        train(cases, cfg, tmp_path / "t.pt", tmp_path / "t.csv")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_schedule_progress_follows_iterations_when_counted_else_time():
    from PAMSegmentLib.training.trainer import _progress

    pre = PreprocessingParams(input_size=32)
    counted = TrainConfig(network=TINY, preprocessing=pre, sample=SampleConfig(preprocessing=pre), max_iterations=8)
    timed = TrainConfig(network=TINY, preprocessing=pre, sample=SampleConfig(preprocessing=pre))
    assert _progress(counted, 2, elapsed=50.0, total_seconds=100.0) == 0.25  # 2 of 8, whatever the clock
    assert _progress(timed, 2, elapsed=50.0, total_seconds=100.0) == 0.5  # 50 s of 100


def test_continued_training_records_the_earlier_stage(tmp_path):
    """--init-from: the new checkpoint starts from the old weights and carries the old provenance,
    so the model card can list every stage's command and compute."""
    cases = _cases(1)
    pre = PreprocessingParams(input_size=32)
    sample = SampleConfig(preprocessing=pre, n_queries=2)
    first = tmp_path / "stage1.pt"
    train(cases, TrainConfig(network=TINY, preprocessing=pre, sample=sample, minutes=5, max_iterations=3, n_guides=2,
                             seed=0, threads=1, workers=0, provenance={"command": "stage one"}), first,
          tmp_path / "l1.csv")
    second = tmp_path / "stage2.pt"
    cfg = TrainConfig(network=TINY, preprocessing=pre, sample=sample, minutes=5, max_iterations=0, n_guides=2,
                      seed=1, threads=1, workers=0, init_from=str(first), provenance={"command": "stage two"})
    train(cases, cfg, second, tmp_path / "l2.csv")
    old, new = load_checkpoint_file(first), load_checkpoint_file(second)
    # the log ends with the last iteration (rows every 10 left out 1-9 at the end: the card counted fewer)
    assert [row.split(",")[0] for row in (tmp_path / "l1.csv").read_text().splitlines()] == ["iteration", "1", "3"]
    assert new.sha256 == old.sha256  # zero iterations: the weights are the first stage's
    chain = new.provenance["init_from"]
    assert chain["sha256"] == old.sha256 and chain["provenance"]["command"] == "stage one"
    assert chain["provenance"]["iterations"] == 3

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_model_card import check_logs, stage_case_notes, training_stages
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    stages = training_stages(new.provenance)
    assert [st["command"] for st in stages] == ["stage one", "stage two"]
    # The card's logs must be these stages' (a 20-iteration network got a card of the 8600-iteration run's log)
    check_logs([{"log": "l1.csv", "last_logged_iteration": 3}, {"log": "l2.csv", "last_logged_iteration": 0}], stages)
    with pytest.raises(SystemExit, match="1 --train-log given, but the checkpoint's provenance has 2 training stages"):
        check_logs([{"log": "l1.csv", "last_logged_iteration": 3}], stages)
    with pytest.raises(SystemExit, match="l9.csv ends at iteration 8600, but stage 1 of the checkpoint ran 3"):
        check_logs([{"log": "l9.csv", "last_logged_iteration": 8600},
                    {"log": "l2.csv", "last_logged_iteration": 0}], stages)
    assert stage_case_notes({"cases": ["a"], "init_from": {"provenance": {"cases": ["a", "b"]}}}, ["a"]) == [
        "stage 1 read 2 real ones, with b"]
    # A review: every card got the shipped weights' history (their stages 2-4, a lost runs/pam_small_r3.pt)
    from make_model_card import main as make_card

    assert make_card([str(second), "--out-json", str(tmp_path / "card.json"),
                      "--out-md", str(tmp_path / "card.md")]) == 0
    text = (tmp_path / "card.md").read_text()
    assert "pam_small_r3" not in text and "the git revision given is the commit its tree was at" in text
    assert f"min ({stages[0]['machine'] or 'machine not recorded'})" in text  # not "this project's machine"


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped weights in Resources/Models")
def test_shipped_checkpoint_matches_its_model_card():
    card = json.loads(CARD.read_text())
    payload = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert card["sha256_weights"] == payload["sha256"] == weights_sha256(payload["state_dict"])
    model = load_checkpoint_file(SHIPPED)
    assert card["network"] == model.config.to_dict() and model.config.presence_head
    # Every preprocessing and inference value (through_plane_mm was missing from the card)
    assert card["preprocessing"] == model.preprocessing.to_dict() and card["inference"] == model.inference.to_dict()
    assert SHIPPED.stat().st_size < 20e6  # "a few MB"


# The shipped weights reach a mean Dice of 0.929 on the demo (README, `pamsegment demo`); the threshold
# leaves a margin for thread-count and platform differences.
DEMO_THRESHOLD = 0.87


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped weights in Resources/Models")
def test_demo_command_reaches_the_dice_the_shipped_weights_meet(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "PAMSegmentLib", "demo", "--out", str(tmp_path), "--threads", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mean = float(re.search(r"mean Dice ([0-9.]+)", proc.stdout).group(1))
    assert mean > DEMO_THRESHOLD, proc.stdout
    assert (tmp_path / "demo_segmentation.nii.gz").exists() and (tmp_path / "demo.png").stat().st_size > 10_000


def test_stack_share_sets_the_layered_column_sampling_share(tmp_path):
    """train.py --stack-share: synth_stack_* volumes together get exactly that share of the
    samples, the other synthetic volumes the rest of the synthetic share; by default every
    synthetic volume weighs the same."""
    import json as _json
    import sys as _sys

    from PAMSegmentLib.training.data import write_case

    lab = np.zeros((6, 16, 16), np.int16)
    lab[1:5, 4:10, 4:10] = 1
    img = lab.astype(np.float32) * 100
    for name in ("ts_x", "synth_0000", "synth_0001", "synth_0002", "synth_stack_0000"):
        write_case(tmp_path / "cases" / f"{name}.npz", img, lab, (1, 1, 1), {1: "box"}, "CT", "test")
    split = tmp_path / "split.json"
    split.write_text(_json.dumps({"train": [{"case": "ts_x", "labels": [1]}]}))
    _sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train as train_script
    finally:
        _sys.path.remove(str(ROOT / "scripts"))
    share = train_script.SYNTHETIC_SHARE

    def weights(stack_share):
        cases = train_script.load_training_cases(tmp_path, split, None, stack_share)
        return {c.name: c.weight for c in cases}

    w = weights(0.3)
    assert w["synth_stack_0000"] == pytest.approx(0.3)
    assert w["synth_0001"] == pytest.approx((share - 0.3) / 3)
    assert w["ts_x"] == pytest.approx(1 - share) and sum(w.values()) == pytest.approx(1.0)
    default = weights(None)
    assert default["synth_stack_0000"] == pytest.approx(default["synth_0000"]) == pytest.approx(share / 4)
    with pytest.raises(SystemExit, match="stack-share"):
        weights(0.9)


def _disk(radius: float, centre=(32, 32), size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_carried_prior_moves_the_origin_part_of_the_way_to_the_target():
    """Concentric disks of radius 8 (origin) and 20 (target): the signed-distance morph with lag a
    is a disk of radius 20 - 12 a, so over many draws every prior lies between the two, and the
    radii spread over that range."""
    from PAMSegmentLib.training.samples import carried_prior

    origin, target = _disk(8), _disk(20)
    rng = np.random.default_rng(0)
    radii = []
    for _ in range(200):
        prior = carried_prior(origin, target, rng, p_unmoved=0.0, p_noise=0.0)
        assert np.all(prior <= target) and np.all(origin <= prior)
        radii.append(np.sqrt(prior.sum() / np.pi))
    assert min(radii) < 9.5 and max(radii) > 18.5 and 12 < np.median(radii) < 16
    # Unmoved: the origin's mask itself; and always so on a slice without the object.
    np.testing.assert_array_equal(carried_prior(origin, target, rng, p_unmoved=1.0, p_noise=0.0), origin)
    np.testing.assert_array_equal(carried_prior(origin, np.zeros_like(target), rng, 0.0, 0.0), origin)
    # Noise changes the mask by erosion, dilation or a shift of 1-3 px.
    noisy = [carried_prior(origin, origin, rng, 0.0, 1.0) for _ in range(20)]
    assert any(not np.array_equal(n, origin) for n in noisy)
    assert all(abs(int(n.sum()) - int(origin.sum())) < 200 for n in noisy)


def test_prior_samples_carry_one_prior_per_query_and_one_for_the_relay():
    cases = _cases()
    cfg = SampleConfig(preprocessing=PreprocessingParams(input_size=32), simulate_priors=True)
    for rollout in (False, True):
        b = make_batch(cases, np.array([0.5, 0.5]), np.random.default_rng(2), cfg, 3, rollout=rollout)
        assert b.query_priors.shape == (3, 4, 1, 32, 32)
        assert set(torch.unique(b.query_priors).tolist()) <= {0.0, 1.0}
        assert (b.relay_prior.shape == (3, 1, 32, 32)) if rollout else b.relay_prior is None
    off = make_batch(cases, np.array([0.5, 0.5]), np.random.default_rng(2), SampleConfig(preprocessing=cfg.preprocessing), 3,
                     rollout=True)
    assert off.query_priors is None and off.relay_prior is None


def test_a_prior_network_starts_from_the_same_network_without_the_channel(tmp_path):
    """``small`` weights start ``small-prior``: the new channel's weights are zero, so whatever the
    prior, the outputs equal the original network's; other networks are refused."""
    from dataclasses import replace

    from PAMSegmentLib.checkpoints import InferenceParams, save_checkpoint
    from PAMSegmentLib.training.trainer import initial_state

    torch.manual_seed(0)
    base = PAMNetwork(TINY).eval()
    path = tmp_path / "base.pt"
    save_checkpoint(path, base, PreprocessingParams(input_size=32), InferenceParams(), {})
    init = load_checkpoint_file(path)
    prior_net = PAMNetwork(replace(TINY, name="tiny-prior", mask_prior=True)).eval()
    initial_state(prior_net, init)
    g, m = torch.randn(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.5).float()
    q, prior = torch.randn(2, 3, 1, 32, 32), (torch.rand(2, 3, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        a, b = base(g, m, q), prior_net(g, m, q, prior)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.presence, b.presence, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="--init-from has network"):
        initial_state(PAMNetwork(replace(TINY, base_features=4, mask_prior=True)), init)
    with pytest.raises(ValueError, match="query_prior has shape"):
        prior_net(g, m, q, prior[:, :2])
    with pytest.raises(ValueError, match="network 'tiny' has no prior channel"):
        base(g, m, q, prior)


def _train_script():
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train as train_script
    finally:
        _sys.path.remove(str(ROOT / "scripts"))
    return train_script


def test_train_script_writes_runs_not_the_shipped_weights_by_default(tmp_path, monkeypatch, capsys):
    """`python scripts/train.py --cache cache --minutes 85` (the README's Development line) wrote
    Resources/Models/pam_small.pt, the weights every command loads by default."""
    from types import SimpleNamespace

    train_script = _train_script()
    written = []
    monkeypatch.setattr(train_script, "REPO", tmp_path)  # a repository of its own: runs/ is made in it
    monkeypatch.setattr(train_script, "inline_synthetic", lambda n, seed: [SimpleNamespace(name="synth_inline_0")])
    monkeypatch.setattr(train_script, "train", lambda cases, cfg, out, log: written.append(out) or {})
    run = ["--synthetic-inline", "1", "--log", str(tmp_path / "log.csv")]
    assert train_script.main(run) == 0
    assert written == [tmp_path / "runs" / "pam_small.pt"] and (tmp_path / "runs").is_dir()
    # runs/ a link to the shipped weights' folder: refused, not trained
    shipped = tmp_path / "Resources" / "Models" / "pam_small.pt"
    shipped.parent.mkdir(parents=True)
    shipped.write_bytes(b"shipped")
    (tmp_path / "runs").rmdir()
    (tmp_path / "runs").symlink_to(shipped.parent)
    with pytest.raises(SystemExit) as exit_:
        train_script.main(run)
    assert exit_.value.code == 2 and len(written) == 1
    assert (f"error: the default --out {tmp_path / 'runs' / 'pam_small.pt'} is the shipped weights {shipped} (through "
            "a link): training would replace them; give --out, naming them if that is what you want"
            ) in capsys.readouterr().err
    # named explicitly, the shipped weights are the user's choice (an existing file: with --overwrite)
    assert train_script.main([*run, "--out", str(shipped), "--overwrite"]) == 0
    assert written[-1] == shipped
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "* Training: `python scripts/train.py --cache cache --minutes 85 --out runs/pam_small.pt`" in readme


def test_the_readme_says_what_training_the_tests_run():
    """The README said "No training in CI", while this file's tests run train() loops (tiny
    networks, up to 60 iterations) and CI runs the whole suite."""
    import re

    source = Path(__file__).read_text()
    longest = max(int(n) for n in re.findall(r"max_iterations=(\d+)", source))
    assert longest == 60
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "No training in CI" not in readme
    assert f"No full training run in CI, only short training loops (up to {longest} iterations) on tiny networks." \
        in readme


# ---------------------------------------------------------------------------------------------
# scripts/train.py and train(): what a run may write, --init-from, argument checks (audit fixes)
# ---------------------------------------------------------------------------------------------

def _tiny_script(monkeypatch, train_fn=None):
    """train.py with a `tiny` preset and tiny inline volumes; ``train_fn`` replaces train()."""
    train_script = _train_script()
    monkeypatch.setitem(train_script.PRESETS, "tiny", TINY)
    monkeypatch.setattr(train_script, "inline_synthetic", lambda n, seed: _cases(n, seed))
    if train_fn is not None:
        monkeypatch.setattr(train_script, "train", train_fn)
    return train_script


def ctrl_c_at_forward(monkeypatch, n: int) -> None:
    """Training's n-th forward pass raises KeyboardInterrupt (Ctrl-C during iteration n)."""
    import PAMSegmentLib.training.trainer as trainer_module

    real_forward, calls = trainer_module._forward, []

    def forward(net, batch):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real_forward(net, batch)

    monkeypatch.setattr(trainer_module, "_forward", forward)


def _tiny_checkpoint(path, inference=None, preprocessing=None, provenance=None, config=TINY):
    from PAMSegmentLib.checkpoints import InferenceParams, save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(path, PAMNetwork(config), preprocessing or PreprocessingParams(input_size=config.input_size),
                    inference or InferenceParams(), provenance or {})
    return path


def test_continued_training_keeps_the_inference_parameters_and_preprocessing(tmp_path, capsys):
    """--init-from gave the new checkpoint the format's default inference parameters
    (registration_weight 0, no drift test): continuing the shipped weights made a checkpoint that
    ran as the network alone. Now it keeps the init checkpoint's, and its preprocessing."""
    from PAMSegmentLib.checkpoints import InferenceParams

    tuned = InferenceParams(registration_weight=0.5, intensity_gate=True, intensity_gate_reference="guide",
                            max_window=12, registration_max_side=128, keyframe_outward_min_agreement=0.4)
    own_pre = PreprocessingParams(input_size=32, window_margin=0.1, crop_scale=1.6)
    init = _tiny_checkpoint(tmp_path / "init.pt", tuned, own_pre,
                            {"inference_changes": [{"set": {"registration_weight": 0.5}, "reason": "validated"}]})
    pre = PreprocessingParams(input_size=32)
    cfg = TrainConfig(network=TINY, preprocessing=pre, sample=SampleConfig(preprocessing=pre, n_queries=2),
                      minutes=5, max_iterations=2, n_guides=2, seed=0, threads=1, workers=0, init_from=str(init))
    train(_cases(1), cfg, tmp_path / "next.pt", tmp_path / "next.csv")
    new = load_checkpoint_file(tmp_path / "next.pt")
    assert new.inference == tuned and new.inference.registration_weight == 0.5
    assert new.preprocessing == own_pre
    assert new.provenance["inherited_from_init"] == ["inference", "preprocessing"]
    assert new.provenance["inference_changes"][0]["set"] == {"registration_weight": 0.5}
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("--init-from")]
    assert len(line) == 1, line
    assert "keeps its inference parameters (beyond a fresh run's: " in line[0] and "registration_weight 0.5" in line[0]
    assert "window_margin 0.1" in line[0] and "crop_scale 1.6" in line[0]
    assert line[0].endswith("the optimizer state and the learning-rate schedule start fresh")
    # A network that grows a prior channel from it starts with a fresh run's parameters (and says so).
    from dataclasses import replace

    prior = replace(TINY, name="tiny-prior", mask_prior=True)
    cfg = TrainConfig(network=prior, preprocessing=pre, sample=SampleConfig(preprocessing=pre, n_queries=2,
                      simulate_priors=True), minutes=5, max_iterations=1, n_guides=2, seed=0, threads=1, workers=0,
                      init_from=str(init))
    train(_cases(1), cfg, tmp_path / "prior.pt", tmp_path / "prior.csv")
    grown = load_checkpoint_file(tmp_path / "prior.pt")
    assert grown.inference.registration_weight == 0.0 and grown.preprocessing == pre
    assert "network tiny starts tiny-prior, so the new checkpoint has a fresh run's" in capsys.readouterr().out


def test_init_from_warns_of_training_flags_that_differ_from_its_run(tmp_path, monkeypatch, capsys):
    """The flags are compared with the init checkpoint's recorded train_flags, or (older
    checkpoints) with those its recorded train.py command gave."""
    seen = []
    train_script = _tiny_script(monkeypatch, lambda cases, cfg, out, log: seen.append(cfg) or {})
    recorded = _tiny_checkpoint(tmp_path / "recorded.pt", provenance={"train_flags": {
        "--lr": 0.001, "--presence-weight": 1.0, "--p-remap": 0.3, "--guides": 4}})
    base = ["--preset", "tiny", "--synthetic-inline", "1", "--workers", "0"]
    run = [*base, "--init-from", str(recorded), "--lr", "0.001", "--presence-weight", "2.0",
           "--out", str(tmp_path / "a.pt"), "--log", str(tmp_path / "a.csv")]
    assert train_script.main(run) == 0
    warning = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: training flags")]
    assert warning == [f"warning: training flags differ from the run that made --init-from {recorded} (recorded): "
                       "--presence-weight 2.0 (that run: 1.0), --p-remap 0.0 (that run: 0.3)"]
    assert seen[-1].provenance["train_flags"]["--presence-weight"] == 2.0  # recorded for the next stage
    # An older checkpoint: only its command.
    older = _tiny_checkpoint(tmp_path / "older.pt", provenance={
        "command": "python scripts/train.py --cache /work/cache --minutes 100 --lr 1e-3 --seed 5 --p-remap 0.3"})
    run = [*base, "--init-from", str(older), "--p-remap", "0.3", "--out", str(tmp_path / "b.pt"),
           "--log", str(tmp_path / "b.csv")]
    assert train_script.main(run) == 0
    assert (f"warning: training flags differ from the run that made --init-from {older} (read from its command; a flag "
            "its command did not give counts at today's default): "
            "--lr 0.002 (that run: 0.001)") in capsys.readouterr().err
    # The same flags: no warning.
    run = [*base, "--init-from", str(older), "--p-remap", "0.3", "--lr", "1e-3", "--out", str(tmp_path / "c.pt"),
           "--log", str(tmp_path / "c.csv")]
    assert train_script.main(run) == 0
    assert "warning" not in capsys.readouterr().err


def test_periodic_saves_go_to_the_partial_file_not_out(tmp_path, monkeypatch):
    """Every periodic save replaced --out: a crashed or stopped run had already destroyed the
    previous checkpoint there. Now they go to <out stem>.partial.pt, removed after the final save."""
    import PAMSegmentLib.training.trainer as trainer_module

    writes = []
    real_save = trainer_module.save_checkpoint

    def spy(path, network, pre, inference, provenance):
        writes.append((Path(path).name, provenance["final"]))
        return real_save(path, network, pre, inference, provenance)

    monkeypatch.setattr(trainer_module, "save_checkpoint", spy)
    pre = PreprocessingParams(input_size=32)
    cfg = TrainConfig(network=TINY, preprocessing=pre, sample=SampleConfig(preprocessing=pre, n_queries=2),
                      minutes=5, max_iterations=3, n_guides=2, seed=0, threads=1, workers=0,
                      checkpoint_every_min=0.0)  # a periodic save after every iteration
    out = tmp_path / "model.pt"
    train(_cases(1), cfg, out, tmp_path / "log.csv")
    assert writes == [("model.partial.pt", False)] * 3 + [("model.pt", True)]
    assert trainer_module.partial_path(out) == tmp_path / "model.partial.pt"
    assert not (tmp_path / "model.partial.pt").exists() and load_checkpoint_file(out).provenance["final"] is True


def test_ctrl_c_saves_the_partial_file_and_leaves_out_alone(tmp_path, monkeypatch, capsys):
    """Ctrl-C in train.py: a traceback, and the work since the last save was lost. Now the weights
    so far go to <out stem>.partial.pt (stopped_by "interrupted", final false), one line says
    where, exit 130; --out keeps the previous run's file."""
    ctrl_c_at_forward(monkeypatch, 3)
    train_script = _tiny_script(monkeypatch)
    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous run's weights")
    (tmp_path / "log.csv").write_text("the previous run's curve\n")
    code = train_script.main(["--preset", "tiny", "--synthetic-inline", "1", "--workers", "0", "--max-iterations",
                              "10", "--out", str(out), "--log", str(tmp_path / "log.csv"), "--overwrite"])
    assert code == 130
    # the previous run's curve stays with its weights (it was replaced by the interrupted run's)
    assert (tmp_path / "log.csv").read_text() == "the previous run's curve\n"
    assert (tmp_path / "log.partial.csv").read_text().startswith("iteration,")
    partial = tmp_path / "model.partial.pt"
    assert (f"interrupted: the weights after 2 iterations are in {partial} ({out} untouched); to go on, train with "
            f"--init-from {partial} and another --out" in capsys.readouterr().err.splitlines())
    assert out.read_bytes() == b"the previous run's weights"
    saved = load_checkpoint_file(partial)
    assert saved.provenance["stopped_by"] == "interrupted" and saved.provenance["final"] is False
    assert saved.provenance["iterations"] == 2
    # what code and data the run used: the tracked files changed since its commit, a digest of its cases
    assert isinstance(saved.provenance["git_changes"], list) and len(saved.provenance["data_sha256"]) == 64
    from types import SimpleNamespace

    one = [SimpleNamespace(name="a", image=np.zeros((2, 3, 3), np.float32), labels=np.zeros((2, 3, 3), np.int16))]
    other = [SimpleNamespace(name="a", image=one[0].image, labels=np.ones((2, 3, 3), np.int16))]
    assert train_script.data_digest(one) == train_script.data_digest(list(one)) != train_script.data_digest(other)


def test_a_non_finite_loss_stops_without_writing_out(tmp_path, monkeypatch, capsys):
    import PAMSegmentLib.training.trainer as trainer_module

    real_loss, calls = trainer_module.pam_loss, []

    def loss(*a, **k):
        calls.append(1)
        value, parts = real_loss(*a, **k)
        return (value * float("nan"), parts) if len(calls) == 2 else (value, parts)

    monkeypatch.setattr(trainer_module, "pam_loss", loss)
    train_script = _tiny_script(monkeypatch)
    out = tmp_path / "model.pt"
    code = train_script.main(["--preset", "tiny", "--synthetic-inline", "1", "--workers", "0", "--max-iterations",
                              "5", "--out", str(out), "--log", str(tmp_path / "log.csv")])
    assert code == 1 and not out.exists() and not (tmp_path / "model.partial.pt").exists()
    assert [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")] == [
        f"error: the loss became nan at iteration 2; training stopped and {out} was not written"]


def test_train_script_refuses_to_replace_files_it_was_not_told_to(tmp_path, monkeypatch, capsys):
    """--out equal to --init-from is refused outright; an existing --out, --log or partial save
    only without --overwrite."""
    written = []
    train_script = _tiny_script(monkeypatch, lambda cases, cfg, out, log: written.append(out) or {})
    init = _tiny_checkpoint(tmp_path / "init.pt")
    base = ["--preset", "tiny", "--synthetic-inline", "1", "--log", str(tmp_path / "log.csv")]
    (tmp_path / "link.pt").symlink_to(init)
    for out in (init, tmp_path / "link.pt"):
        assert train_script.main([*base, "--init-from", str(init), "--out", str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: --out {out} is the --init-from checkpoint: training would replace the weights it starts "
            "from; give another --out"]
    for existing, what in ((tmp_path / "model.pt", "--out"), (tmp_path / "model.partial.pt", "the partial save of --out"),
                           (tmp_path / "log.csv", "--log"), (tmp_path / "log.json", "the summary written beside --log")):
        existing.write_bytes(b"x")
        assert train_script.main([*base, "--out", str(tmp_path / "model.pt")]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"error: {existing} ({what}) exists and this run would replace it; give another path, or --overwrite"]
        existing.unlink()
    assert written == []
    (tmp_path / "model.pt").write_bytes(b"x")
    assert train_script.main([*base, "--out", str(tmp_path / "model.pt"), "--overwrite"]) == 0
    assert written == [tmp_path / "model.pt"]
    # Continuing from a partial save into the --out it belongs to would overwrite it while it is read
    partial = tmp_path / "run.partial.pt"
    partial.write_bytes(init.read_bytes())
    assert train_script.main([*base, "--init-from", str(partial), "--out", str(tmp_path / "run.pt"), "--overwrite"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --init-from {partial} is where this run's partial saves go (--out {tmp_path / 'run.pt'}): they would "
        "replace the weights it starts from; continue into another --out"]


def test_train_script_default_log_follows_out(tmp_path, monkeypatch):
    """Without --log each checkpoint gets its own log (<out stem>_log.csv), so a second run to
    another --out is not refused because of the first run's log."""
    logs = []
    train_script = _tiny_script(monkeypatch, lambda cases, cfg, out, log: logs.append(log) or log.write_text("x") or {})
    for name in ("first", "second"):
        assert train_script.main(["--preset", "tiny", "--synthetic-inline", "1", "--out", str(tmp_path / f"{name}.pt")]) == 0
    assert logs == [tmp_path / "first_log.csv", tmp_path / "second_log.csv"]


def test_train_script_makes_and_checks_the_output_folders_first(tmp_path, monkeypatch, capsys):
    written = []
    train_script = _tiny_script(monkeypatch, lambda cases, cfg, out, log: written.append(out) or {})
    out = tmp_path / "new" / "deeper" / "model.pt"
    log = tmp_path / "logs" / "log.csv"
    assert train_script.main(["--preset", "tiny", "--synthetic-inline", "1", "--out", str(out), "--log", str(log)]) == 0
    assert out.parent.is_dir() and log.parent.is_dir() and written == [out]
    assert list(out.parent.iterdir()) == [] and list(log.parent.iterdir()) == []  # the write check left nothing
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for flag in ("--out", "--log"):
        paths = {"--out": str(tmp_path / "ok.pt"), "--log": str(tmp_path / "ok.csv")}
        paths[flag] = str(blocker / "sub" / "x")
        code = train_script.main(["--preset", "tiny", "--synthetic-inline", "1", "--out", paths["--out"],
                                  "--log", paths["--log"]])
        err = capsys.readouterr().err.splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: cannot write to {blocker / 'sub'} (the folder of {flag}): ")
    assert written == [out]


@pytest.mark.parametrize("kind", ["missing", "not a checkpoint", "another network"])
def test_train_script_refuses_a_bad_init_checkpoint_before_loading_cases(tmp_path, monkeypatch, capsys, kind):
    train_script = _tiny_script(monkeypatch)

    def no_loading(*a, **k):
        raise AssertionError("cases loaded before the checkpoint was checked")

    monkeypatch.setattr(train_script, "load_training_cases", no_loading)
    monkeypatch.setattr(train_script, "inline_synthetic", no_loading)
    path = tmp_path / "init.pt"
    if kind == "not a checkpoint":
        path.write_text("iteration,seconds\n" * 100)
    elif kind == "another network":
        _tiny_checkpoint(path, config=PAMConfig(name="other", input_size=32, n_stages=3, base_features=4,
                                                max_features=8, n_attention_stages=2, presence_head=True))
    split = tmp_path / "split.json"
    split.write_text('{"train": []}')
    code = train_script.main(["--preset", "tiny", "--cache", str(tmp_path), "--split", str(split),
                              "--init-from", str(path), "--out", str(tmp_path / "o.pt"), "--log", str(tmp_path / "l.csv")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: --init-from {path}: "), err
    expected = {"missing": "does not exist", "not a checkpoint": "it is not a PyTorch file",
                "another network": "--init-from has network"}[kind]
    assert expected in err[0]


def test_train_script_says_to_prepare_the_data_when_the_split_is_missing(tmp_path, monkeypatch, capsys):
    train_script = _tiny_script(monkeypatch)
    split = tmp_path / "nowhere" / "split.json"
    code = train_script.main(["--cache", str(tmp_path), "--split", str(split), "--out", str(tmp_path / "o.pt"),
                              "--log", str(tmp_path / "l.csv")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: the split {split} does not exist; run scripts/prepare_data.py --cache {tmp_path} first (it writes "
        "the split and the training cases)"]


@pytest.mark.parametrize("flag, value, message", [
    ("--minutes", "0", "argument --minutes: expected a number above 0, got '0'"),
    ("--minutes", "-5", "argument --minutes: expected a number above 0, got '-5'"),
    ("--lr", "0", "argument --lr: expected a number above 0, got '0'"),
    ("--lr", "-1e-3", "argument --lr: expected a number above 0, got '-1e-3'"),
    ("--lr", "nan", "argument --lr: expected a number above 0, got 'nan'"),
    ("--guides", "0", "argument --guides: expected a whole number of at least 1, got '0'"),
    ("--queries", "0", "argument --queries: expected a whole number of at least 1, got '0'"),
    ("--threads", "0", "argument --threads: expected a whole number of at least 1, got '0'"),
    ("--workers", "-1", "argument --workers: expected a whole number of at least 0, got '-1'"),
])
def test_train_script_checks_the_ranges_of_its_numbers(tmp_path, monkeypatch, capsys, flag, value, message):
    """--minutes 0 divided by zero (or wrote an untrained checkpoint); --guides 0 / --queries 0
    trained on NaN and wrote the result, exit 0."""
    train_script = _tiny_script(monkeypatch, lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit) as exit_:
        train_script.main(["--synthetic-inline", "1", "--out", str(tmp_path / "o.pt"), f"{flag}={value}"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_cases_without_synthetic_volumes_keep_the_per_source_shares(tmp_path, capsys):
    from PAMSegmentLib.training.data import write_case

    train_script = _train_script()
    lab = np.zeros((6, 16, 16), np.int16)
    lab[1:5, 4:10, 4:10] = 1
    for name in ("ts_a", "ts_b", "tptbox_c"):
        write_case(tmp_path / "cases" / f"{name}.npz", lab.astype(np.float32) * 100, lab, (1, 1, 1), {1: "box"},
                   "CT", "test")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [{"case": n, "labels": [1]} for n in ("ts_a", "ts_b", "tptbox_c")]}))
    # Not asked for none: refused (the documented stage commands on a cache without them trained on real data only)
    refused = "no synthetic volumes in .*prepare_data.py --synthetic 400.*--max-synthetic 0"
    with pytest.raises(SystemExit, match=refused):
        train_script.load_training_cases(tmp_path, split, None)
    w = {c.name: c.weight for c in train_script.load_training_cases(tmp_path, split, 5)}
    ts, tptbox = train_script.SOURCE_SHARE["ts_"], train_script.SOURCE_SHARE["tptbox_"]
    assert w["ts_a"] == w["ts_b"] == pytest.approx(ts / (ts + tptbox) / 2)  # 0.346: the source's share, halved
    assert w["tptbox_c"] == pytest.approx(tptbox / (ts + tptbox))  # 0.308, not 1/3 by case count
    assert sum(w.values()) == pytest.approx(1.0)
    assert "warning: no synthetic volumes in" in capsys.readouterr().err
    train_script.load_training_cases(tmp_path, split, 0)  # --max-synthetic 0 asked for none: no warning
    assert "warning" not in capsys.readouterr().err


def test_the_loader_skips_the_temporary_files_of_an_interrupted_prepare_data(tmp_path):
    """An interrupted prepare_data left synth_NNNN.npz.tmp.npz, which glob('synth_*.npz') took
    for a case (BadZipFile)."""
    from PAMSegmentLib.training.data import write_case

    train_script = _train_script()
    lab = np.zeros((6, 16, 16), np.int16)
    lab[1:5, 4:10, 4:10] = 1
    write_case(tmp_path / "cases" / "synth_0000.npz", lab.astype(np.float32), lab, (1, 1, 1), {1: "box"}, "s", "t")
    (tmp_path / "cases" / "synth_0001.npz.tmp.npz").write_bytes(b"PK\x03\x04 half written")  # older write_case
    (tmp_path / "cases" / "synth_0002.npz.tmp").write_bytes(b"PK\x03\x04 half written")
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": []}))
    assert [c.name for c in train_script.load_training_cases(tmp_path, split, None)] == ["synth_0000"]


def test_the_readme_and_docstring_state_what_reproduces_a_run():
    """--workers 2 samples batches in another order than 0 or 1, so the same seed, data and
    --threads alone do not give the same weights."""
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "the same seed, data, `--threads` and `--workers` then give the same weights" in readme
    assert "same seed, data and `--threads` then" not in readme
    doc = _train_script().__doc__
    assert "prepare_data.py --cache cache --synthetic 400 --synthetic-stacks 160" in doc
    assert "--synthetic 400 --synthetic-stacks 160" in readme


@pytest.mark.parametrize("option, value, expected", [
    ("--seed", "-1", "expected a whole number from 0 to 4294967295"),  # a traceback from the loader after the data
    ("--presence-weight", "-1", "expected a number of at least 0"),
    ("--boundary-weight", "nan", "expected a number of at least 0"),
    ("--max-synthetic", "-5", "expected a whole number of at least 0"),
])
def test_train_script_refuses_bad_numbers_in_its_arguments(option, value, expected, monkeypatch, capsys):
    train_script = _tiny_script(monkeypatch, lambda *a: {})
    with pytest.raises(SystemExit) as caught:
        train_script.main(["--preset", "tiny", "--synthetic-inline", "1", option, value])
    assert caught.value.code == 2 and f"argument {option}: {expected}, got '{value}'" in capsys.readouterr().err


def test_a_split_whose_training_list_reaches_evaluation_data_is_refused(tmp_path):
    """A review (s28): train.py trained on whatever the split's train list said: a copy training on
    the evaluation-only MR scan and on the liver (held out) ran without a word, and its model card
    still called them held out. The shipped split passes."""
    import json as _json
    import sys as _sys

    _sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import train as train_script
    finally:
        _sys.path.remove(str(ROOT / "scripts"))
    split = _json.loads((ROOT / "scripts" / "split.json").read_text())
    train_script.check_split_honest(split, ROOT / "scripts" / "split.json")
    with_mr = _json.loads(_json.dumps(split))
    with_mr["train"].append({"case": "ts_mr", "labels": [1]})
    with pytest.raises(SystemExit, match="ts_mr is an evaluation scan"):
        train_script.check_split_honest(with_mr, tmp_path / "split.json")
    with_liver = _json.loads(_json.dumps(split))
    ct = next(e for e in with_liver["train"] if e["case"] == "ts_ct")
    liver = next(st["id"] for e in split["eval"] if e["case"] == "ts_ct" for st in e["structures"]
                 if st["name"] == "liver")
    ct["labels"].append(liver)
    with pytest.raises(SystemExit, match=f"training case ts_ct lists label {liver} \\(liver\\), a held-out structure"):
        train_script.check_split_honest(with_liver, tmp_path / "split.json")


def test_a_save_on_a_full_disk_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    """A newcomer's trial (session 44): the final save on a full disk (a 6 MB tmpfs) ended train.py
    with torch's traceback ("[enforce fail at inline_container.cc:672] . unexpected pos ..."), no
    word of the disk, and left the 6 MB temporary file holding the space. Now one error line saying
    what could not be written and how much is free, exit 2, the temporary removed, --out untouched."""
    import PAMSegmentLib.checkpoints as checkpoints_module

    def full(payload, target):
        Path(target).write_bytes(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(checkpoints_module.torch, "save", full)
    train_script = _tiny_script(monkeypatch)
    out = tmp_path / "model.pt"
    out.write_bytes(b"the previous run's weights")
    code = train_script.main(["--preset", "tiny", "--synthetic-inline", "1", "--workers", "0", "--max-iterations",
                              "2", "--out", str(out), "--overwrite"])
    assert code == 2
    err = capsys.readouterr().err
    assert (f"error: cannot write checkpoint {out} ([enforce fail at inline_container.cc:672] . unexpected pos 64 vs "
            "0; ") in err and " MB are free there: the disk full?); nothing was replaced" in err, err
    assert "Traceback" not in err
    assert out.read_bytes() == b"the previous run's weights"
    assert not (tmp_path / "model.pt.tmp").exists()


def test_sigterm_saves_the_weights_so_far_as_ctrl_c_does(tmp_path, monkeypatch, capsys):
    """A trial (session 44): `timeout` or a scheduler's SIGTERM ended train.py at once, silently,
    with no save, and its curve's partial file refused the same command afterwards. SIGTERM now
    ends a run as Ctrl-C does (the weights so far in the partial file, said), with exit 143."""
    import os
    import signal

    import PAMSegmentLib.training.trainer as trainer_module

    real_forward, calls = trainer_module._forward, []

    def forward(net, batch):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_forward(net, batch)

    monkeypatch.setattr(trainer_module, "_forward", forward)
    train_script = _tiny_script(monkeypatch)
    out = tmp_path / "model.pt"
    before = signal.getsignal(signal.SIGTERM)
    code = train_script.main(["--preset", "tiny", "--synthetic-inline", "1", "--workers", "0", "--max-iterations",
                              "10", "--out", str(out)])
    assert code == 143
    partial = tmp_path / "model.partial.pt"
    assert (f"stopped (SIGTERM): the weights after 2 iterations are in {partial} ({out} untouched); to go on, train "
            f"with --init-from {partial} and another --out") in capsys.readouterr().err.splitlines()
    assert load_checkpoint_file(partial).provenance["stopped_by"] == "interrupted" and not out.exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler back
