"""Time-budgeted PAM training on CPU.

Loss: Dice + cross-entropy at every deep-supervision scale (nnU-Net's weights 1, 1/2, 1/4, ...
normalised), plus binary cross-entropy on the object-present logit. The learning rate follows a
polynomial decay over the *time* budget, so a run always finishes its schedule on time whatever
the machine's speed; with ``max_iterations`` it decays over the iteration count instead, which
makes a seeded run reproducible. Batches come from a background process so sampling overlaps the
network.

Only the final save writes ``out_path``: the periodic saves (every ``checkpoint_every_min``) and
the save on Ctrl-C go to ``<out stem>.partial.pt`` beside it (``partial_path``), so a run that is
stopped, crashes or diverges never replaces an earlier checkpoint at ``out_path``.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..checkpoints import InferenceParams, load_checkpoint_file, save_checkpoint
from ..network import PRESETS, PAMConfig, PAMNetwork, fuse_scales
from ..preprocess import PreprocessingParams
from .samples import Case, SampleBatch, SampleConfig, make_batch

__all__ = ["TrainConfig", "train", "pam_loss", "partial_path", "check_init_network", "TrainingInterrupted",
           "NonFiniteLoss"]


@dataclass
class TrainConfig:
    network: PAMConfig
    preprocessing: PreprocessingParams
    sample: SampleConfig
    minutes: float = 60.0
    # None: the time budget ends the run and the LR schedule and the start of rollouts follow wall
    # time (not reproducible: how far a run gets depends on the machine). N: the run ends after N
    # iterations and both follow the iteration count, so the same seed, data, threads and workers
    # give the same weights (workers 0 and 1 sample the same batches; 2 or more interleave other
    # streams), unless the time budget runs out first (``stopped_by`` in the provenance).
    max_iterations: int | None = None
    n_guides: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    presence_weight: float = 0.5
    # > 0: cross-entropy weight 1 + boundary_weight on pixels within boundary_band px of the
    # target's boundary (at w 0.5 the registration fusion lets the network decide only there).
    boundary_weight: float = 0.0
    boundary_band: int = 2
    rollout_after: float = 0.15  # fraction of the budget before rollouts start
    p_rollout: float = 0.35
    seed: int = 0
    threads: int = 1
    workers: int = 1
    checkpoint_every_min: float = 5.0
    init_from: str | None = None
    provenance: dict = field(default_factory=dict)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``train``: the weights so far were saved to ``path`` (``final`` false,
    ``stopped_by`` "interrupted"), or nothing was (``path`` None: before the first iteration);
    ``out_path`` was not written."""

    def __init__(self, path: Path | None, iterations: int):
        super().__init__(f"interrupted after {iterations} iterations; the weights so far are in {path}" if path else
                         "interrupted before the first iteration; nothing was saved")
        self.path, self.iterations = path, iterations


def _interrupts_held():
    """Ctrl-C and SIGTERM ignored while the save the first Ctrl-C asked for is written
    (``cli.ctrl_c_ignored``: the main thread only)."""
    from ..cli import ctrl_c_ignored  # noqa: PLC0415

    return ctrl_c_ignored()


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stopped without writing ``out_path``."""


def partial_path(out_path: Path) -> Path:
    """Where a run's periodic and interrupted saves go: ``<out stem>.partial.pt`` beside ``out_path``."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".partial.pt")


def _ds_weights(n: int) -> list[float]:
    w = [1 / 2**i for i in range(n)]
    s = sum(w)
    return [x / s for x in w]


def boundary_band(target: torch.Tensor, band: int) -> torch.Tensor:
    """(B, s, s) {0,1} -> bool: pixels within ``band`` px (chessboard distance) of a foreground /
    background edge, on both sides (dilation minus erosion with a (2 band + 1)^2 square)."""
    t = target[:, None].float()
    k = 2 * int(band) + 1
    dilated = F.max_pool2d(t, k, stride=1, padding=band)
    eroded = -F.max_pool2d(-t, k, stride=1, padding=band)
    return (dilated - eroded)[:, 0] > 0


def pam_loss(logits: list[torch.Tensor], presence: torch.Tensor | None, target: torch.Tensor,
             present: torch.Tensor, presence_weight: float, boundary_weight: float = 0.0,
             band: int = 2) -> tuple[torch.Tensor, dict]:
    """logits: list of (B, 2, s, s); target (B, S, S) float {0,1}; present (B,).
    ``boundary_weight`` b > 0: each level's cross-entropy weighs pixels within ``band`` px of the
    target's edge 1 + b times (a weighted mean); 0 = the plain mean."""
    total = 0.0
    parts = {}
    for w, lg in zip(_ds_weights(len(logits)), logits):
        t = target if lg.shape[-1] == target.shape[-1] else F.interpolate(target[:, None], size=lg.shape[-2:], mode="nearest")[:, 0]
        if boundary_weight > 0:
            weights = 1.0 + boundary_weight * boundary_band(t, band).float()
            ce = (F.cross_entropy(lg, t.long(), reduction="none") * weights).sum() / weights.sum()
        else:
            ce = F.cross_entropy(lg, t.long())
        p = torch.softmax(lg, dim=1)[:, 1]
        # Batch Dice (nnU-Net's choice): empty targets do not produce undefined per-sample terms.
        inter = (p * t).sum()
        dice = 1 - (2 * inter + 1e-5) / (p.sum() + t.sum() + 1e-5)
        total = total + w * (ce + dice)
        if lg.shape[-1] == target.shape[-1]:
            parts["ce"], parts["dice"] = float(ce.detach()), float(dice.detach())
    if presence is not None:
        bce = F.binary_cross_entropy_with_logits(presence, present)
        total = total + presence_weight * bce
        parts["presence"] = float(bce.detach())
    return total, parts


class _BatchStream(torch.utils.data.IterableDataset):
    def __init__(self, cases, weights, cfg: TrainConfig, total_seconds: float, start_time: float, seed: int):
        self.cases, self.weights, self.cfg = cases, weights, cfg
        self.total_seconds, self.start_time, self.seed = total_seconds, start_time, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        if info is not None:  # a sampling worker: one thread; in the main process keep cfg.threads
            torch.set_num_threads(1)
        n_workers = info.num_workers if info is not None else 1
        rng = np.random.default_rng([self.seed, wid])
        for k in itertools.count():
            # The DataLoader takes batches from its workers in turn, so this worker's k-th batch is
            # iteration k * n_workers + wid.
            frac = _progress(self.cfg, k * n_workers + wid, time.time() - self.start_time, self.total_seconds)
            rollout = frac > self.cfg.rollout_after and rng.random() < self.cfg.p_rollout
            yield make_batch(self.cases, self.weights, rng, self.cfg.sample, self.cfg.n_guides, rollout)


def _progress(cfg: TrainConfig, iteration: int, elapsed: float, total_seconds: float) -> float:
    """How far the schedule is, 0 -> 1: by iterations when the run has an iteration count, else by time."""
    if cfg.max_iterations is not None:
        return iteration / max(cfg.max_iterations, 1)
    return elapsed / total_seconds


def _collate(x):
    return x


def _forward(net: PAMNetwork, batch: SampleBatch):
    stage = net.proposing_stage
    guide_image, guide_mask = batch.guide_image, batch.guide_mask
    if batch.relay_image is not None:
        # Rollout: the network's own prediction of the relay slice becomes the guide.
        relay_prior = batch.relay_prior[:, None] if batch.relay_prior is not None else None
        with torch.no_grad():
            relay = stage(guide_image, guide_mask, batch.relay_image[:, None], relay_prior)
            prob = fuse_scales(relay.logits, guide_image.shape[-1])
        guide_image = batch.relay_image
        guide_mask = (prob >= 0.5).float()[:, None]
    return stage(guide_image, guide_mask, batch.query_images, batch.query_priors)


def check_init_network(init_config: PAMConfig, config: PAMConfig) -> None:
    """Raise ValueError unless a checkpoint of network ``init_config`` can start ``config``: the
    same network, or ``config`` adds only the prior channel to it (see ``initial_state``)."""
    if init_config == config:
        return
    if not (config.mask_prior and not init_config.mask_prior
            and replace(init_config, name=config.name, mask_prior=True) == config):
        differ = [f"{name} {getattr(init_config, name)!r} (this run: {getattr(config, name)!r})"
                  for name in init_config.__dataclass_fields__
                  if name != "name" and getattr(init_config, name) != getattr(config, name)]
        if not differ:  # the same network under another name
            raise ValueError(f"--init-from has network {init_config.name!r}, the same as the {config.name!r} "
                             f"network this run trains but for its name: give --preset {init_config.name} if there is "
                             "one, or a checkpoint saved under this preset's name")
        if init_config.name == config.name:  # (a checkpoint of an earlier version of this preset)
            raise ValueError(f"--init-from has network {init_config.name!r}, which differs from this version's "
                             f"{config.name!r} preset ({'; '.join(differ)}): it cannot start this run; train from "
                             "scratch or from a checkpoint of this version")
        preset = init_config.name if init_config.name in PRESETS else None
        fix = (f"give --preset {preset}, or a {config.name} checkpoint" if preset else
               f"give a {config.name} checkpoint (of --preset {config.name})")
        raise ValueError(f"--init-from has network {init_config.name!r}, not the {config.name!r} network this run "
                         f"trains ({'; '.join(differ)}): {fix}")


def initial_state(net: PAMNetwork, init) -> None:
    """Load ``init`` (a loaded checkpoint) into ``net``. A network that only adds the prior channel
    (``mask_prior``) to ``init``'s otherwise identical network starts from its weights, the new
    channel's input weights set to zero, so it starts out computing exactly what ``init`` did."""
    if init.config == net.config:
        net.load_state_dict(init.network.state_dict())
        return
    check_init_network(init.config, net.config)
    state = dict(init.network.state_dict())
    target = net.state_dict()
    for key, value in state.items():
        if target[key].shape != value.shape:  # the image encoder's first convolution: 1 -> 2 inputs
            grown = torch.zeros_like(target[key])
            grown[:, : value.shape[1]] = value
            state[key] = grown
    net.load_state_dict(state)


def _changed(values: dict, reference: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in values.items() if reference.get(k) != v)


def train(cases: list[Case], cfg: TrainConfig, out_path: Path, log_path: Path) -> dict:
    """Train until the time budget or iteration cap; writes ``out_path`` (our checkpoint format).

    Periodic saves go to ``partial_path(out_path)``, removed after the final save. Ctrl-C saves
    the weights so far there and raises ``TrainingInterrupted``; a NaN or infinite loss raises
    ``NonFiniteLoss``; neither writes ``out_path``.

    With ``init_from`` a checkpoint of the same network, the new checkpoint keeps that
    checkpoint's inference parameters and preprocessing (the samples are preprocessed its way
    too); the optimizer state and the LR schedule start fresh."""
    out_path, log_path = Path(out_path), Path(log_path)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    net = PAMNetwork(cfg.network)
    inference = InferenceParams(window_mm=cfg.sample.window_mm, max_window=cfg.sample.max_window)
    if cfg.init_from:
        init = load_checkpoint_file(cfg.init_from)
        initial_state(net, init)
        # The chain of earlier stages, so a checkpoint records all the compute that made it.
        cfg.provenance.setdefault("init_from", {"file": str(cfg.init_from), "sha256": init.sha256,
                                                "provenance": init.provenance})
        if init.config == net.config:
            # Inference parameters are chosen for a checkpoint after training (registration
            # fusion, drift test, ...; scripts/set_inference_params.py); a continued checkpoint
            # with the format's defaults would run as the network alone.
            changed = _changed(init.inference.to_dict(), inference.to_dict())
            changed_pre = _changed(init.preprocessing.to_dict(), cfg.preprocessing.to_dict())
            print(f"--init-from {cfg.init_from}: the new checkpoint keeps its inference parameters ("
                  + (f"beyond a fresh run's: {changed}" if changed else "a fresh run's")
                  + ") and preprocessing (" + (f"beyond a fresh run's: {changed_pre}; the samples use it too"
                                               if changed_pre else "a fresh run's")
                  + "); the optimizer state and the learning-rate schedule start fresh", flush=True)
            inference = init.inference
            cfg = replace(cfg, preprocessing=init.preprocessing,
                          sample=replace(cfg.sample, preprocessing=init.preprocessing))
            cfg.provenance["inherited_from_init"] = ["inference", "preprocessing"]
            if init.provenance.get("inference_changes"):  # the model card says why they are what they are
                cfg.provenance.setdefault("inference_changes", list(init.provenance["inference_changes"]))
        else:
            print(f"--init-from {cfg.init_from}: network {init.config.name} starts {net.config.name}, so the new "
                  "checkpoint has a fresh run's inference parameters and preprocessing (set them with "
                  "scripts/set_inference_params.py); the optimizer state and the learning-rate schedule start "
                  "fresh", flush=True)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    weights = np.array([c.weight for c in cases], dtype=np.float64)
    weights /= weights.sum()
    total_seconds = cfg.minutes * 60.0
    start = time.time()
    stream = _BatchStream(cases, weights, cfg, total_seconds, start, cfg.seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=cfg.workers, collate_fn=_collate,
                                         prefetch_factor=4 if cfg.workers else None,
                                         persistent_workers=bool(cfg.workers))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(out_path)
    last_ckpt = start
    ema = None
    it = 0
    stopped_by = None  # "iterations", "time" or "interrupted" once the run ends
    saved_partial = False

    def save(path: Path, final: bool):
        prov = dict(cfg.provenance)
        prov.update({"iterations": it, "train_seconds": round(time.time() - start, 1), "final": final,
                     "loss_ema": ema, "seed": cfg.seed,
                     "schedule": "iterations" if cfg.max_iterations is not None else "time",
                     "stopped_by": stopped_by})
        return save_checkpoint(path, net, cfg.preprocessing, inference, prov)

    # The curve goes to a partial log that replaces --log only when the run finishes, as the weights
    # replace --out: an interrupted or failed run keeps the old pair (checkpoint and its curve).
    log_partial = log_path.with_name(log_path.stem + ".partial" + log_path.suffix)
    last_row, written = None, 0
    with open(log_partial, "w", newline="") as logf:
        writer = csv.writer(logf)
        writer.writerow(["iteration", "seconds", "lr", "loss", "ce", "dice", "presence", "rollout"])
        try:
            for batch in loader:
                elapsed = time.time() - start
                if cfg.max_iterations is not None and it >= cfg.max_iterations:
                    stopped_by = "iterations"
                    break
                if elapsed >= total_seconds:
                    stopped_by = "time"
                    break
                lr = cfg.lr * (1 - _progress(cfg, it, elapsed, total_seconds)) ** 0.9
                for g in opt.param_groups:
                    g["lr"] = lr
                out = _forward(net, batch)
                target = batch.query_masks.flatten(0, 1)
                loss, parts = pam_loss(out.logits, out.presence, target, batch.present.flatten(), cfg.presence_weight,
                                       cfg.boundary_weight, cfg.boundary_band)
                lv = float(loss.detach())
                if not math.isfinite(lv):  # before the step: the weights stay those of the last good one
                    last = f" (the last periodic save, {partial}, predates it)" if saved_partial else ""
                    raise NonFiniteLoss(f"the loss became {lv} at iteration {it + 1}; training stopped and "
                                        f"{out_path} was not written{last}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
                opt.step()
                it += 1
                ema = lv if ema is None else 0.98 * ema + 0.02 * lv
                last_row = [it, round(elapsed, 1), f"{lr:.2e}", f"{lv:.4f}", f"{parts.get('ce', math.nan):.4f}",
                            f"{parts.get('dice', math.nan):.4f}", f"{parts.get('presence', math.nan):.4f}",
                            int(batch.relay_image is not None)]
                if it % 10 == 0 or it == 1:
                    writer.writerow(last_row)
                    written = it
                    logf.flush()
                if time.time() - last_ckpt > cfg.checkpoint_every_min * 60:
                    save(partial, final=False)  # never out_path: only a finished run replaces it
                    saved_partial, last_ckpt = True, time.time()
        except KeyboardInterrupt:
            stopped_by = "interrupted"
            if last_row is not None and written != it:  # the curve up to the weights saved (rows go every 10)
                writer.writerow(last_row)
                logf.flush()
            if it == 0:  # nothing learned: the starting weights are not saved as if they were a run's, and the
                logf.close()  # curve's partial file goes too (it made the same command's next run refuse to start)
                log_partial.unlink(missing_ok=True)
                raise TrainingInterrupted(None, 0) from None
            with _interrupts_held():  # a second Ctrl-C while saving cut the save short (a review, session 41)
                save(partial, final=False)
            raise TrainingInterrupted(partial, it) from None
        if last_row is not None and written != it:  # the last iteration too (the card counts the log's last row)
            writer.writerow(last_row)
    digest = save(out_path, final=True)
    os.replace(log_partial, log_path)
    partial.unlink(missing_ok=True)
    summary = {"iterations": it, "seconds": round(time.time() - start, 1), "loss_ema": ema, "sha256": digest,
               "stopped_by": stopped_by}
    (log_path.with_suffix(".json")).write_text(json.dumps(summary, indent=2))
    return summary
