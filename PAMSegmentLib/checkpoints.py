"""Loading and saving PAM checkpoints.

Two formats are accepted, both read with ``torch.load(..., weights_only=True)`` because a
checkpoint is untrusted input:

* the authors' published file (``propmask.pth``): a plain state dict or
  ``{"model_state_dict": state_dict, ...}``, keys optionally prefixed ``module.``; it always
  means the ``official`` network and is checked strictly against it;
* our own format (``format == "pamsegment-checkpoint"``): the network config, preprocessing and
  inference parameters, training provenance, the state dict and a sha256 of the weights, so a
  file says what network it needs.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import threading
import warnings
import zlib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch

from .checks import is_number, names_shown, shown
from .errors import CheckpointError, InputError
from .network import PAMConfig, PAMNetwork, PRESETS
from .preprocess import PreprocessingParams

__all__ = [
    "PAMModel",
    "InferenceParams",
    "load_model",
    "load_checkpoint_file",
    "save_checkpoint",
    "weights_sha256",
    "default_checkpoint_path",
    "describe_checkpoint",
    "resolve_device",
    "check_checkpoint_file",
]

FORMAT_NAME = "pamsegment-checkpoint"
FORMAT_VERSION = 1
MAX_CHECKPOINT_BYTES = 2 * 1024**3  # the official file is ~320 MB; anything past 2 GB is not ours
DEFAULT_MODEL_NAME = "pam_small.pt"


GATE_REFERENCES = ("prompt", "guide", "both")  # both: the walk ends where either test fails
# What a prior-channel network (PAMConfig.mask_prior) sees as each query's prior mask: the window
# guide's mask ("guide"), or the previous slice's final mask carried onto the query by the
# fusion's demons registration ("carried"; the network is trained on simulated carried masks).
QUERY_PRIORS = ("guide", "carried")


# InferenceParams.through_plane_mm: 0 (off) or a target spacing within this range (mm).
THROUGH_PLANE_RANGE_MM = (0.25, 20.0)


def valid_through_plane_mm(value: float) -> bool:
    lo, hi = THROUGH_PLANE_RANGE_MM
    return is_number(value, 0.0, 0.0) or is_number(value, lo, hi)


@dataclass(frozen=True)
class InferenceParams:
    """How the engine walks the volume with this network."""

    window_mm: float = 20.0  # PAM: Z = min(int(20 mm / slice spacing), max_window)
    max_window: int = 40
    min_window: int = 1
    threshold: float = 0.5
    presence_threshold: float = 0.5  # used only by networks with a presence head
    min_area_fraction: float = 0.0  # a slice counts as empty below this fraction of the guide's area
    min_area_px: int = 1
    # Also stop where the predicted region's intensity drifts (PAMSegmentLib.baselines.IntensityGate):
    # against the drawn slice's region ("prompt") or against the region of the window's guide slice
    # ("guide": tolerates gradual change along an organ, catches a walk that slips into other tissue),
    # or both ("both": either ends the walk; also a slow slide the guide test follows step by step).
    intensity_gate: bool = False
    intensity_gate_reference: str = "prompt"
    # Forward-backward check of each window (0 = off): predicting the guide back from a predicted
    # slice must give at least this Dice with the guide's mask, else the walk drifted there.
    consistency_min_dice: float = 0.0
    # Registration fusion (0 = the network alone, as the official PAM): each predicted slice's
    # probability is (1 - w) * network + w * the previous slice's mask warped onto it by demons
    # registration (PAMSegmentLib.baselines.TrackPredictor), chained slice by slice from the guide.
    registration_weight: float = 0.0
    # Its demons registration: grid of at most this many px per side, this many iterations
    # (the format's defaults are coarser and shorter than the `track` baseline's 128 px / 40: the
    # fusion runs it on every predicted slice; the shipped checkpoint sets 128 px / 10 iterations;
    # see the README's ablations).
    registration_max_side: int = 64
    registration_iterations: int = 10
    # > 0: a coarser pyramid level first (half that grid, this many iterations), whose field starts
    # the registration_max_side grid (0 = one level, the format's default).
    registration_coarse_iterations: int = 0
    # The mask the registration chain carries from slice to slice, kept binary on a grid this many
    # times finer than the slices (s x s sub-pixels a pixel; at most CARRY_MAX_PIXELS sub-pixels a
    # crop, a coarser factor for large crops): boundary motion below half a pixel per slice then
    # adds up instead of being rounded away at every slice (1 = on the slices' own grid, the
    # format's default; see the README's ablations).
    registration_carry_supersample: int = 1
    # With two or more drawn keyframes, the walks outward from the outermost ones also end where
    # the network's mask and the registration's warped mask agree less than this (Dice; 0 = off):
    # there the two no longer follow the same object (see the README's keyframe ablation).
    keyframe_outward_min_agreement: float = 0.0
    # Only for networks with a prior channel; see QUERY_PRIORS.
    query_prior: str = "guide"
    # Thick slices (0 = off): where the spacing along the propagation axis exceeds this (mm), the
    # walks step through k - 1 slices interpolated linearly between each pair of neighbours,
    # k = ceil(spacing / this), and the result is kept on the original slices
    # (PAMSegmentLib.propagate.AxisInterpolated; see the README's ablations).
    through_plane_mm: float = 0.0
    # The authors' published inference (PAM-SPEC; the default of their checkpoint, off for ours):
    # overlapping windows whose votes are united, a side ending only where a window's outermost
    # slice is empty (PAMSegmentLib.propagate._walk_published), 6-connected components, crops
    # resized without antialiasing and the output scales upsampled with aligned corners.
    published_scheme: bool = False
    # > 0: a few voxels of the drawn slice far outside the rest of its values (at most this share of
    # them; bone or contrast touched by the brush) are left out of the network's intensity window where
    # they would widen it at least twofold (preprocess.intensity_window; 0 = off, the format's default).
    window_outlier_share: float = 0.0

    def __post_init__(self):
        if self.query_prior not in QUERY_PRIORS:
            raise InputError(f"query_prior must be one of {', '.join(QUERY_PRIORS)}, got {shown(self.query_prior)}")
        if self.intensity_gate_reference not in GATE_REFERENCES:
            raise InputError(f"intensity_gate_reference must be one of {', '.join(GATE_REFERENCES)}, "
                             f"got {shown(self.intensity_gate_reference)}")
        if not is_number(self.registration_weight, 0.0, 1.0):
            raise InputError(f"registration_weight must be within [0, 1], got {shown(self.registration_weight)}")
        if not is_number(self.registration_carry_supersample, 1, 8, whole=True):
            raise InputError("registration_carry_supersample must be within 1..8, "
                             f"got {shown(self.registration_carry_supersample)}")
        if not valid_through_plane_mm(self.through_plane_mm):
            lo, hi = THROUGH_PLANE_RANGE_MM
            raise InputError(f"through_plane_mm must be 0 (off) or within [{lo:g}, {hi:g}] mm, "
                             f"got {shown(self.through_plane_mm)}")
        if not is_number(self.keyframe_outward_min_agreement, 0.0, 1.0):
            raise InputError("keyframe_outward_min_agreement must be within [0, 1], "
                             f"got {shown(self.keyframe_outward_min_agreement)}")

        def number(name, lo, hi, whole=False):
            value = getattr(self, name)
            if not is_number(value, lo, hi, whole):
                kind = "a whole number" if whole else "a number"
                raise InputError(f"{name} must be {kind} within [{lo:g}, {hi:g}], got {shown(value)}")

        # Checked because a checkpoint is untrusted input: a NaN threshold or 10^9 registration
        # iterations in its header would otherwise fail mid-run, run away, or never end.
        number("window_mm", 1e-3, 1e4)
        number("max_window", 1, 1000, whole=True)
        number("min_window", 1, 1000, whole=True)
        number("threshold", 1e-6, 1.0 - 1e-6)
        number("presence_threshold", 0.0, 1.0)
        number("min_area_fraction", 0.0, 1.0)
        number("min_area_px", 0, 1e6, whole=True)
        number("consistency_min_dice", 0.0, 1.0)
        number("registration_max_side", 8, 1024, whole=True)
        number("registration_iterations", 1, 1000, whole=True)
        number("registration_coarse_iterations", 0, 1000, whole=True)
        number("window_outlier_share", 0.0, 0.2)
        for name in ("max_window", "min_window", "min_area_px", "registration_max_side", "registration_iterations",
                     "registration_coarse_iterations", "registration_carry_supersample"):
            object.__setattr__(self, name, int(getattr(self, name)))  # 6.0 (a hand-written header) is 6
        if self.min_window > self.max_window:
            raise InputError(f"min_window {self.min_window} exceeds max_window {self.max_window}")
        for name in ("intensity_gate", "published_scheme"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {shown(getattr(self, name))}")

    def with_gate(self, gate: str) -> "InferenceParams":
        """These parameters with the drift test set as ``--intensity-gate`` (and a server job) say:
        "off", "prompt", "guide" or "both" (against that region, or either), or "on" (the reference
        these parameters name, "guide" where their test is off)."""
        if gate == "off":
            return replace(self, intensity_gate=False)
        reference = gate if gate in GATE_REFERENCES else (self.intensity_gate_reference if self.intensity_gate
                                                          else "guide")
        return replace(self, intensity_gate=True, intensity_gate_reference=reference)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        if d.get("window_outlier_share") == 0.0:  # (session 48) off: left out, so that checkpoints saved with it
            del d["window_outlier_share"]          # off load in earlier releases and keep their settings digest
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InferenceParams":
        """ValueError for a name this version does not know (a misspelt "treshold" was dropped and
        the run used the default, without a word)."""
        unknown = sorted((k for k in d if k not in cls.__dataclass_fields__), key=str)  # keys of any type
        if unknown:
            raise ValueError(f"unknown inference parameter(s): {names_shown(unknown)}")
        return cls(**d)


@dataclass
class PAMModel:
    """A network ready for inference plus everything needed to use it correctly."""

    network: PAMNetwork
    preprocessing: PreprocessingParams
    inference: InferenceParams
    kind: str  # "official" or "pamsegment"
    source: str = "<memory>"
    sha256: str = ""
    provenance: dict = field(default_factory=dict)
    device: str = "cpu"

    @property
    def config(self) -> PAMConfig:
        return self.network.config

    @classmethod
    def from_network(cls, network: PAMNetwork, preprocessing: PreprocessingParams | None = None,
                     inference: InferenceParams | None = None, device: str = "cpu") -> "PAMModel":
        pre = preprocessing or PreprocessingParams(input_size=network.config.input_size)
        return cls(_for_inference(network, device), pre, inference or InferenceParams(), kind="pamsegment",
                   device=device)


def _for_inference(network: PAMNetwork, device: str) -> PAMNetwork:
    """``network`` in eval mode on ``device``; on the CPU its weights in channels-last order, so
    oneDNN's convolutions skip reordering every layer's input and output: about 8 % less time per
    slice for both presets (session 35, an Intel Xeon, timed paired: small 15.3 -> 14.5 ms at batch 1,
    48.9 -> 45.5 at batch 4; official 134 -> 125 ms; outputs within 2e-5; session 9 had found it
    slower on an AMD machine, so $PAMSEGMENT_CHANNELS_LAST=0 (or false, off, no) keeps the plain
    order). The state dict keeps its values (its hash reads them contiguous)."""
    network = network.eval().to(device)
    off = os.environ.get("PAMSEGMENT_CHANNELS_LAST", "").strip().lower() in ("0", "false", "off", "no")
    if device == "cpu" and not off:
        network = network.to(memory_format=torch.channels_last)
        # A convolution of one input channel (the image encoders' first: the query slice) runs in
        # torch's own kernel, not oneDNN's, which with the weights in channels-last strides took 4 times
        # as long (about 300 against 75 us at 128 px): those keep the plain order (session 39).
        for module in network.modules():
            if isinstance(module, torch.nn.Conv2d) and module.in_channels == 1:
                module.weight.data = module.weight.data.clone(memory_format=torch.contiguous_format)
    return network


def device_name(device: str | None) -> str:
    """``device`` (None: cpu) lower-cased, refused unless it is cpu, cuda or cuda:N."""
    if device is not None and not isinstance(device, str):
        raise InputError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {shown(device)}")
    device = (device or "cpu").lower()
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise InputError(f"unknown device {shown(device)}; use cpu or cuda")
    return device


def resolve_device(device: str | None) -> str:
    """``device`` (None: cpu) checked and lower-cased: cpu, cuda or cuda:N where torch has CUDA."""
    device = device_name(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for but this torch has no CUDA device; use cpu (--device cpu)")
    return device


def settings_digest(model) -> str | None:
    """8 hex digits of a digest of what a loaded model runs with besides its weights: its network's
    config, its preprocessing and inference parameters (with any override applied); None for an
    object without them. With the weights' sha256 it tells two runs' outputs apart (batch's
    --skip-existing, a server's /info)."""
    if not all(hasattr(model, a) for a in ("network", "preprocessing", "inference")):
        return None
    settings = json.dumps([model.network.config.to_dict(), model.preprocessing.to_dict(), model.inference.to_dict()],
                          sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:8]


def weights_sha256(state_dict: dict) -> str:
    """Hash of the weights themselves (names, dtypes, shapes, bytes), independent of pickling."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # raw bytes: any dtype, bfloat16 too
    return h.hexdigest()


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _checked_tensors(sd: dict, path: Path) -> dict:
    """The state dict, after the checks an untrusted file needs before any of its tensors is
    hashed or copied: string keys, dense floating-point tensors whose stored bytes cover their
    shape (a tensor saved as an ``expand()`` view takes a few bytes on disk and gigabytes once
    copied). Values are checked (finite) and cast by ``_finite_float32`` once the shapes match."""
    out = {}
    for key, t in sd.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {path} has a weight named {shown(key)}; names must be strings")
        if t.layout != torch.strided or t.device.type == "meta":
            raise CheckpointError(f"checkpoint {path}: weight {_name(key)} is not a plain dense tensor ({t.layout}, "
                                  f"{t.device})")
        if t.dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(f"checkpoint {path}: weight {_name(key)} has dtype {t.dtype}; PAM weights are "
                                  "floating point")
        if t.numel() and t.untyped_storage().nbytes() < t.numel() * t.element_size():
            raise CheckpointError(f"checkpoint {path}: weight {_name(key)} stores fewer values than its shape "
                                  f"{tuple(t.shape)} needs (a broadcast view); not a saved network")
        out[key] = t
    return out


def _finite_float32(sd: dict, path: Path) -> dict:
    out = {}
    for key, t in sd.items():
        t = t.to(torch.float32)
        if not torch.isfinite(t).all():
            raise CheckpointError(f"checkpoint {path} is corrupt: weight {_name(key)} holds NaN or infinite values")
        out[key] = t
    return out


def _unique_state_dict(network: PAMNetwork) -> dict:
    """A CPU snapshot of the state dict in which aliased entries stay one tensor.

    dynamic-network-architectures registers every conv/norm twice (``conv.weight`` and
    ``all_modules.0.weight`` are the same Parameter); cloning each entry separately would make
    torch.save store every weight twice.
    """
    snapshot: dict = {}
    out = {}
    for k, v in network.state_dict().items():
        ident = (v.device, v.data_ptr(), tuple(v.shape), v.stride(), v.dtype)
        if ident not in snapshot:
            snapshot[ident] = v.detach().cpu().clone()
        out[k] = snapshot[ident]
    return out


def save_checkpoint(path: str | os.PathLike, network: PAMNetwork, preprocessing: PreprocessingParams,
                    inference: InferenceParams | None = None, provenance: dict | None = None) -> str:
    """Write our format; returns the weights' sha256."""
    sd = _unique_state_dict(network)
    # The decoder keeps a reference to the encoder, so its weights appear twice in the state
    # dict; store them once and rebuild the aliases on load (halves the file).
    sd = {k: v for k, v in sd.items() if ".decoder.encoder." not in k}
    digest = weights_sha256(sd)
    payload = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "config": network.config.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "inference": (inference or InferenceParams()).to_dict(),
        "provenance": provenance or {},
        "sha256": digest,
        "state_dict": sd,
    }
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # a full disk: torch says "unexpected pos ..." from its zip writer
        try:
            tmp.unlink(missing_ok=True)  # (it held the space, and an earlier file at ``path`` stays as it was)
        except OSError:
            pass
        try:
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MB are free there"
        except OSError:
            free = ""
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:200]
        raise CheckpointError(f"cannot write checkpoint {path} ({reason}{free}: the disk full?); nothing was "
                              "replaced") from None
    return digest


def _refuse_empty_path(path) -> None:
    if not str(path).strip():  # Path('') is '.': "checkpoint . is a directory" for an unset variable
        raise CheckpointError("the checkpoint path is empty (an unset variable?); give the .pt/.pth file")


def check_checkpoint_file(path: str | os.PathLike) -> int:
    """The cheap checks of a checkpoint path (exists, a file, size plausible), e.g. before a
    command reads a large image; returns the size in bytes. Raises CheckpointError."""
    _refuse_empty_path(path)
    path = Path(path)
    try:
        return _checked_file_size(path)
    except PermissionError as error:  # a folder on the way that may not be entered: a traceback and exit 1 before
        raise CheckpointError(f"cannot read checkpoint {path} ({error.strerror or error}); check the permissions of "
                              "it and of its folders (or copy it somewhere you can read it)") from None


def _checked_file_size(path: Path) -> int:
    if not path.exists():
        if path.is_symlink():
            raise CheckpointError(f"checkpoint {path} is a symbolic link to nothing (or one of a loop of links); "
                                  "point it at the checkpoint file")
        raise CheckpointError(f"checkpoint {path} does not exist; check the path")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the .pt/.pth file inside it")
    if not path.is_file():  # a FIFO would be read for ever, a device is no checkpoint
        raise CheckpointError(f"checkpoint {path} is not a regular file (a named pipe or a device); give the "
                              ".pt/.pth file")
    return _checked_size(path, path.stat().st_size)


def _checked_size(path: Path, size: int) -> int:
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); download it again")
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"checkpoint {path} is {size / 1e9:.1f} GB, larger than any PAM checkpoint; wrong file?")
    return size


_IMAGE_HEAD = 540  # bytes read to tell an image file from a checkpoint (a NIfTI-2 header's size)


def _image_kind(path: Path, head: bytes) -> str | None:
    """What image format a file holds, by its first bytes (``head``: at least ``_IMAGE_HEAD`` of them
    where the file has them; a gzip stream's are decompressed: a .nii.gz), or None for anything else."""
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as f:
                inner = f.read(_IMAGE_HEAD)
        except (OSError, EOFError, zlib.error):
            return None
        kind = _image_kind(path, inner) if not inner.startswith(b"\x1f\x8b") else None
        return f"{kind} (gzip-compressed)" if kind else None
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return "a NIfTI file"
    if len(head) >= 12 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        return "a NIfTI-2 file"
    if head.startswith(b"NRRD000"):
        return "an NRRD file"
    if head.lstrip().startswith((b"ObjectType", b"NDims")):
        return "a MetaImage (.mha/.mhd) file"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "a DICOM file"
    for magic, name in ((b"\x89PNG\r\n\x1a\n", "a PNG file"), (b"\xff\xd8\xff", "a JPEG file"),
                        (b"II*\x00", "a TIFF file"), (b"MM\x00*", "a TIFF file"), (b"II+\x00", "a BigTIFF file"),
                        (b"MM\x00+", "a BigTIFF file")):
        if head.startswith(magic):
            return name
    return None


def check_checkpoint_header(path: str | os.PathLike) -> int:
    """``check_checkpoint_file`` and the file's first bytes (a torch zip file or a legacy pickle),
    without reading it: returns the size in bytes. Raises CheckpointError."""
    size = check_checkpoint_file(path)  # (given as it came: Path('') would be '.')
    path = Path(path)
    with _opened(path) as f:
        _check_head(path, f.read(_IMAGE_HEAD))
    return size


def _opened(path: Path):
    """The checkpoint opened for reading, or one CheckpointError (permission denied: a traceback and exit
    1 before)."""
    try:
        return open(path, "rb")
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path} ({error.strerror or error}); check its permissions "
                              "(or copy it somewhere you can read it)") from None


def _check_head(path: Path, head: bytes) -> None:
    """A checkpoint's first bytes (``_IMAGE_HEAD`` of them) are a torch zip file's or a legacy pickle's;
    anything else is named as what it is where that can be told (an image, gzip, tar, safetensors)."""
    magic = head[:16]
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # a torch zip file, or a legacy pickle
        image = _image_kind(path, head)
        if image is not None:  # (a scan given where the weights go: "gunzip it" was said of a .nii.gz)
            raise CheckpointError(f"cannot load checkpoint {path}: it is {image}, an image, not a checkpoint; give "
                                  "the weights file (.pt or .pth) as the checkpoint, and the image where the command "
                                  "takes it (pamsegment propagate IMAGE PROMPT --checkpoint WEIGHTS)")
        if magic.startswith(b"\x1f\x8b"):
            raise CheckpointError(f"cannot load checkpoint {path}: it is gzip-compressed; decompress it first "
                                  "(gunzip, or 7-Zip on Windows) and give the file inside")
        if len(head) >= 262 and head[257:262] == b"ustar" and head.startswith(b"sys_info\x00"):
            raise CheckpointError(f"cannot load checkpoint {path}: it is in torch's first file format (a tar "
                                  "archive), which PAMSegment does not read; if you trust the file, save it again "
                                  "once in Python: torch.save(torch.load(PATH, weights_only=False), 'weights.pt'), "
                                  "and give weights.pt")
        if len(head) >= 262 and head[257:262] == b"ustar":  # a tar archive's header (POSIX and GNU)
            raise CheckpointError(f"cannot load checkpoint {path}: it is a tar archive, not a PyTorch checkpoint; "
                                  f"extract it (tar -xf {shown(path.name, 80)}, or 7-Zip on Windows) and give the "
                                  ".pt/.pth file inside")
        if len(magic) >= 10 and magic[8:10] == b"{\"":  # an 8-byte header length, then the JSON header
            raise CheckpointError(f"cannot load checkpoint {path}: it is a safetensors file, which PAMSegment does "
                                  "not read; use the PyTorch .pt/.pth file of the same weights")
        begins = magic.decode("ascii", "replace").replace("\ufffd", "?")
        begins = "".join(c if c.isprintable() else "?" for c in begins)
        raise CheckpointError(f"cannot load checkpoint {path}: it is not a PyTorch file (it begins {begins!r}); "
                              "if you downloaded it, the download may have saved an error page: download it again")


def _read(path: Path) -> object:
    check_checkpoint_file(path)  # (a FIFO, which the open would wait on for ever, is refused here)
    with _opened(path) as f:  # opened once: the file checked is the file loaded (a copy replacing it in between
        # was loaded past the checks: a review, session 48), its size and first bytes included
        size = _checked_size(path, os.fstat(f.fileno()).st_size)
        _check_head(path, f.read(_IMAGE_HEAD))
        f.seek(0)
        return _read_open(path, f, size)


def _read_open(path: Path, f, size: int) -> object:
    magic = f.read(4)
    if magic.startswith(b"PK\x03\x04"):
        _check_zip_entries(path, f)
    f.seek(0)
    # torch's notes (e.g. on old pickle protocols) are hidden: the error says it all. Only on the
    # main thread: catch_warnings swaps the process-wide filters, which is not thread-safe (Slicer's
    # worker loads the model while its GUI thread runs).
    quiet = threading.current_thread() is threading.main_thread()
    try:
        with warnings.catch_warnings() if quiet else contextlib.nullcontext():
            if quiet:
                warnings.simplefilter("ignore")
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        protocol = _pickle_protocol(f, magic)
        if found:  # a class or function the safe loader does not take
            reason = (f"it holds Python objects beyond tensors (here {found.group(1)[:80]}), which are not loaded "
                      "for safety; if you trust the file, save its weights alone once in Python: obj = "
                      "torch.load(PATH, weights_only=False); sd = obj.state_dict() if hasattr(obj, 'state_dict') "
                      "else next((obj[k] for k in ('model_state_dict', 'state_dict', 'model') if k in obj), obj); "
                      "sd = sd.state_dict() if hasattr(sd, 'state_dict') else sd; torch.save({k: v for k, v in "
                      "sd.items() if isinstance(v, torch.Tensor)}, 'weights.pth'), and give weights.pth (a class of "
                      "the file must be importable there; a PAMSegment checkpoint: delete its entries that are no "
                      "plain values and torch.save(obj, 'weights.pt'))")
        elif "weights_only" in str(exc):  # torch's safe loader says so of every file it cannot read: a damaged
            # one was told to load with weights_only=False, which failed too (a hostile trial, session 47)
            detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            said = shown(detail[0].strip(), 80) if detail and "weights_only" not in detail[0] else "unreadable data"
            if protocol in (4, 5):  # written with pickle protocol 4 or 5 ("Unsupported operand 149": a re-review)
                reason = (f"torch's safe loader cannot read its contents ({said}): it was saved with pickle "
                          f"protocol {protocol}; if you trust the file, save it again once in Python with torch's "
                          "default: torch.save(torch.load(PATH, weights_only=False), 'weights.pt'), and give "
                          "weights.pt")
            else:
                reason = (f"the file is damaged, truncated or not a PyTorch checkpoint (its contents cannot be read: "
                          f"{said}); download or copy it again")
        elif size < 1024 or "truncat" in first.lower() or "zip archive" in first.lower() or "EOF" in first:
            reason = (f"the file is truncated or not a PyTorch checkpoint ({_first_sentence(first)}); download or copy "
                      "it again")
        else:  # (a legacy file with a changed byte: "pop from empty list", a codec error; a re-review)
            reason = (f"not a readable PyTorch checkpoint ({_first_sentence(first)}): damaged, or written by another "
                      "program; download or copy it again")
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}") from None


def _pickle_protocol(f, magic: bytes) -> int | None:
    """The pickle protocol the checkpoint's pickle declares (its PROTO opcode: b"\\x80" and the
    number), read from a zip file's data.pkl (``f``: the open checkpoint) or a legacy file's start;
    None where it declares none."""
    import zipfile

    head = magic
    if magic.startswith(b"PK\x03\x04"):
        try:
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                name = next((n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")), None)
                head = archive.open(name).read(2) if name is not None else b""
        except Exception:  # noqa: BLE001 - unreadable: no protocol to tell
            return None
    return head[1] if len(head) >= 2 and head[:1] == b"\x80" else None


def _first_sentence(text: str, limit: int = 160) -> str:
    """``text`` up to its first sentence's end (torch's messages run on), at most ``limit`` characters."""
    end = text.find(". ")
    text = text[: end + 1] if 0 < end < limit else text
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _check_zip_entries(path: Path, f) -> None:
    """A torch zip checkpoint's entries as ``torch.save`` writes them: stored, not compressed, and at
    most MAX_CHECKPOINT_BYTES in all. torch.load inflates a compressed entry in full before any key
    is looked at, so a 4 MB file of deflated zeros asked for 4 GiB (and a file under the 2 GB size
    limit could ask for terabytes)."""
    import zipfile

    try:
        archive = zipfile.ZipFile(f)
    except Exception as exc:  # noqa: BLE001 - BadZipFile, NotImplementedError (a version byte), OSError ...
        raise CheckpointError(f"cannot load checkpoint {path}: the file is truncated or not a PyTorch checkpoint "
                              f"(its zip directory cannot be read: {_first_sentence(str(exc) or type(exc).__name__)}); "
                              "download or copy it again") from None
    with archive:  # (opened once: the directory read for the checks below is the one the checksums are read by)
        _check_zip_directory(path, archive.infolist())
        # Each entry's CRC-32, which torch does not check: the official file has no other (a flipped byte in a
        # weight loaded and ran, -3.2e36 for -0.0093: a hostile trial, session 47). About 0.1 s per 100 MB, stored
        # entries, read 1 MB at a time; a flag torch.save never sets (encrypted) is damage too (a re-review).
        current = "?"
        try:
            for entry in archive.infolist():
                current = entry.filename
                with archive.open(entry) as stream:
                    while stream.read(2**20):
                        pass
        except Exception as exc:  # noqa: BLE001 - zipfile raises BadZipFile, RuntimeError, NotImplementedError ...
            said = _first_sentence(str(exc) or type(exc).__name__)
            raise CheckpointError(f"cannot load checkpoint {path}: the file is damaged (its entry {shown(current)}: "
                                  f"{said}); download or copy it again") from None


def _check_zip_directory(path: Path, entries: list) -> None:
    """The checks of a torch zip checkpoint's entries that need only its directory (``_check_zip_entries``)."""
    import zipfile

    if not any(e.filename == "data.pkl" or e.filename.endswith("/data.pkl") for e in entries):
        # every torch.save zip holds <name>/data.pkl: this is an ordinary archive (a cloud drive's download)
        inside = [e.filename for e in entries if e.filename.lower().endswith((".pt", ".pth", ".ckpt", ".bin"))]
        found = (f"it holds {', '.join(repr(n) for n in inside[:3])}{' ...' if len(inside) > 3 else ''}: extract "
                 "that file and give it instead" if inside else "it holds no .pt/.pth file either")
        raise CheckpointError(f"cannot load checkpoint {path}: it is a zip archive, not a PyTorch checkpoint; {found}")
    if any(e.filename.endswith("/constants.pkl") or "/code/__torch__/" in e.filename for e in entries):
        # torch.jit.save's archive (its compressed code entries were called "re-save the weights with torch.save")
        raise CheckpointError(f"cannot load checkpoint {path}: it is a TorchScript archive (torch.jit.save), a "
                              "compiled model with code, which PAMSegment does not run; if you trust the file, save "
                              "its weights once in Python: torch.save(torch.jit.load(PATH).state_dict(), "
                              "'weights.pth'), and give weights.pth")
    packed = next((e for e in entries if e.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise CheckpointError(f"cannot load checkpoint {path}: its entry {shown(packed.filename)} is compressed, which "
                              "torch.save never does (a compressed entry is inflated in full before it can be "
                              "checked); re-save the weights with torch.save")
    total = sum(e.file_size for e in entries)
    if total > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"cannot load checkpoint {path}: its entries declare {total / 1e9:.1f} GB, more than "
                              "any PAM checkpoint holds; wrong or damaged file?")
    seen: set[str] = set()
    for entry in entries:
        if entry.filename in seen:  # (torch reads one copy, a check by name another)
            raise CheckpointError(f"cannot load checkpoint {path}: it holds the entry {shown(entry.filename)} twice, "
                                  "which torch.save never writes: the file is damaged or was edited; download or copy "
                                  "it again")
        seen.add(entry.filename)
        if entry.is_dir() or entry.external_attr & 0x10:  # (zipfile reads such an entry, torch reads zeros: a
            # weight came back all zeros past the CRC check; a re-review, session 47)
            raise CheckpointError(f"cannot load checkpoint {path}: its entry {shown(entry.filename)} is marked as a "
                                  "folder, which torch.save never writes: the file is damaged; download or copy it "
                                  "again")


def _check_aliases(network_sd: dict, got: dict, what: str) -> None:
    """Names the network shares one tensor under (dynamic-network-architectures' ``all_modules.*``
    aliases, the decoder's reference to the encoder) must hold equal values in the file: loading
    copies each name into the same tensor, so the last one copied won and the others were dropped
    without a word (184 of the official layout's 408 entries)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in network_sd.items():
        groups.setdefault(tensor.data_ptr(), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in got]
        first = present[0] if present else None
        for other in present[1:]:
            if not torch.equal(got[first], got[other]):
                raise CheckpointError(f"{what} holds different values under {first} and {other}, which name the "
                                      "same weight: the file is damaged or was edited; download or save it again")


def _strict_check(expected: dict, got: dict, what: str) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(got) if tuple(expected[k].shape) != tuple(got[k].shape))
    problems = []

    def show(keys):  # (names from the file, cut and escaped: a 20 kB name of terminal escapes was printed whole)
        more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
        return ", ".join(_name(k) for k in keys[:3]) + more

    if missing:
        problems.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} shape mismatch(es), e.g. {_name(k)}: file {tuple(got[k].shape)} vs network "
                        f"{tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"{what} does not match the network: " + "; ".join(problems))


def _name(key) -> str:
    """A weight's name from the file for a message: as it is when it is a plain name (printable,
    at most 80 characters), else cut and escaped (``shown``)."""
    if isinstance(key, str) and key.isprintable() and len(key) <= 80:
        return key
    return shown(key, 80)


def _official_state_dict(obj: object, path: Path) -> dict:
    sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else None
    if isinstance(sd, dict) and sd:
        others = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        if others and len(others) * 2 < len(sd):  # a state dict with a few other entries (an epoch number)
            listed = ", ".join(f"{shown(k)} ({type(sd[k]).__name__})" for k in others[:3])
            load = ("sd = torch.load(FILE, weights_only=True)['model_state_dict']" if sd is not obj
                    else "sd = torch.load(FILE, weights_only=True)")
            raise CheckpointError(
                f"checkpoint {path} holds weights and {len(others)} entr{'y' if len(others) == 1 else 'ies'} that "
                f"{'is' if len(others) == 1 else 'are'} not a tensor: {listed}{' ...' if len(others) > 3 else ''}; "
                f"save the weights alone once in Python ({load}, then del sd[NAME] for each of those entries and "
                "torch.save(sd, 'weights.pth')) and give that file")
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        held = (f"it holds a mapping of {', '.join(shown(k, 40) for k in list(obj)[:6])}"
                + (" ..." if len(obj) > 6 else "") if isinstance(obj, dict) and obj else
                f"it holds {type(obj).__name__}")
        raise CheckpointError(
            f"checkpoint {path} holds no state dict (expected tensors, or a 'model_state_dict' entry; {held}): if "
            "its weights sit under another name, save them alone once in Python (torch.save(obj['NAME'], "
            "'weights.pth')) and give that file"
        )
    if not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"checkpoint {path} has weights whose names are not strings; not a PAM state dict")
    out = {}
    for k, v in sd.items():
        name = k[len("module."):] if k.startswith("module.") else k
        if name in out:  # both "x" and "module.x": which one is meant?
            raise CheckpointError(f"checkpoint {path} holds weight {_name(name)} twice (with and without 'module.')")
        out[name] = v
    return out


def _new_network(config) -> "PAMNetwork":
    """A network to load weights into. Its random initialisation is overwritten, so it runs on a
    forked random state: loading leaves the caller's torch random stream as it was."""
    with torch.random.fork_rng(devices=[]):
        return PAMNetwork(config)


def load_checkpoint_file(path: str | os.PathLike, device: str = "cpu") -> PAMModel:
    """Load either format strictly; every problem is a one-line CheckpointError."""
    path = Path(path)
    device = resolve_device(device)
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME:
        version = obj.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise CheckpointError(f"checkpoint {path} has an invalid header: format_version {shown(version)}")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} uses format version {obj['format_version']}; this PAMSegmentLib reads "
                f"up to {FORMAT_VERSION}: update PAMSegment"
            )
        try:
            for part in ("config", "preprocessing"):
                if not isinstance(obj.get(part), dict):
                    raise ValueError(f"its {shown(part)} entry is missing or not a mapping")
            if not isinstance(obj.get("inference", {}), dict):
                raise ValueError("its 'inference' entry is not a mapping")
            config = PAMConfig.from_dict(obj["config"])
            config.validate()  # bounded sizes before anything is built from them
            config.check_parameters()  # counted on the meta device: nothing allocated
            pre = PreprocessingParams.from_dict(obj["preprocessing"])
            inf = InferenceParams.from_dict(obj.get("inference", {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {path} has an invalid header: {exc}") from None
        if pre.input_size != config.input_size:
            raise CheckpointError(f"checkpoint {path} has an invalid header: preprocessing input_size {pre.input_size} "
                                  f"differs from the network's {config.input_size}")
        sd = obj.get("state_dict")
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise CheckpointError(f"checkpoint {path} has no state_dict of tensors")
        sd = _checked_tensors(sd, path)
        network = _new_network(config)
        expected = {k: v for k, v in network.state_dict().items() if ".decoder.encoder." not in k}
        _strict_check(expected, sd, f"checkpoint {path}")  # shapes before any tensor is read whole
        digest = weights_sha256(sd)
        if not isinstance(obj.get("sha256"), (str, type(None))):
            raise CheckpointError(f"checkpoint {path} has an invalid header: its 'sha256' entry is not text")
        if obj.get("sha256") and obj["sha256"] != digest:
            raise CheckpointError(f"checkpoint {path} is corrupt: its weights' sha256 does not match its header")
        weights = _finite_float32(sd, path)
        _check_aliases(network.state_dict(keep_vars=True), weights, f"checkpoint {path}")
        network.load_state_dict(weights, strict=False)  # only the decoder.encoder aliases are absent
        provenance = _plain_provenance(obj.get("provenance", {}))
        return PAMModel(_for_inference(network, device), pre, inf, kind="pamsegment", source=str(path),
                        sha256=digest, provenance=provenance if isinstance(provenance, dict) else {}, device=device)

    sd = _checked_tensors(_official_state_dict(obj, path), path)
    if any(k.startswith("proposing_stage.presence_head.") for k in sd):  # no official weight is named so
        raise CheckpointError(f"checkpoint {path} is the bare state dict of a PAMSegment network (it has an "
                              "object-present head), without the header that says which network: save it with "
                              "PAMSegmentLib.checkpoints.save_checkpoint (or train.py), which writes our format")
    network = _new_network(PRESETS["official"])
    _strict_check(network.state_dict(), sd, f"checkpoint {path} (official PAM layout)")
    digest = weights_sha256(sd)
    try:
        weights = _finite_float32(sd, path)
        _check_aliases(network.state_dict(keep_vars=True), weights, f"checkpoint {path} (official PAM layout)")
        network.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} could not be loaded: {str(exc).splitlines()[0]}") from None
    return PAMModel(_for_inference(network, device), PreprocessingParams(), InferenceParams(published_scheme=True),
                    kind="official",
                    source=str(path), sha256=digest, device=device)


PROVENANCE_ITEMS = 20000  # a training run's provenance holds a few hundred values
PROVENANCE_TEXT = 10000  # characters of one text value


def _plain_provenance(value, depth: int = 0, budget: list | None = None):
    """A checkpoint's free-form provenance as JSON can hold it: mapping keys as text (a tuple key
    made `pamsegment info` fail), tensors and other objects as their text (cut at PROVENANCE_TEXT
    characters), nesting cut at 32 and the whole at PROVENANCE_ITEMS values ("..." beyond): a 1 KB
    pickle of 30 levels of one shared two-item list unfolds into 2**30 values, and every load
    (info, propagate, Slicer) ran out of memory copying it."""
    budget = [PROVENANCE_ITEMS] if budget is None else budget
    budget[0] -= 1
    if depth > 32 or budget[0] < 0:
        return "..."
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if budget[0] < 0:
                out["..."] = "..."
                break
            out[(k if isinstance(k, str) else shown(k))[:PROVENANCE_TEXT]] = _plain_provenance(v, depth + 1, budget)
        return out
    if isinstance(value, (list, tuple)):
        out = []
        for v in value:
            if budget[0] < 0:
                out.append("...")
                break
            out.append(_plain_provenance(v, depth + 1, budget))
        return out
    if isinstance(value, float) and not math.isfinite(value):  # NaN/Infinity are not JSON (info --json)
        return str(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value if not isinstance(value, int) or abs(value) < 10 ** 100 else shown(value)
    if isinstance(value, str):
        return value[:PROVENANCE_TEXT]
    return shown(value, PROVENANCE_TEXT)


def training_chain(provenance) -> list[dict]:
    """A checkpoint's training runs, first to last: its provenance and, through ``init_from``, the
    provenance of the weights each run started from (for the card and ``pamsegment info``)."""
    chain, prov = [], provenance
    while isinstance(prov, dict) and prov:
        chain.append(prov)
        start = prov.get("init_from")
        prov = start.get("provenance") if isinstance(start, dict) else None
    return chain[::-1]


def default_checkpoint_path() -> Path | None:
    """The shipped default weights: $PAMSEGMENT_MODEL, the source tree's Resources/Models (also the
    layout of the Slicer extension), or the copy installed with the Python package."""
    env = os.environ.get("PAMSEGMENT_MODEL")
    if env:
        return Path(env)
    return shipped_checkpoint_path()


def shipped_checkpoint_path() -> Path | None:
    """The shipped weights themselves, whatever $PAMSEGMENT_MODEL says: the source tree's
    Resources/Models, or the copy installed with the Python package (None if neither is there)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "Resources" / "Models" / DEFAULT_MODEL_NAME,
                      here / "Resources" / "Models" / DEFAULT_MODEL_NAME):
        if candidate.is_file():
            return candidate
    try:
        installed = resources.files("PAMSegmentLib.models") / DEFAULT_MODEL_NAME
        if installed.is_file():
            return Path(str(installed))
    except (ModuleNotFoundError, TypeError):
        pass
    return None


def _same_file(a, b) -> bool:
    try:
        return a is not None and b is not None and os.path.samefile(a, b)
    except OSError:  # either is missing: the load reports it
        return False


def _is_default_weights(path: str | os.PathLike) -> bool:
    """``path`` is the default weights ($PAMSEGMENT_MODEL's file or the shipped one) or the shipped
    file itself (held to its card whatever the variable says)."""
    return _same_file(path, default_checkpoint_path()) or _is_shipped(path)


def _is_shipped(path) -> bool:
    return _same_file(path, shipped_checkpoint_path())


def shipped_weights_sha256() -> str | None:
    """The shipped weights' sha256 as their model card gives it (without loading them, or torch
    doing anything), None if unknown: what a server's weights are compared with."""
    path = shipped_checkpoint_path()
    try:
        card = json.loads(path.with_suffix(".json").read_text(encoding="utf-8")) if path is not None else None
    except (OSError, ValueError):
        return None
    return card.get("sha256_weights") if isinstance(card, dict) else None


def _card_naming(card_path: Path, name: str):
    """(the card at ``card_path`` if it names the weights file ``name`` with a sha256, else None; the
    error that kept it from being read, if any)."""
    try:
        card = json.loads(card_path.read_text(encoding="utf-8-sig"))  # (Notepad's byte-order mark)
    except (OSError, ValueError, RecursionError) as exc:
        return None, exc
    if not isinstance(card, dict) or card.get("file") != name or not isinstance(card.get("sha256_weights"), str):
        return None, None
    return card, None


def _something_at(path: Path) -> bool:
    """Whether anything is at ``path`` (a file, a folder, a link, also a broken one or a loop); False
    where nothing can be: a name too long for the file system."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as error:
        return error.errno != errno.ENAMETOOLONG
    return True


def _check_model_card(path: Path, model: PAMModel) -> None:
    """The default weights against their model card, ``<name>.json`` beside them (written by
    scripts/make_model_card.py): the weights' sha256, computed while loading anyway (no second
    pass over the file), must be the one the card records. A damaged install, or a file replaced
    by other weights, is refused. A checkpoint with no card naming it is not checked, except the
    shipped file, whose card is part of the install (missing, unreadable or naming another file,
    it was skipped without a word). For a link (symbolic or hard, /dev/stdin) both the card beside
    the name given (a model hub's links to blobs) and the one beside the file itself are held: the
    shipped weights' card is beside their file only."""
    advice = ("the install is damaged or the file was replaced: reinstall PAMSegment (if you changed the weights "
              "on purpose, write the card again with scripts/make_model_card.py)")
    given = Path(path)
    real = shipped_checkpoint_path() if _is_shipped(path) else Path(os.path.realpath(path))
    places = [(given.with_suffix(".json"), given.name)]
    if str(real) != str(given.absolute()) and (real.with_suffix(".json"), real.name) != places[0]:
        places.append((real.with_suffix(".json"), real.name))
    cards = []
    for card_path, name in places:
        card, exc = _card_naming(card_path, name)
        if exc is not None and _something_at(card_path):  # (damaged, it was skipped without a word: the weights
            # went unchecked; a hostile trial, session 47. A name too long to have a card has none: a re-review)
            raise CheckpointError(f"checkpoint {path}: {card_path.name}, where its model card would be, cannot be "
                                  f"read ({type(exc).__name__}), so the weights cannot be checked against a card; "
                                  "mend it (write the card again with scripts/make_model_card.py) or move it away")
        if card is not None:
            cards.append((card_path, card))
    if _is_shipped(path):
        card_path = real.with_suffix(".json")
        card, exc = _card_naming(card_path, real.name)
        if exc is not None:
            raise CheckpointError(f"the shipped weights {path} have no readable model card {card_path.name} beside "
                                  f"them ({type(exc).__name__}); {advice}")
        if card is None:
            raise CheckpointError(f"the model card {card_path.name} beside the shipped weights {path} is not theirs "
                                  f"(no 'file': {shown(real.name)} with a 'sha256_weights'); {advice}")
    for card_path, card in cards:
        if card["sha256_weights"] != model.sha256:
            raise CheckpointError(
                f"checkpoint {path} does not match its model card {card_path.name}: its weights' sha256 is "
                f"{model.sha256[:16]}..., the card's {card['sha256_weights'][:16]}...; {advice}")
        # The header's settings too: a byte changed there (a threshold) loads and runs, with other results.
        for section, values in (("network", model.config.to_dict()), ("preprocessing", asdict(model.preprocessing)),
                                ("inference", asdict(model.inference))):
            recorded = card.get(section)
            if not isinstance(recorded, dict):
                continue
            loaded = json.loads(json.dumps(values, default=str))
            for key in sorted(recorded):  # the card's keys: a setting added to the code later is no mismatch
                if key in loaded and recorded[key] != loaded[key]:
                    raise CheckpointError(
                        f"checkpoint {path} does not match its model card {card_path.name}: its {section} {key} is "
                        f"{shown(loaded.get(key))}, the card's {shown(recorded.get(key))}; {advice}")


def load_model(path: str | os.PathLike | None = None, device: str = "cpu") -> PAMModel:
    """Load a checkpoint, or the shipped default weights when ``path`` is None. The default
    weights (also when ``path`` is their file) are checked against their model card."""
    if path is not None:
        _refuse_empty_path(path)
    if path is None:
        path = default_checkpoint_path()
        if path is None:
            raise CheckpointError(
                "no default PAM weights are installed; pass a checkpoint (--checkpoint FILE), e.g. the "
                "official propmask.pth from the PAM authors"
            )
        if os.environ.get("PAMSEGMENT_MODEL"):
            try:
                return _load_default(Path(path), device)
            except CheckpointError as exc:  # say where the file came from: a variable set long ago
                raise CheckpointError(f"{exc} (the file PAMSEGMENT_MODEL names; point it at a good checkpoint, "
                                      "unset it, or pass --checkpoint CKPT)") from None
        return _load_default(Path(path), device)
    if _is_default_weights(path):
        return _load_default(Path(path), device)
    return load_checkpoint_file(path, device=device)


def _load_default(path: Path, device: str) -> PAMModel:
    model = load_checkpoint_file(path, device=device)
    _check_model_card(path, model)
    return model


def describe_checkpoint(path: str | os.PathLike) -> dict:
    """What `pamsegment info` prints. Raises CheckpointError when the file does not load (or, for
    the default weights, does not match their model card)."""
    model = load_model(path)  # the default weights are held to their model card there
    return {
        "file": str(path),
        "size_mb": round(Path(path).stat().st_size / 1e6, 2),
        "kind": model.kind,
        "network": model.config.to_dict(),
        "parameters": model.network.n_parameters(),
        "preprocessing": model.preprocessing.to_dict(),
        "inference": model.inference.to_dict(),
        "sha256": model.sha256,
        "settings": settings_digest(model),  # (as `pamsegment batch` reports name it, with the sha256)
        "provenance": model.provenance,
        "loads": True,
    }
