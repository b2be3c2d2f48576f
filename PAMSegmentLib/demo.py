"""``pamsegment demo``: the main job on a small real sample shipped with PAMSegment.

The sample is TotalSegmentator's abdominal reference CT (3 mm, 30 x 101 x 122; Apache-2.0) with
one-slice prompts for spleen, both kidneys and liver on the middle slice of each organ, and the
reference masks of those organs. These organs are held out of training (scripts/split.json), so
the Dice printed here is on structures the shipped weights never saw.
"""

from __future__ import annotations

import argparse
import time
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import InputError

__all__ = ["demo_data_dir", "run_demo", "add_demo_arguments", "cmd_demo"]

ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
FILES = ("abdomen_ct.nii.gz", "abdomen_prompt.nii.gz", "abdomen_reference.nii.gz")


def demo_data_dir() -> Path:
    """Resources/Demo in a source tree or Slicer extension, or the copy installed with the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "Resources" / "Demo", here / "Resources" / "Demo"):
        if (candidate / FILES[0]).is_file():
            return candidate
    try:
        # A namespace package gives a MultiplexedPath: resolve a file inside it, then its folder.
        first = resources.files("PAMSegmentLib.demo_data") / FILES[0]
        if first.is_file():
            return Path(str(first)).parent
    except (ModuleNotFoundError, TypeError):
        pass
    raise InputError("the demo data (Resources/Demo) is not installed; reinstall PAMSegmentLib")


def _radiological(direction) -> tuple[slice, slice]:
    """How to index an axial slice (j, i) so that it shows as radiologists view it: anterior up,
    the patient's right on the left (rows toward +y, columns toward +x in ITK's LPS)."""
    return slice(None, None, -1 if direction[4] < 0 else 1), slice(None, None, -1 if direction[0] < 0 else 1)


def _figure(image: np.ndarray, prompt: np.ndarray, result: np.ndarray, reference: np.ndarray, path: Path,
            title: str, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    occupied = np.flatnonzero(result.any(axis=(1, 2)) | reference.any(axis=(1, 2)))
    prompt_slices = set(np.flatnonzero(prompt.any(axis=(1, 2))).tolist())
    picks = np.linspace(occupied[0], occupied[-1], 6).round().astype(int).tolist() if occupied.size else [0]
    picks = sorted(set(picks) | prompt_slices)[:9]  # always show the drawn slices
    colors = ListedColormap(["none", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:red"])
    fig, axes = plt.subplots(1, len(picks), figsize=(2.3 * len(picks), 2.8))
    lo, hi = np.percentile(image, [1, 99])
    shown = _radiological(direction)
    for ax, k in zip(np.atleast_1d(axes), picks):
        ax.imshow(image[k][shown], cmap="gray", vmin=lo, vmax=hi)
        overlay = np.ma.masked_equal(result[k][shown].astype(int), 0)
        ax.imshow(overlay, cmap=colors, vmin=0, vmax=5, alpha=0.45, interpolation="nearest")
        if reference[k].any():
            ax.contour(reference[k][shown] > 0, levels=[0.5], colors="yellow", linewidths=0.6)
        if k in prompt_slices:
            ax.contour(prompt[k][shown] > 0, levels=[0.5], colors="white", linewidths=1.2)
        ax.set_title(f"slice {k}" + (" (prompt)" if k in prompt_slices else ""), fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_demo(out_dir: Path, checkpoint: str | None = None, method: str = "pam", device: str = "cpu",
             threads: int | None = None, progress=None) -> dict:
    """Propagate the shipped prompts, write the segmentation and a figure; returns Dice per organ.
    ``out_dir`` is made only once the propagation is done (and removed again, if it is still
    empty, when writing fails or is interrupted)."""
    from .baselines import get_predictor
    from .metrics import dice
    from .propagate import propagate
    from .volumes import (check_folder_writable, check_not_a_broken_link, read_labelmap, read_volume,
                          replace_together, write_labelmap)

    out_dir = Path(out_dir)
    for link in (out_dir, *out_dir.parents):  # a dangling link on the way: "File exists" after the work
        check_not_a_broken_link(link, "--out" if link == out_dir else f"--out {out_dir}: its folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; --out takes a folder (the demo writes two files into it)")
    # Before the propagation (a folder that cannot be made was found only after it): the folder, or
    # the nearest of its parents that exists, must take files.
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"cannot make the folder {out_dir}: {existing} is a file; choose another --out")
    check_folder_writable(existing, f"--out {out_dir}")
    data = demo_data_dir()
    image = read_volume(data / FILES[0])
    prompt = read_labelmap(data / FILES[1], reference=image)
    reference = read_labelmap(data / FILES[2], reference=image)
    model = get_predictor(method, checkpoint=checkpoint, device=device)  # a bad checkpoint: nothing created
    t0 = time.perf_counter()
    result = propagate(image.array, prompt.array, image.spacing, model, labels=sorted(ORGANS), axis=0,
                       device=device, threads=threads, progress=progress)
    seconds = time.perf_counter() - t0
    scores = {name: dice(result.mask == lab, reference.array == lab) for lab, name in ORGANS.items()}
    mean = float(np.mean(list(scores.values())))
    seg_path, fig_path = out_dir / "demo_segmentation.nii.gz", out_dir / "demo.png"
    made = not out_dir.is_dir()
    try:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise InputError(f"cannot make the folder {out_dir} ({error.strerror or error}); choose another --out") \
                from None
        # both written, then put in place together: a Ctrl-C while the figure was drawn left the new
        # segmentation (beside an earlier run's figure) after "nothing was written"
        shown = np.isin(reference.array, list(ORGANS)) * reference.array
        title = f"PAMSegment demo ({method}): one slice per organ -> 3D; mean Dice {mean:.3f} (yellow: reference)"
        replace_together([(seg_path, ".nii.gz", lambda tmp: write_labelmap(result.mask, image, tmp)),
                          (fig_path, ".png", lambda tmp: _figure(image.array, prompt.array, result.mask, shown, tmp,
                                                                 title, image.direction))])
    except BaseException:
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return {"dice": scores, "mean_dice": mean, "seconds": seconds, "segmentation": str(seg_path),
            "figure": str(fig_path), "slices_predicted": result.n_predicted}


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import THREADS_HELP, _thread_count

    p.add_argument("-o", "--out", "--output", dest="out", default="pamsegment_demo", metavar="DIR",
                   help="output folder (default: ./pamsegment_demo)")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="checkpoint (default: $PAMSEGMENT_MODEL if set, else the shipped weights)")
    p.add_argument("--method", default="pam", choices=["pam", "track", "copy"],
                   help="propagation method (default pam: the shipped network; track and copy: the classical "
                        "baselines)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the network runs (default cpu)")
    p.add_argument("--threads", type=_thread_count, default=None, metavar="N", help=THREADS_HELP)


def cmd_demo(args: argparse.Namespace) -> int:
    import os

    from .cli import _ProgressBar, check_not_empty, note_network_only_options

    # ('' was read as '.': the working folder)
    check_not_empty(("-o", args.out, "the output folder"), ("--checkpoint", args.checkpoint, "the checkpoint file"))
    note_network_only_options(args)
    with _ProgressBar("demo") as bar:  # appears with the first progress: a bad checkpoint is one line alone
        res = run_demo(Path(args.out), args.checkpoint, args.method, args.device, args.threads, progress=bar)
    env = os.environ.get("PAMSEGMENT_MODEL")
    if env and args.checkpoint is None and args.method.startswith("pam"):  # not the shipped weights: said
        print(f"note: using the weights PAMSEGMENT_MODEL names ({env})", flush=True)
    for name, d in res["dice"].items():
        print(f"  {name:<13} Dice {d:.3f}")
    print(f"demo: mean Dice {res['mean_dice']:.3f} over {len(res['dice'])} held-out organs, "
          f"{res['slices_predicted']} slices predicted in {res['seconds']:.1f} s; wrote {res['segmentation']} "
          f"and {res['figure']}")
    return 0
