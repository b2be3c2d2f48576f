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
                                                   ("--boundary-weight", "-1", "--boundary-weight must be >= 0"),
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
    assert new.sha256 == old.sha256  # zero iterations: the weights are the first stage's
    chain = new.provenance["init_from"]
    assert chain["sha256"] == old.sha256 and chain["provenance"]["command"] == "stage one"
    assert chain["provenance"]["iterations"] == 3

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_model_card import training_stages
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert [st["command"] for st in training_stages(new.provenance)] == ["stage one", "stage two"]


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
    # named explicitly, the shipped weights are the user's choice
    assert train_script.main([*run, "--out", str(shipped)]) == 0
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
