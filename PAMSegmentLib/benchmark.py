"""``pamsegment benchmark`` (also ``scripts/benchmark.py``): speed, memory and scaling of propagation.

Three parts (issue 5), all on CPU with a fixed number of torch threads:

1. **network**: per-slice latency and throughput of the network alone at the engine's batch sizes.
   For a PAM preset, one timed call is what ``PAMPredictor.predict`` runs on the network for one
   batch of B query slices whose guide is already encoded (the engine encodes a guide once per
   window): ``proposing_stage.decode_queries`` on a (1, B, 1, S, S) crop + ``fuse_scales`` (all
   scales upsampled, averaged, softmax). Encoding the guide (``encode_guide``: image + mask
   encoders) is timed separately (``guide_ms``). For SAM 2 tiny (``sam2_hiera_t``, random
   weights, built from its hydra config without torchvision), one timed call is the video path
   for B new frames conditioned on one memory frame: ``forward_image`` (Hiera-T + FPN neck on
   B x 3 x S x S) + ``_prepare_backbone_features`` + ``track_step`` (memory attention over the
   frame's tokens against the memory frame's 64-channel memory and its object pointer, SAM prompt
   encoder without prompts, mask decoder, upsampling to S x S) with ``run_mem_encoder=False``.
   The memory frame (image encoder + mask as output + memory encoder) is ``guide_ms``. This is the
   accounting most favourable to SAM 2: its video predictor also runs the memory encoder on every
   tracked frame and attends to up to 7 memory frames, not 1. Every call runs under
   ``torch.inference_mode()``; figures are medians of several repeats after warm-up.
   **Paired ratio** (the "default at least 10x the official preset" figure): both PAM presets in
   one process, their calls alternated (small-official, then official-small, and so on) so that
   both see the same machine state, many pairs per batch size; the ratio is
   median(official ms) / median(small ms), with the quartiles of the per-pair ratios as its
   spread. The separate per-preset rows above each run in their own process, a few minutes apart,
   so their ratio also carries the machine's drift between the two runs.
2. **end to end**: read NIfTI, preprocess, propagate, write, on synthetic CT-like volumes
   (noise + body + an ellipsoid-ish object spanning a known number of slices, prompt on its middle
   slice), each configuration in a fresh subprocess so peak resident memory (VmHWM, reset after
   imports and model loading) is its own. ``fixed`` runs predict exactly the object's extent
   (``range`` = extent, ``early_stop=False``), so the work is the same whatever the weights;
   ``honest`` runs use the default stopping rule and need trained weights.
3. **slicer**: the Slicer path on slicer-core MRML nodes (node -> array -> engine -> segment),
   each step's seconds, with a stub predictor standing in for the network.

Outputs in ``--out``: network.csv, paired.csv, end_to_end.csv, slicer.csv, targets.csv, benchmark.json,
benchmark.png and benchmark.md (tables + machine + command), and the same tables on stdout. Only a
full run as published (every part at the default sizes, 2 threads, the shipped pam_small.pt for
the small preset and random weights for the official one) writes into docs/benchmark by default
(when that folder exists: run from a checkout; elsewhere into ./benchmark_out);
a run with --quick, --parts, an option that changes what is measured, --threads other than 2 or
other weights (another --checkpoint or PAMSEGMENT_MODEL, random weights when pam_small.pt is
missing, --official-checkpoint) writes into ./benchmark_out unless --out is given, so that it
never mixes into the published tables (a partial run rewrites only its parts' CSVs, but always
benchmark.md, benchmark.json, benchmark.png and targets.csv).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import median

import numpy as np

__all__ = [
    "BenchConfig",
    "NETWORK_COLUMNS",
    "E2E_COLUMNS",
    "PAIRED_COLUMNS",
    "SLICER_COLUMNS",
    "TARGET_COLUMNS",
    "machine_info",
    "synthetic_ct",
    "run_benchmark",
    "add_benchmark_arguments",
    "cmd_benchmark",
    "main",
]

NETWORK_COLUMNS = ["model", "input_px", "params_m", "batch", "threads", "repeats", "batch_ms_median",
                   "batch_ms_min", "per_slice_ms", "slices_per_s", "guide_ms", "peak_rss_mb", "weights",
                   "status", "note"]
E2E_COLUMNS = ["preset", "mode", "depth", "size", "object_slices", "slices_predicted", "model_s", "read_s",
               "propagate_s", "predict_s", "postprocess_s", "engine_overhead_s", "write_s", "wall_s",
               "baseline_rss_mb", "peak_rss_mb", "run_peak_rss_mb", "dice", "weights", "status", "note"]
PAIRED_COLUMNS = ["batch", "threads", "pairs", "small_ms_median", "official_ms_median", "ratio", "ratio_q25",
                  "ratio_q75", "weights", "status", "note"]
SLICER_COLUMNS = ["step", "seconds", "depth", "size", "note"]
TARGET_COLUMNS = ["target", "value", "goal", "met", "note"]

RESULT_TAG = "PAMSEGMENT_BENCH_RESULT "
OFFICIAL_SPEEDUP_GOAL = 10  # the default preset's per-slice throughput over the official preset's (issue 3)
SAM2_CONFIG = "configs/sam2/sam2_hiera_t.yaml"
MB = 1024.0 * 1024.0
# The parts and the CSV files each writes; ALL_PARTS, the default and --parts' choices follow it.
PART_FILES = {"network": ("network.csv", "paired.csv"), "e2e": ("end_to_end.csv",), "slicer": ("slicer.csv",)}
ALL_PARTS = tuple(PART_FILES)
# every file write_outputs may put in --out (its links are checked before measuring)
OUTPUT_FILES = (*(n for names in PART_FILES.values() for n in names), "targets.csv", "benchmark.md", "benchmark.json",
                "benchmark.png")


@dataclass
class BenchConfig:
    out: str = "docs/benchmark"
    threads: int = 2
    quick: bool = False
    parts: tuple[str, ...] = ALL_PARTS
    # network part
    presets: tuple[str, ...] = ("small", "official")
    batch_sizes: tuple[int, ...] = (1, 4, 8, 16)
    repeats: int = 5
    warmup: int = 2
    budget_s: float = 30.0  # per (model, batch): fewer repeats (at least 3) when one call is slow
    pairs: int = 40  # paired small/official calls per batch size (fewer, at least 5, if over budget_s)
    sam2: bool = True
    sam2_sizes: tuple[int, ...] = (1024, 512)  # 1024 = the config's own image_size (the target)
    # end-to-end part
    size: int = 512
    depths: tuple[int, ...] = (100, 200, 400)
    objects: tuple[int, ...] = (20, 80, 160)
    extra_cases: tuple[tuple[int, int], ...] = ((200, 100),)  # the target case
    spacing: tuple[float, float, float] = (1.25, 0.7, 0.7)  # (k, j, i) mm; window = 16 slices
    e2e_presets: tuple[str, ...] = ("small", "official")
    batch_size: int = 16
    file_format: str = ".nii.gz"
    # slicer part
    slicer_depth: int = 200
    slicer_object: int = 100
    # weights
    checkpoint: str | None = None  # for the small preset; None = the shipped weights if installed
    official_checkpoint: str | None = None
    timeout_s: float = 3600.0
    # Every measurement in a fresh subprocess (own peak RSS, no allocator or thread-pool state
    # carried over). Quick mode runs in-process to stay fast; its memory figures are then the
    # benchmark process's, not the configuration's.
    isolate: bool = True
    command: str = ""


def quick_config(**overrides) -> BenchConfig:
    """Tiny sizes that exercise every code path in seconds (tests, smoke runs)."""
    cfg = BenchConfig(quick=True, out=SCRATCH_OUT, presets=("small", "official"), batch_sizes=(1, 2), repeats=1,
                      warmup=0, pairs=2, budget_s=5.0, sam2_sizes=(128,), size=96, depths=(16, 24), objects=(6,),
                      extra_cases=(), e2e_presets=("small",), batch_size=4, slicer_depth=16, slicer_object=6,
                      timeout_s=300.0, isolate=False)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


# ----------------------------------------------------------------------------------------------
# machine, memory, timing helpers
# ----------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    from .volumes import physical_memory_bytes

    memory = physical_memory_bytes()
    mem_gb = None if memory is None else round(memory / 1024**3, 1)
    try:
        from importlib.metadata import version

        sam2_version = version("sam2")
    except Exception:  # noqa: BLE001 - not installed
        sam2_version = None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": mem_gb,
        "torch": torch.__version__,
        "torch_threads": threads,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "sam2": sam2_version,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _status_mb(field_name: str) -> float | None:
    """VmRSS / VmHWM of this process in MB (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(int(threads))


def _time_calls(fn, warmup: int, repeats: int, budget_s: float, clock=time.perf_counter) -> list[float]:
    """Seconds of ``repeats`` calls after ``warmup`` calls; fewer (>= 3) if one call eats the budget."""
    first = None
    for _ in range(warmup):
        t0 = clock()
        fn()
        first = clock() - t0
        if first * repeats > budget_s:  # a slow call: one warm-up is enough
            break
    n = repeats
    if first and first * repeats > budget_s:
        n = max(min(3, repeats), int(budget_s // first))
    times = []
    for _ in range(n):
        t0 = clock()
        fn()
        times.append(clock() - t0)
        if len(times) >= min(3, repeats) and sum(times) > budget_s:  # also without warm-up calls to judge by
            break
    return times


def _time_pairs(fn_a, fn_b, warmup: int, pairs: int, budget_s: float, clock=time.perf_counter):
    """Seconds of ``fn_a`` and ``fn_b`` called alternately: pair k runs a then b for even k and
    b then a for odd k, so a drift of the machine's speed falls on both alike. ``pairs`` pairs
    after ``warmup`` of each; fewer (at least ``min(5, pairs)``) if a warm-up pair shows that
    ``pairs`` would take over ``budget_s``. Returns (times_a, times_b), equal lengths."""

    def timed(fn):
        t0 = clock()
        fn()
        return clock() - t0

    pair_s = None
    for _ in range(warmup):
        pair_s = timed(fn_a) + timed(fn_b)
    n = pairs
    if pair_s and pair_s * pairs > budget_s:
        n = max(min(5, pairs), int(budget_s // pair_s))
    times_a, times_b = [], []
    for k in range(n):
        if k % 2 == 0:
            times_a.append(timed(fn_a))
            times_b.append(timed(fn_b))
        else:
            times_b.append(timed(fn_b))
            times_a.append(timed(fn_a))
        if k + 1 >= min(5, pairs) and sum(times_a) + sum(times_b) > budget_s:  # also with no warm-up pair
            break
    return times_a, times_b


def paired_ratio_row(times_small: list[float], times_official: list[float]) -> dict:
    """The paired figures of one batch size: medians (ms), their ratio official / small, and the
    quartiles of the per-pair ratios."""
    per_pair = np.asarray(times_official, float) / np.asarray(times_small, float)
    small, official = median(times_small), median(times_official)
    return dict(pairs=len(per_pair), small_ms_median=small * 1e3, official_ms_median=official * 1e3,
                ratio=official / small, ratio_q25=float(np.quantile(per_pair, 0.25)),
                ratio_q75=float(np.quantile(per_pair, 0.75)))


# ----------------------------------------------------------------------------------------------
# part 1: the network alone
# ----------------------------------------------------------------------------------------------


def _small_checkpoint(cfg: BenchConfig) -> str | None:
    if cfg.checkpoint:
        return cfg.checkpoint
    from .checkpoints import default_checkpoint_path

    path = default_checkpoint_path()
    return str(path) if path is not None and Path(path).is_file() else None


def _pam_model(preset: str, checkpoint: str | None):
    """(PAMModel, weights description). Speed does not depend on the weights' values."""
    from .checkpoints import InferenceParams, PAMModel, load_model
    from .network import PRESETS, PAMNetwork

    if checkpoint:
        model = load_model(checkpoint)
        # The preset's network, or the same network with the prior channel (one more input channel
        # on the first convolution: the same speed).
        same = preset in PRESETS and replace(model.config, name=preset, mask_prior=False) == PRESETS[preset]
        if not same and not (preset == "official" and model.kind == "official"):
            raise ValueError(f"checkpoint {checkpoint} holds the {model.config.name!r} network, not {preset!r}")
        return model, f"trained: {Path(checkpoint).name}"
    # Random official weights walk as the authors' checkpoint does (load_official: published_scheme).
    inference = InferenceParams(published_scheme=True) if preset == "official" else None
    return PAMModel.from_network(PAMNetwork(preset), inference=inference), "random"


def _disk(size: int) -> np.ndarray:
    yy, xx = np.ogrid[:size, :size]
    return (((yy - size / 2) / (size / 3)) ** 2 + ((xx - size / 2) / (size / 4)) ** 2 <= 1).astype(np.float32)


class _PamCall:
    """One PAM preset ready to time: a random guide slice with a disk mask (the inputs' values do
    not change the speed), and a factory of timed calls, each what ``PAMPredictor.predict`` runs on
    the network for one batch of query slices whose guide is already encoded."""

    def __init__(self, preset: str, checkpoint: str | None, gen):
        import torch

        self.model, self.weights = _pam_model(preset, checkpoint)
        self.stage, self.size, self.gen = self.model.network.proposing_stage, self.model.config.input_size, gen
        self.guide = torch.rand(1, 1, self.size, self.size, generator=gen) * 2 - 1
        self.mask = torch.from_numpy(_disk(self.size))[None, None]
        with torch.inference_mode():
            self.keys, self.values = self.encode_guide()

    def encode_guide(self):
        return self.stage.encode_guide(self.guide, self.mask)

    def batch_call(self, batch: int):
        """A zero-argument call decoding ``batch`` random query slices + ``fuse_scales``."""
        import torch

        from .network import fuse_scales

        queries = torch.rand(1, batch, 1, self.size, self.size, generator=self.gen) * 2 - 1

        def call():
            with torch.inference_mode():
                return fuse_scales(self.stage.decode_queries(queries, self.keys, self.values, self.mask).logits,
                                   self.size)

        return call


def _bench_pam_network(task: dict) -> list[dict]:
    import torch

    _set_threads(task["threads"])
    pam = _PamCall(task["preset"], task.get("checkpoint"), torch.Generator().manual_seed(0))
    rows = []
    with torch.inference_mode():
        guide_times = _time_calls(pam.encode_guide, task["warmup"], task["repeats"], task["budget_s"])
    for b in task["batch_sizes"]:
        times = _time_calls(pam.batch_call(b), task["warmup"], task["repeats"], task["budget_s"])
        med = median(times)
        rows.append(dict(model=f"pam-{task['preset']}", input_px=pam.size,
                         params_m=round(pam.model.network.n_parameters() / 1e6, 2), batch=b,
                         threads=task["threads"], repeats=len(times), batch_ms_median=med * 1e3,
                         batch_ms_min=min(times) * 1e3, per_slice_ms=med * 1e3 / b, slices_per_s=b / med,
                         guide_ms=median(guide_times) * 1e3, weights=pam.weights, status="ok",
                         note="decode_queries + fuse_scales; guide encoded once (guide_ms)"))
    peak = _maxrss_mb()
    for r in rows:
        r["peak_rss_mb"] = peak
    return rows


def _bench_pam_paired(task: dict) -> list[dict]:
    """Both PAM presets in this process, their per-batch calls alternated (``_time_pairs``)."""
    import torch

    _set_threads(task["threads"])
    gen = torch.Generator().manual_seed(0)
    small, official = (_PamCall(p, task["checkpoints"].get(p), gen) for p in ("small", "official"))
    rows = []
    for b in task["batch_sizes"]:
        ts, to = _time_pairs(small.batch_call(b), official.batch_call(b), max(task["warmup"], 1), task["pairs"],
                             task["budget_s"])
        rows.append(dict(batch=b, threads=task["threads"], weights=f"small {small.weights}; official {official.weights}",
                         status="ok", note="one process, calls alternated", **paired_ratio_row(ts, to)))
    return rows


def _build_sam2(image_size: int):
    """SAM 2 tiny from its packaged hydra config, random weights, CPU, eval.

    ``sam2.build_sam.build_sam2`` needs only hydra/omegaconf and the modeling code; torchvision
    is imported only by the image predictor's transforms and the automatic mask generator, which
    are not used here.
    """
    import torch  # noqa: F401
    from sam2.build_sam import build_sam2

    overrides = [] if image_size == 1024 else [f"++model.image_size={int(image_size)}"]
    return build_sam2(SAM2_CONFIG, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=overrides)


def _bench_sam2(task: dict) -> list[dict]:
    import torch

    _set_threads(task["threads"])
    size = int(task["image_size"])
    model = _build_sam2(size)
    assert model.image_size == size, (model.image_size, size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    gen = torch.Generator().manual_seed(0)
    guide = torch.randn(1, 3, size, size, generator=gen)
    mask = torch.from_numpy(_disk(size))[None, None]
    empty = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}

    def encode_guide():
        feats = model._prepare_backbone_features(model.forward_image(guide))
        _, vision, pos, sizes = feats
        return model.track_step(0, True, vision, pos, sizes, None, mask, empty, 2, run_mem_encoder=True)

    rows = []
    with torch.inference_mode():
        guide_times = _time_calls(encode_guide, task["warmup"], task["repeats"], task["budget_s"])
        memory = encode_guide()
        for b in task["batch_sizes"]:
            cond = {
                "maskmem_features": memory["maskmem_features"].expand(b, -1, -1, -1),
                "maskmem_pos_enc": [p.expand(b, -1, -1, -1) for p in memory["maskmem_pos_enc"]],
                "obj_ptr": memory["obj_ptr"].expand(b, -1),
            }
            bank = {"cond_frame_outputs": {0: cond}, "non_cond_frame_outputs": {}}
            frames = torch.randn(b, 3, size, size, generator=gen)

            def call():
                _, vision, pos, sizes = model._prepare_backbone_features(model.forward_image(frames))
                out = model.track_step(1, False, vision, pos, sizes, None, None, bank, 2, run_mem_encoder=False)
                return out["pred_masks_high_res"]

            times = _time_calls(call, task["warmup"], task["repeats"], task["budget_s"])
            med = median(times)
            native = "config's own input size" if size == 1024 else "image_size overridden (not the target)"
            rows.append(dict(model=f"sam2-tiny@{size}", input_px=size, params_m=round(params, 2), batch=b,
                             threads=task["threads"], repeats=len(times), batch_ms_median=med * 1e3,
                             batch_ms_min=min(times) * 1e3, per_slice_ms=med * 1e3 / b, slices_per_s=b / med,
                             guide_ms=median(guide_times) * 1e3, weights="random", status="ok",
                             note=f"forward_image + track_step vs 1 memory frame, no per-frame memory encoder; "
                                  f"{native}"))
    peak = _maxrss_mb()
    for r in rows:
        r["peak_rss_mb"] = peak
    return rows


def _sam2_unavailable_reason() -> str | None:
    """Why SAM 2 cannot be built here (checked in a subprocess so a failure costs nothing)."""
    try:
        import importlib.util

        if importlib.util.find_spec("sam2") is None:
            return "the sam2 package is not installed (pip install --no-deps sam2 hydra-core iopath)"
    except (ImportError, ValueError) as exc:
        return f"sam2 cannot be found: {exc}"
    return None


def run_network_part(cfg: BenchConfig, log=print) -> list[dict]:
    rows: list[dict] = []
    common = dict(threads=cfg.threads, warmup=cfg.warmup, repeats=cfg.repeats, budget_s=cfg.budget_s,
                  batch_sizes=list(cfg.batch_sizes))
    for preset in cfg.presets:
        ckpt = _small_checkpoint(cfg) if preset == "small" else (cfg.official_checkpoint if preset == "official" else None)
        log(f"[network] pam-{preset} ({'weights ' + Path(ckpt).name if ckpt else 'random weights'}) ...")
        rows += _isolated_rows("pam_network", dict(common, preset=preset, checkpoint=ckpt), cfg,
                               dict(model=f"pam-{preset}", weights="trained" if ckpt else "random"))
    if cfg.sam2:
        reason = _sam2_unavailable_reason()
        for size in cfg.sam2_sizes:
            if reason:
                rows += [dict(model=f"sam2-tiny@{size}", input_px=size, batch=b, threads=cfg.threads,
                              status="not measurable here", note=reason) for b in cfg.batch_sizes]
                continue
            log(f"[network] sam2-tiny at {size} px (random weights) ...")
            rows += _isolated_rows("sam2", dict(common, image_size=size), cfg,
                                   dict(model=f"sam2-tiny@{size}", input_px=size, weights="random"))
    return rows


def run_paired_part(cfg: BenchConfig, log=print) -> list[dict]:
    """The small/official ratio measured in one process with alternated calls (needs both presets)."""
    if not {"small", "official"} <= set(cfg.presets):
        return []
    checkpoints = {"small": _small_checkpoint(cfg), "official": cfg.official_checkpoint}
    log(f"[network] pam-small vs pam-official, paired ({cfg.pairs} pairs per batch size) ...")
    task = dict(threads=cfg.threads, warmup=cfg.warmup, pairs=cfg.pairs, budget_s=cfg.budget_s,
                batch_sizes=list(cfg.batch_sizes), checkpoints=checkpoints)
    return _isolated_rows("pam_paired", task, cfg, dict(batch=None, threads=cfg.threads))


# ----------------------------------------------------------------------------------------------
# part 2: end to end
# ----------------------------------------------------------------------------------------------


def synthetic_ct(depth: int, size: int, object_slices: int, seed: int = 0):
    """A CT-like (k, j, i) int16 volume with an ellipsoid-ish object on exactly ``object_slices``
    consecutive slices (centred along k), its mask, and the prompt (the object's middle slice).

    Returns (image int16, truth uint8, prompt uint8, (first, last, prompt_slice)).
    """
    if not 1 <= object_slices <= depth:
        raise ValueError(f"an object of {object_slices} slices does not fit in {depth} slices")
    rng = np.random.default_rng(seed)
    yy, xx = np.ogrid[:size, :size]
    c = size / 2.0
    body = ((yy - c) / (0.44 * size)) ** 2 + ((xx - c) / (0.37 * size)) ** 2 <= 1
    spine = ((yy - 0.72 * size) / (0.05 * size)) ** 2 + ((xx - c) / (0.05 * size)) ** 2 <= 1
    base = np.where(body, 40.0, -1000.0).astype(np.float32)
    base[spine] = 600.0
    first = (depth - object_slices) // 2
    last = first + object_slices - 1
    mid = (first + last) // 2
    image = np.empty((depth, size, size), dtype=np.int16)
    truth = np.zeros((depth, size, size), dtype=np.uint8)
    ry, rx = 0.09 * size, 0.07 * size
    half = max(object_slices / 2.0, 1.0)
    for k in range(depth):
        sl = base + rng.standard_normal((size, size), dtype=np.float32) * 15.0
        if first <= k <= last:
            t = (k + 0.5 - (first + last + 1) / 2.0) / half
            f = max(math.sqrt(max(1.0 - t * t, 0.0)), 0.3)
            cy = c - 0.12 * size + 0.02 * size * math.sin(k / 7.0)
            cx = c + 0.1 * size + 0.02 * size * math.cos(k / 9.0)
            obj = ((yy - cy) / (ry * f)) ** 2 + ((xx - cx) / (rx * f)) ** 2 <= 1
            sl[obj] += 80.0
            truth[k] = obj
        image[k] = np.clip(sl, -1024, 3071)
    prompt = np.zeros_like(truth)
    prompt[mid] = truth[mid]
    return image, truth, prompt, (first, last, mid)


def _write_case(directory: Path, depth: int, size: int, object_slices: int, spacing, fmt: str) -> dict:
    from .volumes import Volume, write_labelmap, write_volume

    image, truth, prompt, (first, last, mid) = synthetic_ct(depth, size, object_slices)
    grid = Volume(image, tuple(float(s) for s in spacing), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    stem = directory / f"ct_{depth}x{size}_obj{object_slices}"
    paths = {"image": f"{stem}_image{fmt}", "prompt": f"{stem}_prompt{fmt}", "truth": f"{stem}_truth{fmt}"}
    write_volume(grid, paths["image"])
    write_labelmap(prompt, grid, paths["prompt"])
    write_labelmap(truth, grid, paths["truth"])
    return dict(paths, first=first, last=last, prompt_slice=mid)


def _worker_e2e(task: dict) -> dict:
    _set_threads(task["threads"])
    import torch  # noqa: F401

    from .metrics import dice
    from .propagate import propagate
    from .volumes import read_labelmap, read_volume, write_labelmap

    t0 = time.perf_counter()
    model, weights = _pam_model(task["preset"], task.get("checkpoint"))
    model_s = time.perf_counter() - t0
    baseline = _status_mb("VmRSS") or _maxrss_mb()
    peak_before = _status_mb("VmHWM") or _maxrss_mb()
    reset = _reset_peak_rss()

    t0 = time.perf_counter()
    image = read_volume(task["image"])
    prompt = read_labelmap(task["prompt"], reference=image)
    t1 = time.perf_counter()
    fixed = task["mode"] == "fixed"
    result = propagate(image.array, prompt.array, image.spacing, model, axis=0,
                       range=(task["first"], task["last"]) if fixed else None, early_stop=not fixed,
                       batch_size=task["batch_size"], threads=task["threads"])
    t2 = time.perf_counter()
    write_labelmap(result.mask, image, task["output"])
    t3 = time.perf_counter()
    run_peak = _status_mb("VmHWM") if reset else None
    peak = max(peak_before, _status_mb("VmHWM") or 0.0, _maxrss_mb())

    trained = weights != "random"
    score = None
    if trained:  # after the timed region; with random weights a Dice means nothing
        truth = read_labelmap(task["truth"], reference=image).array > 0
        score = float(dice(result.mask > 0, truth))
    tm = result.timings
    return dict(
        preset=task["preset"], mode=task["mode"], depth=task["depth"], size=task["size"],
        object_slices=task["object_slices"], slices_predicted=result.n_predicted, model_s=model_s,
        read_s=t1 - t0, propagate_s=t2 - t1, predict_s=tm.get("predict"), postprocess_s=tm.get("postprocess"),
        engine_overhead_s=(t2 - t1) - tm.get("predict", 0.0) - tm.get("postprocess", 0.0), write_s=t3 - t2,
        wall_s=t3 - t0, baseline_rss_mb=baseline, peak_rss_mb=peak, run_peak_rss_mb=run_peak, dice=score,
        weights=weights, status="ok",
        note=("range = object extent, early_stop off" if fixed else "default stopping rule")
        + ("" if reset else "; VmHWM reset unavailable: peak includes model loading"),
    )


def _e2e_cases(cfg: BenchConfig) -> list[tuple[int, int]]:
    cases = [(d, o) for d in cfg.depths for o in cfg.objects if o <= d - 4]
    for case in cfg.extra_cases:
        if case not in cases and case[1] <= case[0]:
            cases.append(tuple(case))
    return sorted(cases)


def run_e2e_part(cfg: BenchConfig, work: Path, log=print) -> list[dict]:
    rows: list[dict] = []
    small_ckpt = _small_checkpoint(cfg)
    cases = _e2e_cases(cfg)
    for depth, obj in cases:
        log(f"[e2e] writing synthetic CT {cfg.size}x{cfg.size}x{depth}, object {obj} slices ...")
        case = _write_case(work, depth, cfg.size, obj, cfg.spacing, cfg.file_format)
        for preset in cfg.e2e_presets:
            ckpt = small_ckpt if preset == "small" else (cfg.official_checkpoint if preset == "official" else None)
            modes = ["fixed"] + (["honest"] if ckpt else [])
            for mode in modes:
                task = dict(case, preset=preset, mode=mode, depth=depth, size=cfg.size, object_slices=obj,
                            checkpoint=ckpt, threads=cfg.threads, batch_size=cfg.batch_size,
                            output=str(work / f"out_{preset}_{mode}_{depth}_{obj}{cfg.file_format}"))
                log(f"[e2e]   {preset} {mode} ...")
                got = _isolated_rows("e2e", task, cfg, dict(preset=preset, mode=mode, depth=depth, size=cfg.size,
                                                            object_slices=obj))
                rows += got
                Path(task["output"]).unlink(missing_ok=True)
        for key in ("image", "prompt", "truth"):
            Path(case[key]).unlink(missing_ok=True)
    return rows


# ----------------------------------------------------------------------------------------------
# part 3: the Slicer path
# ----------------------------------------------------------------------------------------------


def _stub_predictor():
    """A predictor with no network: the guide's mask is the answer on every query slice."""
    from .propagate import SlicePrediction, SlicePredictor

    class GuideCopy(SlicePredictor):
        def predict(self, volume, guide_index, guide_mask, query_indices):
            prob = np.broadcast_to(guide_mask.astype(np.float32), (len(query_indices),) + guide_mask.shape)
            return SlicePrediction(np.array(prob))

    return GuideCopy()


def _mrml_scene(slicer):
    """A scene with the logics slicer.util needs (PAMSegmentLib.mrml.headless_scene)."""
    from .mrml import headless_scene

    return headless_scene()


def _worker_slicer(task: dict) -> list[dict]:
    _set_threads(task["threads"])
    import slicer
    import vtk

    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)  # the scene has no colour files: noise

    from . import mrml
    from .propagate import propagate

    depth, size, obj = task["depth"], task["size"], task["object_slices"]
    scene, _app, _logics = _mrml_scene(slicer)  # noqa: F841 - keep the logics alive
    image, truth, prompt, (first, last, mid) = synthetic_ct(depth, size, obj)
    del truth
    volume_node = slicer.util.addVolumeFromArray(image, name="ct")
    volume_node.SetSpacing(*reversed(task["spacing"]))
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    sid = seg.GetSegmentation().AddEmptySegment("", "object", [0.9, 0.2, 0.1])
    rows = []

    def step(name, fn, note=""):
        t0 = time.perf_counter()
        out = fn()
        rows.append(dict(step=name, seconds=time.perf_counter() - t0, depth=depth, size=size, note=note))
        return out

    step("setup: prompt -> segment (updateSegmentBinaryLabelmapFromArray)",
         lambda: slicer.util.updateSegmentBinaryLabelmapFromArray(prompt, seg, sid, volume_node),
         "scene setup, the user's drawing")
    arr, grid = step("volume node -> array in its own type (mrml.volume_array)", lambda: mrml.volume_array(volume_node))
    prm = step("segment -> uint8 array on the volume grid (mrml.segment_mask)",
               lambda: mrml.segment_mask(seg, sid, volume_node))
    if hasattr(mrml, "_prompt_info"):
        step("prompt slices + plane (mrml._prompt_info)", lambda: mrml._prompt_info(prm, grid))
    stub = _stub_predictor()
    result = step("engine without network (propagate, stub predictor)",
                  lambda: propagate(arr, prm, grid.spacing, stub, axis=0, range=(first, last), early_stop=False,
                                    batch_size=task["batch_size"], threads=task["threads"]),
                  f"{last - first} slices, object extent")
    rows[-1]["note"] += f"; of which stub predict {result.timings.get('predict', 0.0):.3f} s"
    mask = result.mask > 0
    step("result -> segment (mrml.write_segment_mask)",
         lambda: mrml.write_segment_mask(mask, grid, seg, sid, volume_node), "replace, one segmentation-logic call")
    sid2 = seg.GetSegmentation().AddEmptySegment("", "object util", [0.1, 0.7, 0.3])
    step("result -> new segment (slicer.util.updateSegmentBinaryLabelmapFromArray)",
         lambda: slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), seg, sid2, volume_node),
         "for comparison")

    # The whole job as the module runs it: copy out (main thread), run (worker), apply (main thread).
    if hasattr(mrml, "SegmentPropagation"):
        sid3 = seg.GetSegmentation().AddEmptySegment("", "job", [0.2, 0.3, 0.9])
        slicer.util.updateSegmentBinaryLabelmapFromArray(prompt, seg, sid3, volume_node)
        if hasattr(mrml, "describe_prompt"):
            step("panel: prompt line (mrml.describe_prompt)", lambda: mrml.describe_prompt(volume_node, seg, sid3),
                 "on each selection or edit of the segment")
        base = _status_mb("VmRSS")
        reset = _reset_peak_rss()
        job = step("job: SegmentPropagation.__init__ (node/segment -> arrays, prompt check)",
                   lambda: mrml.SegmentPropagation(volume_node, seg, sid3, mode="replace", model=stub,
                                                   range=(first, last), batch_size=task["batch_size"],
                                                   threads=task["threads"], memory_check=False))
        step("job: run (engine, stub predictor)", job.run)
        if job.state != "finished":
            rows[-1]["note"] = f"job {job.state}: {job.error}"
        else:
            history = mrml.PropagationHistory()
            step("job: apply (scene check incl. re-read of the segment + write)", lambda: job.apply(history=history))
            peak = _status_mb("VmHWM")
            entry = history.get(seg, sid3)

            def edits_check():
                mask = mrml.segment_mask(seg, sid3, volume_node, check_memory="reading the segment")
                return entry.edited_slices(mask)

            step("panel: edits check after the write (mrml.segment_mask + HistoryEntry.edited_slices)", edits_check,
                 "the prompt line's, after each write and edit")
            if reset and base is not None and peak is not None:
                # what Slicer must have free for the job: its estimate, and the copy it held when checked
                estimate = (mrml.job_memory_bytes(arr.shape, 0, [mid], network=None) + arr.nbytes) / 2**20
                rows.append(dict(step="job: peak memory added to the process (init + run + apply)", seconds=None,
                                 depth=depth, size=size,
                                 note=f"{peak - base:.0f} MB = {(peak - base) * 2**20 / arr.size:.1f} bytes a voxel "
                                      f"of {arr.dtype}; the Logic's estimate + the volume's copy {estimate:.0f} MB"))
    return rows


def run_slicer_part(cfg: BenchConfig, log=print) -> list[dict]:
    try:
        import importlib.util

        missing = importlib.util.find_spec("slicer") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        return [dict(step="slicer path", seconds=None, depth=cfg.slicer_depth, size=cfg.size,
                     note="not measurable here: slicer-core is not installed (pip install slicer-core)")]
    log(f"[slicer] MRML nodes {cfg.size}x{cfg.size}x{cfg.slicer_depth}, object {cfg.slicer_object} slices ...")
    task = dict(depth=cfg.slicer_depth, size=cfg.size, object_slices=cfg.slicer_object, threads=cfg.threads,
                spacing=list(cfg.spacing), batch_size=cfg.batch_size)
    return _isolated_rows("slicer", task, cfg, dict(step="slicer path", depth=cfg.slicer_depth, size=cfg.size),
                          error_key="note")


# ----------------------------------------------------------------------------------------------
# subprocess isolation
# ----------------------------------------------------------------------------------------------

WORKERS = {"pam_network": _bench_pam_network, "pam_paired": _bench_pam_paired, "sam2": _bench_sam2, "e2e": _worker_e2e, "slicer": _worker_slicer}


def _isolated_rows(kind: str, task: dict, cfg: BenchConfig, on_error: dict, error_key: str = "status") -> list[dict]:
    """Run WORKERS[kind](task) in a fresh Python process with cfg.threads threads; rows back as JSON.

    With ``cfg.isolate`` off the worker runs in this process (quick mode): same rows, but memory
    figures are this process's."""
    if not cfg.isolate:
        import torch

        threads = torch.get_num_threads()
        try:
            got = json.loads(json.dumps(WORKERS[kind](task), default=_json_default))
        except Exception as exc:  # noqa: BLE001 - one failed measurement must not stop the others
            return [dict(on_error, **{error_key: f"error: {type(exc).__name__}: {str(exc)[:300]}"})]
        finally:
            torch.set_num_threads(threads)
        rows = got if isinstance(got, list) else [got]
        for r in rows:
            if "peak_rss_mb" in r:
                r["note"] = ((r.get("note") or "") + "; in-process (memory not isolated)").lstrip("; ")
        return rows
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(cfg.threads)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "PAMSegmentLib.benchmark", "--worker", kind, json.dumps(task)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return [dict(on_error, **{error_key: f"error: timed out after {cfg.timeout_s:.0f} s"})]
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            got = json.loads(line[len(RESULT_TAG):])
            return got if isinstance(got, list) else [got]
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return [dict(on_error, **{error_key: f"error (exit {proc.returncode}): {tail[:300]}"})]


def _worker_main(kind: str, payload: str) -> int:
    task = json.loads(payload)
    rows = WORKERS[kind](task)
    print(RESULT_TAG + json.dumps(rows, default=_json_default), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# targets, tables, files
# ----------------------------------------------------------------------------------------------


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _by(rows, **match):
    return [r for r in rows if r.get("status", "ok") == "ok" and all(r.get(k) == v for k, v in match.items())]


def evaluate_targets(result: dict) -> list[dict]:
    """Issue 5's targets, from the figures (nothing is asserted; ``met`` is True/False/None)."""
    net, e2e = result.get("network", []), result.get("end_to_end", [])
    out = []
    batches = sorted({r["batch"] for r in _by(net, model="pam-small")})

    isolated = (result.get("config") or {}).get("isolate", True)

    def ratio(other: str, goal: float, label: str):
        for b in batches:
            a, o = _by(net, model="pam-small", batch=b), _by(net, model=other, batch=b)
            if a and o:
                v = a[0]["slices_per_s"] / o[0]["slices_per_s"]
                # (unrounded: the tables round once; 11.2519 stored as 11.25 was printed 11.2)
                out.append(dict(target=f"default/{label} throughput, batch {b}", value=v,
                                goal=f">= {goal:g}x", met=bool(v >= goal),
                                note=("timed in separate processes (section 1)" if isolated
                                      else "timed one after the other in one process (section 1)")))
        if not any(r["model"] == other for r in _by(net)):
            why = next((f"{r.get('status')}: {r.get('note') or ''}" for r in net if r.get("model") == other),
                       f"{other} not measured in this run")
            out.append(dict(target=f"default/{label} throughput", value=None, goal=f">= {goal:g}x", met=None,
                            note=why))

    ratio("pam-official", OFFICIAL_SPEEDUP_GOAL, "official")
    for r in _by(result.get("paired") or []):
        out.append(dict(target=f"default/official throughput, batch {r['batch']}, paired (one process, alternated)",
                        value=r["ratio"], goal=f">= {OFFICIAL_SPEEDUP_GOAL:g}x",
                        met=bool(r["ratio"] >= OFFICIAL_SPEEDUP_GOAL),
                        note=f"{r['pairs']} pair{'s' if r['pairs'] != 1 else ''}; per-pair ratio quartiles "
                             f"{r['ratio_q25']:.2f}-{r['ratio_q75']:.2f}"))
    ratio("sam2-tiny@1024", 5, "SAM 2 tiny")
    for preset in ("small", "official"):
        for mode in ("honest", "fixed"):
            rows = _by(e2e, preset=preset, mode=mode, depth=200, object_slices=100)
            if not rows:
                continue
            r = rows[0]
            tag = f"{preset} ({'default' if preset == 'small' else 'official'}) {mode}, 100-slice object in 512x512x200"
            if r["size"] != 512:
                tag = tag.replace("512x512x200", f"{r['size']}x{r['size']}x200")
            if preset == "small":
                out.append(dict(target=f"{tag}: wall s (read+propagate+write)", value=r["wall_s"],
                                goal="< 5 s", met=bool(r["wall_s"] < 5)))
            out.append(dict(target=f"{tag}: peak RSS MB", value=r["peak_rss_mb"], goal="< 2048 MB",
                            met=bool(r["peak_rss_mb"] < 2048)))
    return out


def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _table(rows: list[dict], columns: list[str], markdown: bool = False) -> str:
    if not rows:
        return "(none)"
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


NET_SHOW = ["model", "input_px", "params_m", "batch", "repeats", "batch_ms_median", "per_slice_ms", "slices_per_s",
            "guide_ms", "peak_rss_mb", "weights", "status"]
E2E_SHOW = ["preset", "mode", "depth", "object_slices", "slices_predicted", "model_s", "read_s", "propagate_s",
            "predict_s", "engine_overhead_s", "postprocess_s", "write_s", "wall_s", "peak_rss_mb", "run_peak_rss_mb",
            "dice", "weights", "status"]


def report_text(result: dict, markdown: bool = False) -> str:
    m = result["machine"]
    cfg = result["config"]
    head = "## " if markdown else "== "
    parts = [
        f"{head}Machine",
        f"CPU: {m['cpu']}; {m['cores']} cores ({m['usable_cores']} usable), {m.get('memory_gb')} GB; "
        f"torch {m['torch']} on {m['torch_threads']} threads; numpy {m['numpy']}; Python {m['python']}; "
        f"sam2 {m.get('sam2') or 'not installed'}; load average at start {m.get('load_average')}; {m['date']}",
        f"Command: `{cfg.get('command') or 'pamsegment benchmark'}`" + (" (quick smoke mode: tiny sizes)" if cfg["quick"] else ""),
    ]
    if result.get("network") is not None:
        parts += ["", f"{head}1. Network alone (median of repeats after warm-up, torch.inference_mode)",
                  _table(result["network"], NET_SHOW, markdown)]
        notes = sorted({f"{r['model']}: {r['note']}" for r in result["network"] if r.get("note")})
        parts += [("- " if markdown else "  ") + n for n in notes]
    if result.get("paired"):
        parts += ["", f"{head}1b. Default vs official, paired: one process, calls alternated; "
                      f"ratio = median official ms / median small ms",
                  _table(result["paired"], PAIRED_COLUMNS, markdown)]
    if result.get("end_to_end") is not None:
        isolated = cfg.get("isolate", True)  # off with --quick or --in-process: every row in this one process
        parts += ["", f"{head}2. End to end ("
                      + ("fresh process per row" if isolated else "every row in the benchmark's own process")
                      + "; read + propagate + write = wall_s; model_s separate; "
                      + ("peak RSS of the whole process" if isolated
                         else "peak RSS of that process so far, earlier rows included")
                      + ", run_peak after imports + model load)",
                  _table(result["end_to_end"], E2E_SHOW, markdown)]
        parts += _scaling_lines(result["end_to_end"], markdown)
    if result.get("slicer") is not None:
        parts += ["", f"{head}3. Slicer path on slicer-core MRML nodes (no network)",
                  _table(result["slicer"], SLICER_COLUMNS, markdown)]
    if cfg["quick"]:  # tiny sizes: the figures exercise the code, they do not measure the targets
        parts += ["", f"{head}Targets: not judged in quick smoke mode (tiny sizes); run `pamsegment benchmark` "
                      "without --quick for them (targets.csv keeps this run's raw figures)"]
    else:
        parts += ["", f"{head}Targets (the project's speed and memory goals)",
                  _table(result["targets"], TARGET_COLUMNS, markdown)]
    return "\n".join(parts)


def _scaling_lines(rows: list[dict], markdown: bool) -> list[str]:
    """How propagate time grows with object length (fixed volume) and with volume size (fixed object)."""
    out = []
    bullet = "- " if markdown else "  "
    for preset in sorted({r["preset"] for r in _by(rows)}):
        fixed = _by(rows, preset=preset, mode="fixed")
        for depth in sorted({r["depth"] for r in fixed}):
            pts = sorted((r["object_slices"], r["propagate_s"]) for r in fixed if r["depth"] == depth)
            if len(pts) > 1:
                out.append(f"{bullet}{preset}, volume depth {depth}: propagate s by object length "
                           + ", ".join(f"{o}: {s:.2f}" for o, s in pts)
                           + f" ({_per_slice(pts)} s per extra object slice)")
        for obj in sorted({r["object_slices"] for r in fixed}):
            pts = sorted((r["depth"], r["propagate_s"]) for r in fixed if r["object_slices"] == obj)
            if len(pts) > 1:
                out.append(f"{bullet}{preset}, object {obj} slices: propagate s by volume depth "
                           + ", ".join(f"{d}: {s:.2f}" for d, s in pts)
                           + f" ({_per_slice(pts)} s per extra volume slice)")
    return out


def _per_slice(pts) -> str:
    x = np.array([p[0] for p in pts], float)
    y = np.array([p[1] for p in pts], float)
    if np.ptp(x) == 0:
        return "-"
    return f"{np.polyfit(x, y, 1)[0]:.4f}"


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    for model in sorted({r["model"] for r in _by(result.get("network") or [])}):
        pts = sorted((r["batch"], r["per_slice_ms"]) for r in _by(result["network"], model=model))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=model)
    batches = sorted({r["batch"] for r in _by(result.get("network") or [])})
    if batches:
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (query slices per call)")
    ax.set_ylabel("ms per slice (median)")
    ax.set_yscale("log")
    ax.set_title(f"1. network alone, {result['machine']['torch_threads']} threads")
    if ax.get_legend_handles_labels()[0]:  # a part not measured: no "no artists" warning
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1]
    e2e = result.get("end_to_end") or []
    for preset in sorted({r["preset"] for r in _by(e2e)}):
        fixed = _by(e2e, preset=preset, mode="fixed")
        for depth in sorted({r["depth"] for r in fixed}):
            pts = sorted((r["object_slices"], r["propagate_s"]) for r in fixed if r["depth"] == depth)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if preset == "small" else "s--",
                    label=f"{preset}, depth {depth}")
    ax.set_xlabel("object length (slices predicted)")
    ax.set_ylabel("propagate seconds")
    ax.set_yscale("log")
    ax.set_title("2. end to end: time follows the object")
    if ax.get_legend_handles_labels()[0]:  # a part not measured: no "no artists" warning
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")

    ax = axes[2]
    rows = [r for r in _by(e2e) if r["mode"] == "fixed"]
    labels = [f"{r['preset'][:5]} {r['depth']}/{r['object_slices']}" for r in rows]
    ax.barh(range(len(rows)), [r["read_s"] for r in rows], label="read", color="tab:gray")
    left = np.array([r["read_s"] for r in rows])
    for key, color in (("propagate_s", "tab:blue"), ("write_s", "tab:orange")):
        vals = np.array([r[key] for r in rows])
        ax.barh(range(len(rows)), vals, left=left, label=key[:-2], color=color)
        left = left + vals
    for i, r in enumerate(rows):
        ax.text(left[i], i, f" {r['peak_rss_mb']:.0f} MB", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_xlabel("seconds (bar) and peak RSS (label)")
    ax.set_title("2. wall time split (preset depth/object)")
    if ax.get_legend_handles_labels()[0]:  # a part not measured: no "no artists" warning
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: Path, after=None, keep_ctrl_c_ignored: bool = False) -> dict:
    """The tables, report, plot and JSON, put in place together (``volumes.replace_together``: each
    written to a temporary first, then moved in with Ctrl-C held off, a link kept a link): an
    interrupt while they were written one by one (the plot alone takes 2 s) left new tables beside
    an older run's JSON and plot, after "nothing was written". ``after(result)`` runs once they are
    in, within the same shield (printing the report: a Ctrl-C there said "nothing was written")."""
    import io

    from .volumes import replace_together

    out.mkdir(parents=True, exist_ok=True)
    files, outputs = {}, []
    for key, name, cols in (("network", "network.csv", NETWORK_COLUMNS), ("paired", "paired.csv", PAIRED_COLUMNS),
                            ("end_to_end", "end_to_end.csv", E2E_COLUMNS),
                            ("slicer", "slicer.csv", SLICER_COLUMNS), ("targets", "targets.csv", TARGET_COLUMNS)):
        if result.get(key) is not None:
            outputs.append((out / name, ".csv", lambda tmp, rows=result[key], cols=cols: _write_csv(tmp, rows, cols)))
            files[key] = str(out / name)
    markdown = "# PAMSegment benchmark\n\n" + report_text(result, markdown=True) + "\n"
    outputs.append((out / "benchmark.md", ".md", lambda tmp: tmp.write_text(markdown, encoding="utf-8")))
    files["markdown"] = str(out / "benchmark.md")
    try:  # drawn before anything is written: a plot failure must not lose the numbers
        png = io.BytesIO()
        _plot(result, png)
        outputs.append((out / "benchmark.png", ".png", lambda tmp: tmp.write_bytes(png.getvalue())))
        files["plot"] = str(out / "benchmark.png")
    except Exception as exc:  # noqa: BLE001
        files["plot_error"] = f"{type(exc).__name__}: {exc}"
    files["json"] = str(out / "benchmark.json")
    result["files"] = files
    text = json.dumps(result, indent=2, default=_json_default)
    outputs.append((out / "benchmark.json", ".json", lambda tmp: tmp.write_text(text, encoding="utf-8")))
    replace_together(outputs, keep_ctrl_c_ignored=keep_ctrl_c_ignored,
                     after=(lambda: after(result)) if after is not None else None)
    return files


def run_benchmark(cfg: BenchConfig, log=print, after=None, keep_ctrl_c_ignored: bool = False) -> dict:
    """Run the selected parts; returns the result dict (also written to cfg.out; ``after(result)``
    runs once the files are in place, see ``write_outputs``)."""
    result: dict = {"machine": machine_info(cfg.threads), "config": asdict(cfg)}
    if "network" in cfg.parts:
        result["network"] = run_network_part(cfg, log)
        result["paired"] = run_paired_part(cfg, log)
    if "e2e" in cfg.parts:
        with tempfile.TemporaryDirectory(prefix="pamsegment_bench_") as tmp:
            result["end_to_end"] = run_e2e_part(cfg, Path(tmp), log)
    if "slicer" in cfg.parts:
        result["slicer"] = run_slicer_part(cfg, log)
    result["targets"] = evaluate_targets(result)
    write_outputs(result, Path(cfg.out), after, keep_ctrl_c_ignored)
    return result


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))  # 1,1: one row, not two
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in ALL_PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"parts are {', '.join(ALL_PARTS)} (comma-separated), got {text!r}")
    return parts


SCRATCH_OUT = "benchmark_out"  # where a partial or quick run writes unless --out says otherwise
# Options that change what is measured (each sets the BenchConfig field of its name): with any of
# them a run is not the published full run.
SIZE_OPTIONS = ("batch_sizes", "repeats", "warmup", "pairs", "depths", "objects", "size", "sam2_sizes")


def _weights_changed(args: argparse.Namespace) -> list[str]:
    """What makes this run's weights other than the published run's: the shipped pam_small.pt for
    the small preset and random weights for the official one (empty when they are those)."""
    from .checkpoints import default_checkpoint_path, shipped_checkpoint_path

    given = ["--official-checkpoint"] if args.official_checkpoint else []
    small = args.checkpoint or default_checkpoint_path()
    shipped = shipped_checkpoint_path()
    if small is None or not Path(small).is_file():
        return given + [f"random weights for the small preset ({small or 'the shipped pam_small.pt'} is missing)"]
    try:
        same = shipped is not None and os.path.samefile(small, shipped)
    except OSError:
        same = False
    if not same:
        given.append(f"--checkpoint {args.checkpoint}" if args.checkpoint else f"PAMSEGMENT_MODEL={small}")
    return given


def partial_options(args: argparse.Namespace) -> list[str]:
    """What makes this run other than the full run whose tables docs/benchmark holds (empty for
    a full run): --quick, some parts only, other sizes or repeats, --threads other than the
    published run's 2, and other weights."""
    given = ["--quick"] if args.quick else []
    if args.parts is not None and set(args.parts) != set(ALL_PARTS):
        given.append("--parts " + ",".join(args.parts))
    given += ["--" + name.replace("_", "-") for name in SIZE_OPTIONS if getattr(args, name, None) is not None]
    if args.no_sam2:
        given.append("--no-sam2")
    if args.isolate is False:
        given.append("--in-process")
    if args.threads != BenchConfig.threads:
        given.append(f"--threads {args.threads}")
    return given + _weights_changed(args)


def add_benchmark_arguments(p: argparse.ArgumentParser, default_out: str = "docs/benchmark") -> None:
    from .cli import _positive_int, _thread_count, number_type

    non_negative = number_type(int, lambda v: v >= 0, "a whole number of 0 or more")

    p.add_argument("-o", "--out", "--output", dest="out", default=None, metavar="DIR",
                   help=f"output folder (default: {default_out} for a full run; ./{SCRATCH_OUT} for a run with "
                        "--quick, --parts, an option that changes what is measured, --threads other than 2 or other "
                        "weights than the shipped ones, so that it never mixes into the published tables)")
    p.set_defaults(_default_out=default_out)
    p.add_argument("--threads", type=_thread_count, default=2, metavar="N",
                   help="torch CPU threads for every measurement (default: 2)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run in seconds")
    p.add_argument("--parts", type=_parts, default=None, metavar="LIST",
                   help=f"the parts to run, comma-separated: any of {','.join(ALL_PARTS)} (default: all)")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="weights of the small (default) preset (default: $PAMSEGMENT_MODEL if set, else the shipped "
                        "weights; random weights and no honest end-to-end runs if that file is missing)")
    p.add_argument("--official-checkpoint", default=None, metavar="CKPT",
                   help="the authors' propmask.pth, for honest official runs")
    p.add_argument("--batch-sizes", type=_int_list, default=None, metavar="LIST",
                   help="network part batch sizes, comma-separated (default: 1,4,8,16)")
    p.add_argument("--repeats", type=_positive_int, default=None, metavar="N",
                   help="timed repeats per network figure (default: 5)")
    p.add_argument("--warmup", type=non_negative, default=None, metavar="N",
                   help="warm-up calls before timing (default: 2)")
    p.add_argument("--pairs", type=_positive_int, default=None, metavar="N",
                   help="alternated small/official call pairs per batch size for the paired ratio (default: 40)")
    p.add_argument("--depths", type=_int_list, default=None, metavar="LIST",
                   help="end-to-end volume depths in slices, comma-separated (default: 100,200,400)")
    p.add_argument("--objects", type=_int_list, default=None, metavar="LIST",
                   help="end-to-end object lengths in slices, comma-separated (default: 20,80,160)")
    p.add_argument("--size", type=_positive_int, default=None, metavar="PX",
                   help="in-plane size of the synthetic volumes in pixels (default: 512)")
    p.add_argument("--no-sam2", action="store_true", help="skip SAM 2 tiny")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                       help="run every measurement in a fresh subprocess (the default, except with --quick)")
    where.add_argument("--in-process", dest="isolate", action="store_false",
                       help="run the measurements in this process (faster; memory figures not per configuration)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run even when the largest end-to-end volume needs more memory than this machine has")
    p.add_argument("--sam2-sizes", type=_int_list, default=None, metavar="LIST",
                   help="SAM 2 input sizes, comma-separated (default: 1024,512; 1024 is its config's own and the "
                        "target's)")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = quick_config() if args.quick else BenchConfig()
    out = args.out
    if out is None:
        published = getattr(args, "_default_out", "docs/benchmark")
        # The published tables' folder only in a checkout that has it (an installed package run from
        # any folder would otherwise make ./docs/benchmark there).
        out = SCRATCH_OUT if partial_options(args) or not Path(published).is_dir() else published
    cfg.out, cfg.threads = out, max(int(args.threads), 1)
    for name in ("parts", *SIZE_OPTIONS, "checkpoint", "official_checkpoint"):  # options named as the fields
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    if args.no_sam2:
        cfg.sam2 = False
    if args.isolate is not None:
        cfg.isolate = args.isolate
    cfg.command = getattr(args, "command_line", "") or "pamsegment benchmark " + " ".join(
        shlex.quote(a) for a in sys.argv[2:] if sys.argv[1:2] == ["benchmark"])
    return cfg


# What the options may ask for: a CT slice is 512 px and the walk predicts at most 16 slices in one call,
# so these leave room for any honest measurement while a slip of the keyboard (--size 100000: a 75 GB
# array; --batch-sizes 100000: no end) is named at once instead of minutes into the run.
OPTION_LIMITS = {"size": 4096, "batch_sizes": 256, "sam2_sizes": 2048, "depths": 4000, "objects": 4000,
                 "repeats": 1000, "warmup": 1000, "pairs": 1000}


def check_benchmark_config(cfg: BenchConfig, skip_memory: bool = False) -> None:
    """Refuse, before anything is measured, options beyond ``OPTION_LIMITS``, end-to-end object
    lengths that fit none of the depths (the part then measured nothing), and an end-to-end or Slicer
    volume larger than this machine's memory."""
    from .cli import propagation_memory_bytes
    from .errors import InputError
    from .volumes import check_memory

    for name, limit in OPTION_LIMITS.items():
        value = getattr(cfg, name)
        values = value if isinstance(value, tuple) else (value,)
        if max(values, default=0) > limit:
            raise InputError(f"--{name.replace('_', '-')} {max(values)} is more than this benchmark measures "
                             f"(at most {limit})")
    if cfg.size < 32 and ("e2e" in cfg.parts or "slicer" in cfg.parts):  # --size 2: every row an error, exit 0
        raise InputError(f"--size {cfg.size} is too small for a synthetic CT with an object in it (at least 32)")
    if "e2e" in cfg.parts and not any(o <= d - 4 for d in cfg.depths for o in cfg.objects):
        raise InputError(f"no end-to-end case: every --objects length ({', '.join(map(str, cfg.objects))}) must "
                         f"be at least 4 slices shorter than a --depths value ({', '.join(map(str, cfg.depths))})")
    depths = ([max(cfg.depths)] if "e2e" in cfg.parts else []) + ([cfg.slicer_depth] if "slicer" in cfg.parts else [])
    if depths:
        shape = (max(depths), cfg.size, cfg.size)
        need = propagation_memory_bytes(shape, 2, 0, {1: [shape[0] // 2]}, True)
        check_memory(need, f"the benchmark's largest volume ({cfg.size} x {cfg.size} x {shape[0]} voxels)",
                     lambda limit: "Give a smaller --size or --depths", skip=skip_memory)


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .errors import InputError

    from .cli import check_not_empty

    check_not_empty(("--out", args.out, "the output folder"), ("--checkpoint", args.checkpoint, "the checkpoint file"),
                    ("--official-checkpoint", args.official_checkpoint, "the checkpoint file"))
    for option, preset in (("checkpoint", "small"), ("official_checkpoint", "official")):
        path = getattr(args, option, None)  # before the measurements, which take up to 15 min (a bad file,
        if path:  # or one of the other preset, only showed as error rows in the tables, exit 0; loading it
            try:  # checks the file as check_checkpoint_header does)
                _pam_model(preset, path)
            except ValueError as exc:
                other = "--official-checkpoint" if preset == "small" else "--checkpoint"
                raise InputError(f"--{option.replace('_', '-')}: {exc}; give it as {other}, or the "
                                 f"{preset} preset's weights here") from None
    cfg = config_from_args(args)
    check_benchmark_config(cfg, skip_memory=args.no_memory_check)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():  # before the measurements, which take up to 15 min
        raise InputError(f"--out {out} is a file; give a folder for the tables")
    from .volumes import make_writable_folder

    from .volumes import check_link_target, check_writable_output

    # the tables are written through links (a link stays a link), so, before measuring: a link's target must
    # be a table of the same kind (not ~/.bashrc) in a folder that takes files (not an unmounted share)
    for name in OUTPUT_FILES:
        check_writable_output(out / name, (Path(name).suffix,))
        check_link_target(out / name)
    made = []  # the folders this run makes for -o (n1/n2: both), deepest first
    folder = out.absolute()
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    make_writable_folder(out, "the benchmark tables")
    partial = partial_options(args)
    if partial and args.out is None:
        print(f"note: this is not the full run ({', '.join(partial)}), so the tables go to {cfg.out}, not "
              f"{getattr(args, '_default_out', 'docs/benchmark')} (--out chooses)", flush=True)
    t0 = time.perf_counter()

    def say(result: dict) -> None:  # once the files are in place (within their Ctrl-C shield)
        print(report_text(result))
        print(f"\nwrote {', '.join(v for k, v in result['files'].items() if not k.endswith('error'))} "
              f"in {time.perf_counter() - t0:.0f} s")
        stale = [name for part, names in PART_FILES.items() if part not in cfg.parts for name in names
                 if (Path(cfg.out) / name).exists()]
        if stale:
            print(f"note: {', '.join(stale)} in {cfg.out} are from an earlier run (this one measured "
                  f"{', '.join(cfg.parts)} only); benchmark.md, benchmark.json and targets.csv describe this one",
                  flush=True)

    try:
        run_benchmark(cfg, log=lambda msg: print(msg, file=sys.stderr, flush=True), after=say,
                      keep_ctrl_c_ignored=getattr(args, "_ends_process", False))
    except BaseException:  # interrupted or failed before the tables were in: no empty folders of ours left
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return 0


def main(argv=None, default_out: str = "docs/benchmark", ends_process: bool = False) -> int:
    """``scripts/benchmark.py``: ``pamsegment benchmark`` with the tables' default folder given, through
    the command's own error handling (a refused option, a bad checkpoint or Ctrl-C is one line and exit
    2 or 130; it was a traceback and exit 1 here)."""
    from .cli import main as cli_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return cli_main(["benchmark", *argv], ends_process=ends_process,
                    defaults={"_default_out": default_out,
                              "command_line": "python scripts/benchmark.py " + " ".join(shlex.quote(a) for a in argv)})


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(_worker_main(sys.argv[2], sys.argv[3]))
    sys.exit(main())
