"""Volume and label-map I/O with SimpleITK.

This is one of the two edges where ITK order meets library order (the other is the MRML
adapter). Inside the library arrays are (k, j, i) = (slice, row, column) and spacing is in
the same order; SimpleITK's size and spacing are (i, j, k). Origin and direction are kept
exactly as SimpleITK gives them (physical LPS x, y, z; direction row-major 3x3), since they
describe physical space, not array axes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import errno
import math
import os
import re
import struct
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence, Union

import numpy as np
import SimpleITK as sitk

from .errors import InputError

__all__ = [
    "Volume",
    "read_volume",
    "read_labelmap",
    "write_labelmap",
    "write_volume",
    "same_grid",
    "check_output_path",
    "check_geometry_fits",
    "read_image_2d",
    "read_labelmap_2d",
    "write_labelmap_2d",
    "IMAGE_2D_EXTENSIONS",
    "MASK_2D_EXTENSIONS",
    "SeriesChoiceWarning",
    "check_folder_writable",
    "make_writable_folder",
]

PathLike = Union[str, os.PathLike]  # not `str | os.PathLike`: Slicer 5.6-5.8 run Python 3.9

# Longest first so ".seg.nrrd" wins over ".nrrd" and ".nii.gz" over ".gz".
_WRITE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
_READ_HINT = "expected NIfTI (.nii/.nii.gz), NRRD (.nrrd/.seg.nrrd), MetaImage (.mha/.mhd) or a DICOM folder"


class SeriesChoiceWarning(UserWarning):
    """A DICOM folder holds several series: which one was read (``series_uid`` chooses another)."""


@dataclass
class Volume:
    """A 3D image or label map on a physical grid.

    array: shape (K, J, I) = (slices, rows, columns), i.e. ``sitk.GetArrayFromImage`` order.
    spacing: voxel size in mm in (k, j, i) order (the reverse of ``sitk.Image.GetSpacing()``);
        think of it as ``spacing_kji``.
    origin: physical position (LPS x, y, z, mm) of voxel (0, 0, 0), as SimpleITK gives it.
    direction: 9 floats, ITK's row-major direction cosine matrix (columns are the i, j, k axes).
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    # A NIfTI-1 file's (qform_code, sform_code) as read (MNI 4, aligned 2 ...), for label maps
    # written on this grid to keep its space; None for other files (``read_volume`` sets it).
    nifti_codes: tuple[int, int] | None = field(default=None, compare=False, repr=False)
    # A label map ``read_labelmap`` put on a reference grid from a file covering only part of it: where
    # its file holds voxels, as the box (a tuple of slices) of a cropped .seg.nrrd put back on the
    # lattice, or a boolean array of the reference's shape for a map resampled from a smaller grid when
    # asked (read_labelmap's coverage=: a corrected copy of a result); None where it covers the whole
    # grid (or was not asked). Outside, the map is 0: not in the file.
    covered: tuple | np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (K, J, I)."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        """Same as ``spacing``: mm per voxel in (k, j, i) order."""
        return self.spacing

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Grid size in ITK order (I, J, K)."""
        return tuple(reversed(self.shape))  # type: ignore[return-value]

    @property
    def spacing_ijk(self) -> tuple[float, float, float]:
        """Spacing in ITK order (i, j, k)."""
        return tuple(reversed(self.spacing))  # type: ignore[return-value]

    def apply_geometry(self, image: sitk.Image) -> sitk.Image:
        """Set this volume's spacing, origin and direction on ``image`` (same size) and return it."""
        image.SetSpacing(self.spacing_ijk)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_sitk(self, array: np.ndarray | None = None) -> sitk.Image:
        """SimpleITK image of ``array`` (default: this volume's array, shape (K, J, I)) on this grid."""
        data = self.array if array is None else array
        if tuple(data.shape) != self.shape:
            raise InputError(f"array shape {tuple(data.shape)} does not match the volume grid {self.shape} (k, j, i)")
        if data.dtype == bool:
            data = data.astype(np.uint8)
        return self.apply_geometry(sitk.GetImageFromArray(np.ascontiguousarray(data)))

    def reference_image(self) -> sitk.Image:
        """Empty (uint8) SimpleITK image carrying this grid, e.g. for ``CopyInformation``."""
        return self.apply_geometry(sitk.Image(list(self.size_ijk), sitk.sitkUInt8))

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> "Volume":
        """Volume from a 3D scalar SimpleITK image (array copied, order converted to (k, j, i))."""
        return cls(
            array=sitk.GetArrayFromImage(image),
            spacing=tuple(float(s) for s in reversed(image.GetSpacing())),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in image.GetDirection()),
        )


def same_grid(a: Volume, b: Volume, tol: float = 1e-4) -> list[str]:
    """Names of the grid properties that differ between ``a`` and ``b``: a subset of
    ["size", "spacing", "origin", "direction"]; empty when the grids match.

    size must match exactly; spacing within ``tol`` relative; origin within ``tol`` relative to
    max(1 mm, |coordinate|) (files store positions as float32 or decimal strings); direction
    cosines within ``tol`` absolute.
    """
    diffs: list[str] = []
    if a.shape != b.shape:
        diffs.append("size")
    if any(abs(x - y) > tol * max(abs(x), abs(y)) for x, y in zip(a.spacing, b.spacing)):
        diffs.append("spacing")
    if any(abs(x - y) > tol * max(1.0, abs(x), abs(y)) for x, y in zip(a.origin, b.origin)):
        diffs.append("origin")
    if any(abs(x - y) > tol for x, y in zip(a.direction, b.direction)):
        diffs.append("direction")
    return diffs


# ----------------------------------------------------------------------------- reading


def _fmt_size(size: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in size)


def _itk_reason(error: RuntimeError) -> str:
    """Last line of an ITK exception, without the source-file location noise; where that line is
    only numbers (a matrix's last row: a singular direction's message ended in "0 0 1"), the
    ``ITK ERROR:`` line's text instead, its object address dropped and cut before "Refusing ..."."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    reason = lines[-1] if lines else "unknown error"
    if not re.sub(r"[-+0-9.eE\s\[\],]", "", reason):
        for line in lines:
            if line.startswith("ITK ERROR:"):
                text = line.removeprefix("ITK ERROR:").strip()
                text = text.split("): ", 1)[1] if text.split("(", 1)[0].isidentifier() and "): " in text else text
                return text.split(". Refusing", 1)[0].rstrip(".").strip() or reason
    # (an ITK object's address, "PNGImageIO(0x55da41613ea0):", on Windows "TIFFImageIO(0000000008E35880):", is noise)
    return re.sub(r"(?<=\w)\((0x)?[0-9a-fA-F]{8,16}\)", "", reason.removeprefix("sitk::ERROR:").strip())


# What a file holds, by its first bytes, for a file ITK found no reader for (its name's extension
# then names another format: a JPEG saved as .png, a gzip stream named .nii).
_MAGIC = ((b"\x1f\x8b", "gzip-compressed", ".nii.gz"),
          (b"\x89PNG\r\n\x1a\n", "a PNG image", ".png"), (b"\xff\xd8\xff", "a JPEG image", ".jpg"),
          (b"II*\x00", "a TIFF image", ".tif"), (b"MM\x00*", "a TIFF image", ".tif"),
          (b"NRRD000", "an NRRD image", ".nrrd"), (b"BM", "a BMP image", ".bmp"))


def _content_kind(p: Path) -> tuple[str, str] | None:
    """(what the file holds, the extension that names it) by its first bytes, when its own name's
    extension names something else; None when it does not tell or the name fits."""
    try:
        with open(p, "rb") as f:
            head = f.read(352)
    except OSError:
        return None
    found = next(((kind, ext) for magic, kind, ext in _MAGIC if head.startswith(magic)), None)
    if found is None and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        found = ("an uncompressed NIfTI image", ".nii")
    if found is None and any(head.lstrip().startswith(k) for k in (b"ObjectType", b"NDims")):
        found = ("a MetaImage", ".mha")
    name = p.name.lower()
    also = {".jpg": (".jpeg",), ".tif": (".tiff",), ".mha": (".mhd",), ".nrrd": (".nhdr", ".seg.nrrd"),
            ".nii": (".hdr", ".img")}
    if found is None or name.endswith((found[1], *also.get(found[1], ()))):
        return None
    return found


def _nifti2_magic(p: Path) -> bool:
    """Whether ``p`` (plain or gzip-compressed) starts as a NIfTI-2 header ("n+2" at byte 4)."""
    import gzip
    import zlib

    try:
        with open(p, "rb") as f:
            head = f.read(8)
        if head.startswith(b"\x1f\x8b"):
            with gzip.open(p, "rb") as f:
                head = f.read(8)
    except (OSError, EOFError, zlib.error):
        return False
    return head[4:7] == b"n+2"


def _named_as_another_kind(p: Path) -> str | None:
    """"X is a JPEG image named .png: rename it to .jpg" for a file whose contents and name disagree;
    also an empty file and the formats ITK has no reader for (GIF, WebP: "is the file damaged?")."""
    try:
        with open(p, "rb") as f:
            head = f.read(16)
    except OSError:
        head = None
    if head == b"":
        return f"{p.name} is empty (0 bytes); copy or export it again"
    if head and (head[:6] in (b"GIF87a", b"GIF89a") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")):
        return (f"{p.name} is a {'GIF' if head[:3] == b'GIF' else 'WebP'} image, which SimpleITK (and so this tool) "
                "cannot read; save it as PNG")
    kind = _content_kind(p)
    if kind is None:
        return None
    ext = "".join(p.suffixes[-2:]) if p.name.lower().endswith(".nii.gz") else p.suffix
    renamed = p.name[:len(p.name) - len(ext)] + kind[1]
    if kind[1] == ".nii.gz":  # gzip holds anything; a compressed NIfTI is what a scan's .gz usually is
        return f"{p.name} is gzip-compressed but its name ends in {ext or 'no extension'}: if it is a compressed " \
               f"NIfTI image, rename it to {renamed}"
    return f"{p.name} is {kind[0]} but its name ends in {ext or 'no extension'}: rename it to {renamed}"


@contextlib.contextmanager
def _itk_warnings_hidden():
    """ITK's warnings (printed by the C++ library on stderr) hidden inside: what they say is
    checked and reported in one line by the caller."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


@contextlib.contextmanager
def _native_stderr_hidden():
    """What C libraries print on file descriptor 2 inside (NIfTI's "** ERROR: NWAD: wrote only ...",
    MetaImage's and libtiff's lines on a full disk) discarded: the write is checked afterwards and
    a failure reported in one line. Python's own sys.stderr is flushed first, and descriptor 2 is
    restored on the way out."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no descriptor 2 (an embedded interpreter): nothing to hide
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _itk_path(path) -> str:
    """``path`` as the string ITK is given. A name holding bytes that are not UTF-8 (an old archive's
    Latin-1 folder: Python keeps them as surrogates) makes ITK's C++ abort the whole process, so it
    is refused here with one line instead."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise InputError(f"the path {shown} holds bytes that are not UTF-8 text, which ITK cannot open; rename the "
                         "file or folder (e.g. with convmv) or copy it to a plain name") from None
    return text


def dicom_series_ids(folder: Path) -> list[str]:
    """The SeriesInstanceUIDs of the DICOM series in ``folder`` (GDCM's reading; [] for none)."""
    with _itk_warnings_hidden():  # "No Series were found": the caller says it, in one line
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(_itk_path(folder)))


def _largest_image_series(series_ids, by_uid: dict) -> tuple[str, list[str]]:
    """The series a folder is read as when none is asked for: the largest of its series of images
    (a DICOM SEG lists as a one-file series too, and is never chosen over one), and the series it
    was chosen among."""
    images = [uid for uid in series_ids if by_uid[uid] and _dicom_object_kind(Path(by_uid[uid][0])) is None]
    candidates = images or list(series_ids)
    return max(candidates, key=lambda uid: len(by_uid[uid])), candidates


def _subfolders_with_series(folder: Path, depth: int = 5, limit: int = 200) -> list[Path]:
    """Folders below ``folder`` (at most ``depth`` levels, ``limit`` folders looked at) that hold a
    DICOM series themselves, as a PACS export or a CD (DICOM/PATIENT/STUDY/SERIES: four levels below
    the disc's root, where 3 found nothing, a helper's trial, session 41) lays them out."""
    found, todo, seen = [], [(folder, 0)], 0
    while todo and seen < limit:
        here, level = todo.pop(0)
        try:
            subs = sorted(p for p in here.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            continue
        for sub in subs:
            seen += 1
            if seen > limit:
                break
            if dicom_series_ids(sub):
                found.append(sub)
            elif level + 1 < depth:
                todo.append((sub, level + 1))
    return found


def _series_label(uid: str) -> str:
    """A series for the messages: its UID, or what GDCM groups files without one under."""
    return uid if uid.strip() else "(files without a SeriesInstanceUID)"


def _series_offered(uid: str, files) -> str:
    """``_series_named`` for a list of series to choose from: files without a SeriesInstanceUID are
    chosen by an empty UID, which a user copying "--series UID" cannot guess (a bare ``--series``
    followed by nothing is refused by the command line)."""
    return _series_named(uid, files) + ("" if uid.strip() else f" (choose it with {_series_argument(uid)})")


def _series_argument(uid: str) -> str:
    """``--series`` and ``uid`` as typed in a shell: ``--series UID`` for a plain UID (digits and dots),
    ``--series=`` for the empty one (GDCM's for files without a SeriesInstanceUID; ``--series ""`` is
    dropped by Windows PowerShell before 7.3, leaving a bare --series), else in double quotes."""
    if not uid:
        return "--series="
    return f"--series {uid}" if all(c.isalnum() or c in ".-_" for c in uid) else f'--series "{uid}"'


def _series_named(uid: str, files) -> str:
    """``_series_label`` with what a user knows the series by, from its first file's header: its
    number, description and modality (``#3 "T2 AX" MR, 1.2.3...``); the UID alone where the header
    does not say (two series of one grid, T1 and T2, were told apart by their UIDs only)."""
    label = _series_label(uid)
    try:
        import pydicom  # noqa: PLC0415

        ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True,
                             specific_tags=["SeriesNumber", "SeriesDescription", "Modality"])
        number, text, modality = (str(ds.get(k, "") or "").strip() for k in ("SeriesNumber", "SeriesDescription",
                                                                          "Modality"))
    except Exception:  # noqa: BLE001 - a header that cannot be read: the UID says which series
        return label
    if not (number or text):  # (the modality alone tells few series apart)
        return label
    words = " ".join(w for w in (f"#{number}" if number else "", f'"{text[:64]}"' if text else "", modality) if w)
    return f"{words}, {label}"


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series_ids = dicom_series_ids(folder)
    if not series_ids:
        below = _subfolders_with_series(folder)
        if below:
            shown = ", ".join(str(b) for b in below[:4]) + (f" and {len(below) - 4} more" if len(below) > 4 else "")
            uids = {tuple(dicom_series_ids(b)) for b in below[:16]}
            if len(below) > 1 and len(uids) == 1 and len(next(iter(uids))) == 1:  # one series split over folders
                raise InputError(f"{folder} holds no DICOM series itself; its subfolders ({shown}) hold parts of one "
                                 "series (the same SeriesInstanceUID), as exports that cap the files per folder save "
                                 "them: put its files in one folder and pass that folder (one part alone is a partial "
                                 "scan)")
            raise InputError(f"{folder} holds no DICOM series itself, but its subfolders do ({shown}): pass the folder "
                             "of the series to propagate on")
        for f in sorted(folder.iterdir())[:1000]:  # a folder of a DICOM SEG or RT structure set: said what it is
            if f.is_file():
                _refuse_dicom_objects_not_images(f)
        raise InputError(f"{folder} is a folder without a DICOM series; pass a DICOM series folder or an image file")
    by_uid = {uid: reader.GetGDCMSeriesFileNames(_itk_path(folder), uid) for uid in series_ids}  # one scan each
    if series_uid is not None:
        if series_uid not in series_ids:
            _check_no_damaged_files(folder, by_uid, None)  # a cut file may be that series' only one
            raise InputError(
                f"series {series_uid} is not in {folder}; available series: "
                f"{'; '.join(_series_offered(uid, by_uid[uid]) for uid in series_ids)}"
            )
        chosen = series_uid
        files = by_uid[chosen]
        _check_no_damaged_files(folder, by_uid, chosen)
    else:
        chosen, candidates = _largest_image_series(series_ids, by_uid)
        files = by_uid[chosen]
        _check_no_damaged_files(folder, by_uid, chosen)
        if len(series_ids) > 1:
            ties = sum(len(by_uid[uid]) == len(files) for uid in candidates)
            which = "the largest" if ties == 1 else f"the first of {ties} series of that size"
            others = [uid for uid in series_ids if uid != chosen]  # named, so that one can be chosen (a trial, s36)
            listed = "; ".join(f"{_series_offered(uid, by_uid[uid])} ({len(by_uid[uid])} file"
                               f"{'s' if len(by_uid[uid]) != 1 else ''})"
                               for uid in others[:4]) + (f"; and {len(others) - 4} more" if len(others) > 4 else "")
            warnings.warn(
                f"{folder} holds {len(series_ids)} DICOM series; using {_series_named(chosen, files)} ({len(files)} "
                f"files), {which}; the other{'s' if len(others) > 1 else ''}: {listed}.",
                SeriesChoiceWarning,
                stacklevel=3,
            )
    try:
        return _read_series_files(files, chosen, folder)
    except InputError as refusal:
        # A localizer (scout) saved under the series' UID: a file of another orientation or size in the
        # stack, refused as "echoes or phases" or with a bare ITK size. Left out, as dcm2niix and Slicer do;
        # so are screenshots (colour, or without a position) and second copies of one file (its SOP UID).
        infos = _header_infos(files)
        seen, copies = {}, []
        for f, info in zip(files, infos):
            uid = info[2] if info is not None else ""
            if uid and uid in seen:
                copies.append((f, seen[uid]))
            elif uid:
                seen[uid] = f
        rest = [(f, i) for f, i in zip(files, infos) if f not in {c for c, _ in copies}]
        odd = _odd_files([f for f, _ in rest], [i for _, i in rest])
        if not (odd or copies):
            raise refusal from None
        if len(odd) > max(2, len(files) // 20):  # too many to be localizers: said as what they are (a stack of
            # several orientations, per-disc spine slabs, was refused as a "gantry tilt" with the wrong remedy)
            shown = ", ".join(Path(f).name for f in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
            raise InputError(f"series {_series_label(chosen)} in {folder} holds files of several orientations or "
                             f"sizes: {len(odd)} of its {len(files)} files ({shown}) differ from the rest (localizers, "
                             "or stacks of several orientations?); a volume needs one: remove those files, or split "
                             "the series into one folder per orientation (e.g. dcm2niix)") from None
        kept = [(f, i) for f, i in rest if f not in odd]
        image = _read_series_files(_by_position([f for f, _ in kept], [i for _, i in kept]), chosen, folder)
    if copies:
        shown = ", ".join(f"{Path(c).name} (= {Path(o).name})" for c, o in copies[:3]) + (
            f" and {len(copies) - 3} more" if len(copies) > 3 else "")
        warnings.warn(f"{folder}: left out {len(copies)} file(s) of series {_series_label(chosen)} that repeat another "
                      f"file's SOPInstanceUID ({shown}: copies of one slice)", UserWarning, stacklevel=3)
    if odd:
        shown = ", ".join(Path(f).name for f in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        warnings.warn(f"{folder}: left out {len(odd)} file(s) of series {_series_label(chosen)} whose orientation, "
                      f"size, colour or position information differs from the other "
                      f"{len(files) - len(odd) - len(copies)} ({shown}: a localizer or a screenshot?)", UserWarning,
                      stacklevel=3)  # not a choice of series: no "choose another with --series" after it
    return image


def _check_no_damaged_files(folder: Path, by_uid: dict, chosen: str | None) -> None:
    """Image files of ``folder`` ("DICM" at byte 128, an image storage class in their meta header)
    that belong to none of its series (``by_uid``: each series' files) and whose header ITK cannot
    read are damaged (a copy cut short): GDCM leaves them out without a word, so a cut end slice
    gave a series one slice shorter, exit 0 (a cut middle slice a "gap ... missing files?" message).
    Refused, naming them. Other DICOM objects beside the slices (a structure set, a dose report, a
    presentation state), which ITK cannot read either, are none of this check's business; so is a
    file whose meta header names no storage class this check knows, and a damaged file whose
    SeriesInstanceUID can still be read and is not the ``chosen`` series' (None: every series')."""
    listed = {Path(f).name for files in by_uid.values() for f in files}
    damaged = []
    for p in sorted(folder.iterdir()):
        if p.name in listed or p.name.upper() == "DICOMDIR" or p.name.startswith(".") or not p.is_file() \
                or not _is_dicom_file(p):
            continue  # hidden files too: macOS leaves "._IM0001.dcm" sidecars on exFAT, FAT and SMB drives
        if _dicom_image_class(p) is False:  # another kind of object (True: an image; None: no readable meta header)
            continue
        if chosen is not None and _raw_series_uid(p) not in (None, chosen):
            continue  # a damaged file of another series than the one read
        reader = sitk.ImageFileReader()
        reader.SetFileName(_itk_path(p))
        try:
            with _itk_warnings_hidden(), _native_stderr_hidden():
                reader.ReadImageInformation()
        except RuntimeError:
            damaged.append(p.name)
    if damaged:
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        raise InputError(f"{len(damaged)} DICOM file{'s' if len(damaged) > 1 else ''} in {folder} cannot be read "
                         f"(truncated or damaged: {shown}), so the series would lack "
                         f"{'them' if len(damaged) > 1 else 'it'}; copy the series again")


# DICOM image storage classes (PS3.4 B.5): a file of one of these that ITK cannot read is damaged.
_IMAGE_STORAGE = {f"1.2.840.10008.5.1.4.1.1.{c}" for c in (
    "1", "1.1", "1.1.1", "1.2", "1.2.1", "1.3", "1.3.1", "2", "2.1", "2.2", "3.1", "4", "4.1", "4.3", "4.4",
    "6.1", "6.2", "7", "7.1", "7.2", "7.3", "7.4", "12.1", "12.1.1", "12.2", "12.2.1", "13.1.1", "13.1.2", "13.1.3",
    "20", "30", "128", "128.1", "130", "481.1", "77.1.1", "77.1.2", "77.1.4", "77.1.5.1", "77.1.5.2", "77.1.6")}


# Value representations whose length is 4 bytes after 2 reserved ones (explicit VR), PS3.5 7.1.2.
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"SV", b"UV", b"UT", b"UN", b"UC", b"UR")


def _dicom_meta(head: bytes) -> tuple[dict[int, str], int] | None:
    """A DICOM file's meta header (group 0002, explicit VR little endian as PS3.10 fixes it) from
    its first bytes ``head``: ({element: its value as text, for values read whole}, where the data
    set starts); None without "DICM" at byte 128 or with a malformed header (not explicit VR)."""
    import struct

    if head[128:132] != b"DICM":
        return None
    values, at = {}, 132
    while at + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, at)
        if group != 0x0002:
            break
        vr = head[at + 4:at + 6]
        if not (vr.isalpha() and vr.isupper()):
            return None
        if vr in _LONG_VRS:
            if at + 12 > len(head):
                break
            length, value_at = struct.unpack_from("<I", head, at + 8)[0], at + 12
        else:
            length, value_at = struct.unpack_from("<H", head, at + 6)[0], at + 8
        if value_at + length <= len(head):
            values[element] = head[value_at:value_at + length].rstrip(b"\x00 ").decode("ascii", "replace")
        at = value_at + length
    return values, at


_DICOM_OBJECTS = {  # DICOM objects that are not images, given where an image or a label map is read
    "1.2.840.10008.5.1.4.1.1.66.4": ("a DICOM SEG (segmentation object)", "load it in 3D Slicer (with the "
                                     "QuantitativeReporting extension) and save the segmentation as .seg.nrrd, or "
                                     "convert it with dcmqi's segimage2itkimage"),
    "1.2.840.10008.5.1.4.1.1.481.3": ("a DICOM RT structure set (contours)", "load it with its images in 3D Slicer "
                                      "(with the SlicerRT extension) and save the segmentation as .seg.nrrd, or "
                                      "convert it to a label map (e.g. with dcmrtstruct2nii)"),
}


def _dicom_sop_class(p: Path) -> str | None:
    """The MediaStorageSOPClassUID (0002,0002) of the DICOM file ``p``'s meta header; None where no
    such header can be read (not DICOM, an empty or cut file, one without it)."""
    try:
        with open(p, "rb") as fh:
            meta = _dicom_meta(fh.read(132 + 4096))
    except OSError:
        return None
    return None if meta is None else meta[0].get(0x0002)


def _dicom_object_kind(p: Path) -> tuple[str, str] | None:
    """(what it is, how to convert it) for a DICOM SEG or RT structure set (by its SOP class), else None."""
    return _DICOM_OBJECTS.get(_dicom_sop_class(p) or "")


def _refuse_dicom_objects_not_images(p: Path) -> None:
    """InputError for a DICOM SEG or RT structure set: GDCM read a SEG's segments all as 255 (several
    segments merged into one label, exit 0) and an RTSTRUCT not at all ("cannot determine ImageIO
    reader"), neither saying what the file is."""
    found = _dicom_object_kind(p)
    if found is not None:
        raise InputError(f"{p.name} is {found[0]}, which PAMSegment does not read: {found[1]}, and give that file")


def _dicom_image_class(p: Path) -> bool | None:
    """Whether the DICOM file ``p`` says in its meta header (MediaStorageSOPClassUID, 0002,0002)
    that it holds an image: True, or False for other objects (structure sets, reports,
    presentation states, spectroscopy); None where no such header can be read (an empty file, one
    cut inside it, one without it): such a file is checked as an image would be (a cut copy of a
    slice may look like this)."""
    sop_class = _dicom_sop_class(p)
    return None if sop_class is None else sop_class in _IMAGE_STORAGE


def _raw_series_uid(p: Path, limit: int = 65536) -> str | None:
    """The SeriesInstanceUID (0020,000E) of the DICOM file ``p`` from its first ``limit`` bytes,
    without ITK (a cut file it cannot read still holds it before its pixel data): its top-level
    elements walked in order (sequences of undefined length skipped through their delimiters),
    explicit or implicit VR little endian as its meta header says. None where that cannot be done
    (big endian or deflated, a file cut before it): such a file is taken for one of the series read. A UID found
    anywhere in the bytes could be one a sequence refers to (Referenced Series), not the file's."""
    import struct

    try:
        with open(p, "rb") as fh:
            head = fh.read(limit)
    except OSError:
        return None
    meta = _dicom_meta(head)
    if meta is None:
        return None
    values, at = meta
    syntax = values.get(0x0010)  # TransferSyntaxUID
    if syntax is None or syntax in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
        return None  # big endian, deflated: not walked here
    explicit = syntax != "1.2.840.10008.1.2"  # every other syntax encodes the data set in explicit VR LE

    def element_at(at: int):
        """(tag, value start, value length) of the element at ``at``; None past the bytes read."""
        if at + 8 > len(head):
            return None
        tag = struct.unpack_from("<HH", head, at)
        if tag[0] == 0xFFFE or not explicit:  # items and delimiters: always tag + 4-byte length
            return tag, at + 8, struct.unpack_from("<I", head, at + 4)[0]
        if head[at + 4:at + 6] in _LONG_VRS:
            return (tag, at + 12, struct.unpack_from("<I", head, at + 8)[0]) if at + 12 <= len(head) else None
        return tag, at + 8, struct.unpack_from("<H", head, at + 6)[0]

    def past_undefined(at: int, depth: int = 0) -> int | None:
        """Where the element of undefined length whose value starts at ``at`` ends (its items, each of
        defined length or up to its delimiter, then the sequence delimiter); None if beyond the bytes."""
        while depth < 8:
            found = element_at(at)
            if found is None:
                return None
            tag, value_at, length = found
            if tag == (0xFFFE, 0xE0DD):  # the sequence's end
                return value_at
            if tag != (0xFFFE, 0xE000):
                return None
            if length != 0xFFFFFFFF:
                at = value_at + length
                continue
            at = value_at  # an item of undefined length: its elements up to the item's delimiter
            while True:
                found = element_at(at)
                if found is None:
                    return None
                tag, value_at, length = found
                if tag == (0xFFFE, 0xE00D):
                    at = value_at
                    break
                at = past_undefined(value_at, depth + 1) if length == 0xFFFFFFFF else value_at + length
                if at is None:
                    return None
        return None

    while True:  # the data set's top-level elements, in ascending order
        found = element_at(at)
        if found is None:
            return None
        (group, element), value_at, length = found
        if (group, element) > (0x0020, 0x000E):
            return None
        if (group, element) == (0x0020, 0x000E):
            value = head[value_at:value_at + length]
            uid = value.rstrip(b"\x00 ").decode("ascii", "replace")
            ok = len(value) == length and 0 < length <= 64 and uid and all(c.isdigit() or c == "." for c in uid)
            return uid if ok else None
        at = past_undefined(value_at) if length == 0xFFFFFFFF else value_at + length
        if at is None:
            return None


def _read_series_files(files, chosen: str, folder: Path) -> sitk.Image:
    what = f"DICOM series {_series_label(chosen)} in {folder}"
    _refuse_dicom_objects_not_images(Path(files[0]))  # GDCM lists a DICOM SEG as a series of images
    if len(files) == 1:  # one file: read as a file (a multi-frame one read as a series came back 4D)
        try:
            with _itk_warnings_hidden():
                image = sitk.ReadImage(files[0])
        except RuntimeError as error:
            raise InputError(f"cannot read {what} ({_itk_reason(error)})") from None
        _check_multiframe(Path(files[0]), image, what)
        _check_orientation_kept(image.GetMetaData("0020|0037") if image.HasMetaDataKey("0020|0037") else "", image,
                                what)
        return image
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        # (its spacing warning: checked below, in one line; GDCM's decoder lines stay on the terminal: a
        # damaged JPEG slice is said there only, "Corrupt JPEG data", the read succeeding; a re-review, s41)
        with _itk_warnings_hidden():
            image = reader.Execute()
    except RuntimeError as error:
        raise InputError(f"cannot read DICOM series {_series_label(chosen)} in {folder} ({_itk_reason(error)})") from None
    _check_slice_positions(reader, image, what)
    _check_orientation_kept(reader.GetMetaData(0, "0020|0037") if reader.HasMetaDataKey(0, "0020|0037") else "",
                            image, what)
    _check_pixel_spacings(reader, what)
    return image


def _check_orientation_kept(text: str, image: sitk.Image, what: str) -> None:
    """The axes ITK read must be the files' ImageOrientationPatient (``text``): GDCM replaces row and
    column directions that are not at right angles within 1e-3 (or not of unit length) by the identity
    without a word, so a series written with slightly skewed directions was read, and its result
    written, mirrored or rotated against the scan (exit 0; a trial, session 45)."""
    try:
        values = np.asarray([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        return
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        return
    row, col = values[:3], values[3:]
    if min(np.linalg.norm(row), np.linalg.norm(col)) < 1e-6:
        return
    axes = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    want = (row / np.linalg.norm(row), col / np.linalg.norm(col))
    if max(float(np.abs(axes[:, 0] - want[0]).max()), float(np.abs(axes[:, 1] - want[1]).max())) <= 0.01:
        return
    cosine = float(np.dot(*want))
    raise InputError(f"{what}: its ImageOrientationPatient ({text.strip()}) gives row and column directions that are "
                     + (f"not at right angles (cosine {cosine:.2g})" if abs(cosine) > 1e-3 else "not of unit length")
                     + ", which ITK's DICOM reader replaces by the identity axes without a word (the volume would be "
                     "mirrored or rotated against the scan); convert the series with a tool that corrects its "
                     "orientation (e.g. dcm2niix or Slicer's DICOM module) and give the converted volume")


def _check_pixel_spacings(reader: sitk.ImageSeriesReader, what: str) -> None:
    """ITK stacks a series on one file's PixelSpacing whatever the others say: a file of another
    spacing (another field of view) in a series was read at the scale of the rest, or scaled all
    of them when it came first (exit 0; a trial, session 45). Refused, naming the files that differ
    from a file of the most common spacing by more than 0.1 % or its 4-decimal rounding."""
    from collections import Counter

    names = reader.GetFileNames()
    texts, values = [], []
    for k in range(len(names)):
        try:
            text = reader.GetMetaData(k, "0028|0030").strip()
            values.append(np.asarray([float(v) for v in text.split("\\")[:2]], dtype=np.float64))
            texts.append(" x ".join(f"{v:g}" for v in values[-1]))
        except (RuntimeError, ValueError):
            values.append(None)
            texts.append("")
    known = [k for k, v in enumerate(values) if v is not None and v.shape == (2,)]
    if len(known) < 2:
        return
    def same(a, b) -> bool:
        # 0.1 % of the spacing (the same value written with other decimals: 0.78125 and 0.7813), and a
        # value rounded to 4 decimals as the same (a review: an absolute 1e-4 let a 0.0006 mm file pass
        # among 0.0005 mm ones)
        return bool(np.all((np.abs(a - b) <= 1e-3 * np.maximum(a, b))
                           | (np.round(a, 4) == np.round(b, 4)) & (np.maximum(a, b) >= 0.01)))

    # the reference: the spacing most files compare as the same to (reviews: the median named the
    # majority of 0.5, 0.5, 0.6, 0.7, 0.7 mm files as the odd ones; groups of 3 significant digits named
    # seven 1.0 mm files odd against a first one of 1.004 mm; groups in sorted order split one spacing
    # written two ways)
    distinct = {tuple(values[k]): k for k in reversed(known)}  # each value written, and its first file
    like = max(distinct.values(), key=lambda r: (sum(same(values[k], values[r]) for k in known), -r))
    odd = [k for k in known if not same(values[k], values[like])]
    kept = [k for k in known if k not in odd]
    if not same(np.min([values[k] for k in kept], axis=0), np.max([values[k] for k in kept], axis=0)):
        # "the same" chains (1.0, 1.0006, 1.0012 mm: a review): the most files written alike decide then
        counts = Counter(tuple(values[k]) for k in kept)
        like = distinct[counts.most_common(1)[0][0]]
        odd = [k for k in known if not same(values[k], values[like])]
    if not odd:
        return
    shown = ", ".join(f"{Path(names[k]).name} ({texts[k]} mm)" for k in odd[:3])
    shown += f" and {len(odd) - 3} more" if len(odd) > 3 else ""
    verb = "has" if len(odd) == 1 else "have"
    raise InputError(f"{what}: {len(odd)} of its {len(names)} files {verb} another pixel size (PixelSpacing) than the "
                     f"rest's {texts[like]} mm: {shown}; ITK would stack them all at one "
                     "file's scale. Remove those files (another reconstruction or field of view?), or convert the "
                     "series with a tool that resamples (e.g. dcm2niix or Slicer's DICOM module)")


def _header_infos(files) -> list:
    """Per file of a series, from its header only: (its kind: orientation (ImageOrientationPatient),
    size, samples per pixel and whether it stores a position; its position (ImagePositionPatient)
    or None; its SOPInstanceUID or ""), or None for a file whose header cannot be read."""
    reader = sitk.ImageFileReader()
    infos = []
    for f in files:
        try:
            reader.SetFileName(f)
            with _itk_warnings_hidden():
                reader.ReadImageInformation()

            def tag(key):
                return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else ""

            text = tag("0020|0037")
            orientation = tuple(round(float(v), 3) for v in text.split("\\")) if text else ()
            position = tuple(float(v) for v in tag("0020|0032").split("\\")[:3]) if tag("0020|0032") else None
            samples = tag("0028|0002") or "1"
            kind = (orientation, tuple(reader.GetSize()[:2]), samples, position is not None)
            infos.append((kind, position, tag("0008|0018").rstrip("\x00 ")))
        except (RuntimeError, ValueError):
            infos.append(None)
    return infos


def _odd_files(files, infos=None) -> list[str]:
    """The files of a series whose orientation (ImageOrientationPatient), size, samples per pixel
    (a colour screenshot) or storing of a position differs from the most common kind's (read from
    their headers only; ``infos``: ``_header_infos(files)`` if read already)."""
    from collections import Counter

    infos = _header_infos(files) if infos is None else infos
    kinds = [i[0] if i is not None else None for i in infos]
    common = Counter(k for k in kinds if k is not None).most_common(1)
    if not common:
        return []
    return [f for f, k in zip(files, kinds) if k != common[0][0]]


def _by_position(files, infos) -> list[str]:
    """``files`` (none odd) in the order of their positions along the slice normal, as GDCM sorts a
    series whose files all store one; as given where any does not. (With a file that stores none in
    the series, GDCM fell back to the files' name order: the series read head first, its slices
    numbered the other way than in Slicer; a trial, session 36.)"""
    known = {f: i for f, i in zip(files, infos) if i is not None}
    if len(known) != len(files) or any(i[1] is None or len(i[0][0]) != 6 for i in known.values()):
        return list(files)
    row, col = np.asarray(known[files[0]][0][0][:3]), np.asarray(known[files[0]][0][0][3:])
    normal = np.cross(row, col)
    return sorted(files, key=lambda f: float(np.dot(known[f][1], normal)))


def _check_slice_positions(reader: sitk.ImageSeriesReader, image: sitk.Image, what: str, tol: float = 0.1) -> None:
    """ITK stacks the files on one uniform grid and only warns when their positions are not
    uniform, so a missing slice, or two acquisitions (echoes, phases) at the same positions in
    one series, would give a wrong grid. Refuse those: slice positions (ImagePositionPatient
    along the slice normal) must step by the same spacing within ``tol`` of it."""
    n = image.GetSize()[2]
    if n < 2:
        return
    points = []
    for k in range(n):
        try:
            text = reader.GetMetaData(k, "0020|0032")
            points.append([float(v) for v in text.split("\\")[:3]])
        except (RuntimeError, ValueError):
            points.append(None)
    missing = sum(p is None for p in points)
    if missing == n:
        return  # positions not stored (e.g. secondary capture): nothing to check against
    if missing:  # screenshots filed under the scan's UID were stacked as slices (a trial, session 36)
        raise InputError(f"{what}: {missing} of its {n} files store no slice position (screenshots or secondary "
                         "captures filed with the scan?); remove them from the folder")
    _check_positions(np.asarray(points, dtype=np.float64), image, what, tol, names=reader.GetFileNames())


def _check_positions(points: np.ndarray, image: sitk.Image, what: str, tol: float = 0.1,
                     names: Sequence[str] | None = None) -> None:
    """``_check_slice_positions`` on the slices' ImagePositionPatient ``points`` (n, 3); ``names``:
    their files, to name two at one position."""
    n = len(points)
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    positions = points @ normal
    _check_no_gantry_tilt(points[np.argsort(positions)], normal, image, what)
    if n < 3:
        return
    order = np.argsort(positions, kind="stable")
    steps = np.diff(positions[order])
    spacing = float(np.median(steps))
    # one position twice: a step near 0 (a spacing that changes part-way, 2 mm then 2.5, has none;
    # it was called "echoes or phases", a trial, session 36)
    same = steps < max(0.1 * spacing, 1e-3)  # (mm; a median step of 0: half the files or more repeat)
    if same.any():
        first = int(np.flatnonzero(same)[0])
        pair = (f" (e.g. {Path(names[order[first]]).name} and {Path(names[order[first + 1]]).name})"
                if names is not None and len(names) == n else "")
        raise InputError(f"{what} has {int(same.sum())} slice position(s) occupied more than once{pair}: several "
                         "echoes or phases in one series, or copies of a file under another name; remove the copies, "
                         "or split the series into one per acquisition (e.g. with dcm2niix or Slicer's DICOM module) "
                         "and pass one of them")
    if np.min(steps) < (1 - tol) * spacing:
        raise InputError(f"{what} is not evenly spaced: its slice spacing varies from {np.min(steps):.3g} to "
                         f"{np.max(steps):.3g} mm; convert it with a tool that resamples (e.g. dcm2niix or Slicer's "
                         "DICOM module)")
    if np.max(steps) > (1 + tol) * spacing:
        gaps = int(np.sum(steps > (1 + tol) * spacing))
        raise InputError(f"{what} is not evenly spaced: {gaps} gap(s) of up to {np.max(steps):.3g} mm between "
                         f"slices {spacing:.3g} mm apart (missing files?); add the missing slices or convert it "
                         "with a tool that resamples (e.g. dcm2niix or Slicer's DICOM module)")
    # Steps within the tolerance can still add up: a series whose spacing changes part-way (1.5 mm,
    # then 1.38 mm) was stacked on a 1.44 mm grid, slices up to 3.2 mm (2.2 slices) from their place.
    ordered = np.sort(positions)
    uniform = ordered[0] + np.arange(n) * (ordered[-1] - ordered[0]) / (n - 1)
    off = float(np.max(np.abs(ordered - uniform)))
    if off > 0.25 * spacing:
        raise InputError(f"{what} is not evenly spaced: its slice spacing varies from {np.min(steps):.3g} to "
                         f"{np.max(steps):.3g} mm, so on one uniform grid its slices would lie up to {off:.3g} mm "
                         "from where they were acquired; convert it with a tool that resamples (e.g. dcm2niix or "
                         "Slicer's DICOM module)")


_CONVERT = ("convert it to NIfTI or NRRD first (dcm2niix, or load it in 3D Slicer's DICOM module and save the "
            "volume) and give that file")


def _check_multiframe(p: Path, image: sitk.Image, what: str) -> None:
    """A multi-frame (enhanced) DICOM file: ITK stacks its frames in the order stored, on a grid
    from the first frames, whatever their own positions say (uneven or repeated frames were read
    on a wrong grid, exit 0; a review, s29). Its per-frame positions (read with pydicom) must step
    evenly along the slice normal, in order, and agree with the grid ITK read."""
    frames = image.GetMetaData("0028|0008").strip() if image.HasMetaDataKey("0028|0008") else ""
    try:
        n_frames = int(float(frames)) if frames else 1
    except ValueError:
        n_frames = 1
    if n_frames <= 1:
        return
    try:
        import pydicom
    except ImportError:
        raise InputError(f"{what} is a multi-frame DICOM file, whose frame positions need pydicom to be checked "
                         f"(pip install pydicom); or {_CONVERT}") from None
    try:
        ds = pydicom.dcmread(str(p), stop_before_pixels=True, force=True)
        shared = ds.get("SharedFunctionalGroupsSequence")
        shared = shared[0] if shared else None
        per = ds.get("PerFrameFunctionalGroupsSequence")
        if per is None and shared is None:
            return  # no functional groups (NM, multi-frame secondary capture): their geometry is GDCM's to read
        points, orientations, pixels = [], [], []

        def first(groups, sequence, key):
            return next((g.get(sequence)[0].get(key) for g in groups if g.get(sequence)), None)

        for i in range(n_frames):
            groups = [g for g in ((per[i] if per is not None and i < len(per) else None), shared) if g is not None]
            found = first(groups, "PlanePositionSequence", "ImagePositionPatient")
            if found is None or len(found) != 3:
                points = None
                break
            points.append([float(v) for v in found])
            orientations.append(first(groups, "PlaneOrientationSequence", "ImageOrientationPatient"))
            pixels.append(first(groups, "PixelMeasuresSequence", "PixelSpacing") or ds.get("PixelSpacing"))
    except Exception as error:  # pydicom's own errors on a damaged header
        raise InputError(f"{what} is a multi-frame DICOM file whose frame positions cannot be read "
                         f"({type(error).__name__}); {_CONVERT}") from None
    if points is None or len(points) != image.GetSize()[2]:
        raise InputError(f"{what} is a multi-frame DICOM file whose frames do not all say where they lie; {_CONVERT}")
    points = np.asarray(points, dtype=np.float64)
    normal = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    steps = np.diff(points @ normal)
    if np.any(steps <= 0) and np.any(steps >= 0) or np.any(np.abs(steps) < 1e-6):
        raise InputError(f"{what} is a multi-frame DICOM file whose frames are not stored in order of position, or "
                         "repeat positions (several phases or echoes in one file); split or " + _CONVERT)
    _check_positions(points, image, what)
    # every frame's orientation and pixel size must be the grid's (ITK takes the first frame's)
    axes = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    for i, (orientation, pixel) in enumerate(zip(orientations, pixels)):
        try:
            row_col = None if orientation is None else np.asarray([float(v) for v in orientation], dtype=np.float64)
            if row_col is not None and row_col.size == 6:  # unit vectors, as ITK makes them (headers round them)
                row_col = np.concatenate([v / max(np.linalg.norm(v), 1e-12) for v in (row_col[:3], row_col[3:])])
            # within about half a degree (ITK also makes them orthogonal; 2-decimal headers differ by 1e-3)
            turned = row_col is not None and (row_col.size != 6 or np.abs(row_col[:3] - axes[:, 0]).max() > 1e-2
                                              or np.abs(row_col[3:] - axes[:, 1]).max() > 1e-2)
            resized = pixel is not None and (len(pixel) != 2 or abs(float(pixel[1]) - image.GetSpacing()[0]) > 1e-3
                                             * image.GetSpacing()[0] or abs(float(pixel[0]) - image.GetSpacing()[1])
                                             > 1e-3 * image.GetSpacing()[1])
        except (TypeError, ValueError):
            turned = resized = True
        if turned or resized:
            raise InputError(f"{what} is a multi-frame DICOM file whose frame {i} has another "
                             f"{'orientation' if turned else 'pixel size'} than the grid it is read on; {_CONVERT}")
    # (each frame's pixel size was compared above) the spacing across the frames and where the first lies
    step = float(np.median(np.abs(steps)))
    grid = image.GetSpacing()
    if abs(grid[2] - step) > 0.01 * step or \
            np.linalg.norm(np.asarray(image.GetOrigin(), dtype=np.float64) - points[0]) > 0.5 * min(grid):
        raise InputError(f"{what} is a multi-frame DICOM file that ITK reads on another grid than its frames give "
                         f"({grid[2]:.4g} mm between frames against {step:.4g} mm, or elsewhere); {_CONVERT}")


def _check_no_gantry_tilt(points: np.ndarray, normal: np.ndarray, image: sitk.Image, what: str) -> None:
    """A series acquired with a gantry tilt: its slices step along a line that is not their plane's
    normal (each slice shifted within its plane). ITK stacks them on an orthogonal grid at the
    oblique distance, which places every slice but the first wrongly (by the shift times its
    number) and a mask computed on it too: refused, with what to convert it with. A total shift
    within one pixel is below the result's own precision (and rounding of positions), not refused."""
    if len(points) < 2:
        return
    step = (points[-1] - points[0]) / (len(points) - 1)
    along = float(step @ normal)
    shift = float(np.linalg.norm(step - along * normal))  # per slice, within the slice plane
    total = shift * (len(points) - 1)
    if along == 0 or total <= min(image.GetSpacing()[:2]):  # within a pixel at the far end
        return
    angle = math.degrees(math.atan2(shift, abs(along)))
    raise InputError(f"{what} was acquired with a gantry tilt of {angle:.3g} degree{'' if angle == 1 else 's'} (each "
                     f"slice is shifted {shift:.3g} mm within its plane from the one before): read as it is, its slices "
                     f"would be up to {total:.3g} mm from where they were scanned. Convert it with a tool that corrects the tilt "
                     "(3D Slicer's DICOM module with acquisition geometry regularization, then save the volume as "
                     ".nrrd; or dcm2niix) and give that file")


# NIfTI-1 / NIfTI-2 header fields: (header size, dim offset and format, bitpix offset and format,
# vox_offset offset and format) per endianness.
_NIFTI_LAYOUTS = {348: ((40, "8h"), (72, "h"), (108, "f")), 540: ((16, "8q"), (14, "h"), (168, "q"))}
# Bytes per voxel of each NIfTI datatype code: ITK (niftilib), like nibabel, reads by the datatype,
# not by bitpix (DT_BINARY, 1, has no whole byte size and is left to ITK).
_NIFTI_DATATYPE_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8,
                         1536: 16, 1792: 16, 2048: 32, 2304: 4}


def _nifti_layout(header: bytes) -> tuple[int, tuple, int, int, int] | None:
    """(header size, dims, datatype, bitpix, vox_offset) of a NIfTI-1 or -2 header, else None."""
    import struct

    for endian in "<>":
        if len(header) < 4:
            return None
        size = struct.unpack(endian + "i", header[:4])[0]
        if size not in _NIFTI_LAYOUTS or len(header) < size:
            continue
        (d_at, d_fmt), (b_at, b_fmt), (v_at, v_fmt) = _NIFTI_LAYOUTS[size]
        datatype = struct.unpack_from(endian + "h", header, b_at - 2)[0]  # just before bitpix in both versions
        return (size, struct.unpack_from(endian + d_fmt, header, d_at), datatype,
                struct.unpack_from(endian + b_fmt, header, b_at)[0], struct.unpack_from(endian + v_fmt, header, v_at)[0])
    return None


def _nifti_data_bytes(header: bytes) -> int | None:
    """Bytes a NIfTI file needs up to the end of its voxel data, from its header (the voxel size
    from its datatype, as ITK reads it; from bitpix for a datatype this table does not know); None
    if the header is not one this check understands (ITK then decides)."""
    layout = _nifti_layout(header)
    if layout is None:
        return None
    _, dims, datatype, bitpix, vox_offset = layout
    nbytes = _NIFTI_DATATYPE_BYTES.get(datatype, bitpix // 8 if bitpix > 0 and bitpix % 8 == 0 else None)
    if not 1 <= dims[0] <= 7 or not nbytes or vox_offset < 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1:dims[0] + 1]], dtype=np.int64))
    return int(vox_offset) + voxels * nbytes


def _check_nifti_layout(p: Path, header: bytes) -> None:
    """A single-file NIfTI whose voxel data would start inside its own header (vox_offset below 352,
    544 for NIfTI-2) is refused: ITK then reads from byte 348 and nibabel from byte 0, so the voxels
    come out shifted, differently in each tool, without a word."""
    layout = _nifti_layout(header)
    if layout is None or not p.name.lower().endswith((".nii", ".nii.gz")):
        return
    size, _, _, _, vox_offset = layout
    if vox_offset < size + 4:
        raise InputError(f"{p.name}'s header puts its voxel data at byte {vox_offset:g} (vox_offset), inside the "
                         f"header (a .nii file's data starts at byte {size + 4} or later): tools read such a file "
                         "shifted, each differently; export it again from where it came from")


def _nifti_header(p: Path) -> bytes | None:
    """The first 540 bytes (a NIfTI-2 header's size) of a .nii / .nii.gz file, else None."""
    import gzip
    import zlib

    name = p.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    if name.endswith(".nii") and (_content_kind(p) or ("", ""))[1] == ".nii.gz":
        # a gzip stream named .nii, which ITK cannot read, was "truncated inside its header" (other
        # mismatches are left to ITK, which reads plain NIfTI data named .nii.gz, say)
        raise InputError(f"cannot read {p}: {_named_as_another_kind(p)}")
    try:  # a header that cannot be read: ITK decides (and names the problem)
        with (gzip.open(p, "rb") if name.endswith(".gz") else open(p, "rb")) as f:
            header = f.read(540)
    except EOFError:  # a gzip stream cut inside the header: ITK would read what is there and go on
        raise InputError(f"{p.name} is truncated inside its header; copy or download it again") from None
    except (OSError, zlib.error):
        return None
    if len(header) < 348:  # a NIfTI-1 header is 348 bytes
        raise InputError(f"{p.name} is truncated inside its header ({len(header)} bytes); copy or download it again")
    return header


def _check_nifti_complete(p: Path, header: bytes) -> None:
    """ITK's NIfTI reader fills a file cut short (an interrupted copy or download) with zeros and
    says nothing: check that the file holds all the voxel data its ``header`` declares."""
    import zlib

    needed = _nifti_data_bytes(header)
    if needed is None:
        return
    if not p.name.lower().endswith(".gz"):
        have = p.stat().st_size
    else:
        with open(p, "rb") as raw:  # the gzip trailer's ISIZE: the data's length mod 2^32
            raw.seek(-4, os.SEEK_END)
            if needed < 2**32 and int.from_bytes(raw.read(4), "little") == needed:
                # the stream ends where the header says (a cut stream ends in other bytes); from 4 GiB on
                # ISIZE cannot tell 4 GiB more from nothing (an 80-byte file declaring 4 GiB passed: ITK
                # then allocated and filled them), so the bytes are counted
                return
        try:  # otherwise (a cut stream, bytes after it, several gzip members): count the bytes
            with open(p, "rb") as raw:
                have = _gzip_bytes(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise InputError(f"{p.name} is incomplete or damaged ({error}); copy or download it again") from None
    if have < needed:
        _, _, datatype, bitpix, vox_offset = _nifti_layout(header)
        nbytes = _NIFTI_DATATYPE_BYTES.get(datatype)
        if nbytes and bitpix != 8 * nbytes and bitpix > 0 and bitpix % 8 == 0 and (
                have >= vox_offset + (needed - vox_offset) // nbytes * (bitpix // 8)):  # enough by bitpix
            raise InputError(f"{p.name}'s header is inconsistent: its datatype ({datatype}) has {8 * nbytes}-bit "
                             f"voxels but its bitpix says {bitpix}, and the file holds data for the bitpix only "
                             "(ITK would read past its end and fill the rest with zeros); export it again from "
                             "where it came from")
        raise InputError(f"{p.name} is truncated: its header needs {needed} bytes, the file has {have}; "
                         "copy or download it again")


_NRRD_TYPE_BYTES = {1: ("char", "int8"), 2: ("short", "int16"), 8: ("longlong", "long long", "int64", "double"),
                    4: ("int", "float")}  # tested in this order: "uint8" before "int", "longlong" before "int"


def _check_nrrd_complete(p: Path) -> None:
    """An NRRD whose voxel data (attached, or in the one file its ``data file`` names; raw or gzip)
    holds fewer bytes than its ``sizes`` and ``type`` declare is refused before ITK allocates them:
    a 195-byte .nrrd declaring 4 GiB took 4.3 GB of memory before "damaged". Headers this check does
    not follow (other encodings, byte or line skips, file lists) are left to ITK."""
    import zlib

    try:
        with open(p, "rb") as fh:
            head = fh.read(64 * 1024)
    except OSError:
        return
    if not head.startswith(b"NRRD"):
        return
    end = re.search(rb"\r?\n\r?\n", head)
    text = (head[: end.start()] if end else head).decode("latin-1")
    fields = {}
    for line in text.splitlines()[1:]:
        if ":" in line and ":=" not in line and not line.startswith("#"):
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
    sizes, kind = fields.get("sizes", "").split(), fields.get("type", "").lower().replace("_t", "")
    encoding = fields.get("encoding", "").lower()
    if not sizes or not all(v.isdigit() for v in sizes) or encoding not in ("raw", "gzip", "gz") \
            or any(fields.get(k, "0") not in ("0",) for k in ("byte skip", "byteskip", "line skip", "lineskip")):
        return
    size = next((n for n, words in _NRRD_TYPE_BYTES.items() if any(w in kind for w in words)), None)
    if size is None:
        return
    needed = math.prod(int(v) for v in sizes) * size
    detached = fields.get("data file") or fields.get("datafile")
    if detached:
        if detached.upper().startswith(("LIST", "LOCAL")) or "%" in detached or len(detached.split()) > 1:
            return
        source, offset = (Path(detached) if Path(detached).is_absolute() else p.parent / detached), 0
    elif end is not None:
        source, offset = p, end.end()
    else:
        return
    try:
        if encoding == "raw":
            have = source.stat().st_size - offset
        else:
            with open(source, "rb") as raw:
                raw.seek(-4, os.SEEK_END)
                if needed < 2**32 and int.from_bytes(raw.read(4), "little") == needed:
                    return  # ISIZE: the stream ends where the header says (see _check_nifti_complete)
                raw.seek(offset)
                have = _gzip_bytes(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"cannot read {p}: its voxel data ends early or is damaged ({error}); copy or download "
                         "it again") from None
    if have < needed:
        raise InputError(f"cannot read {p}: its voxel data ends early or is damaged (its header declares {needed} "
                         f"bytes, the file holds {have}); copy or download it again")


def _gzip_bytes(raw) -> int:
    """Bytes the gzip data read from ``raw`` (member after member) decompresses to, without holding
    them. Bytes after the last member that start no new one (a newline some writers append; ITK
    ignores them, where gzip.GzipFile refused the file) end the count. EOFError for a member cut
    short (its data or its trailer: a copy or a write cut off), zlib.error for damaged data."""
    import zlib

    have, stream, pending = 0, zlib.decompressobj(wbits=31), b""
    while True:
        if not pending:
            pending = raw.read(1 << 20)
            if not pending:  # the file ended inside a member (a member's end returns below)
                raise EOFError("the compressed data ends before its end-of-stream marker")
        have += len(stream.decompress(pending, 1 << 24))
        pending = stream.unconsumed_tail
        if stream.eof:
            rest = stream.unused_data + pending
            if len(rest) < 2:
                rest += raw.read(2 - len(rest))
            if not rest.startswith(b"\x1f\x8b"):
                return have  # no further member: what follows is not data
            stream, pending = zlib.decompressobj(wbits=31), rest


def _nifti_codes(p: Path) -> tuple[int, int] | None:
    """A NIfTI-1 file's (qform_code, sform_code), None for any other file or one placed by neither."""
    import struct

    if not p.is_file():
        return None
    header = _nifti_header(p)
    e = _nifti1_endian(header)
    if e is None:
        return None
    codes = struct.unpack_from(e + "hh", header, 252)
    return (int(codes[0]), int(codes[1])) if any(c > 0 for c in codes) and all(0 <= c <= 5 for c in codes) else None


def _patch_nifti_codes(tmp: Path, codes: tuple[int, int]) -> None:
    """Set the qform and sform codes of the NIfTI-1 file SimpleITK just wrote at ``tmp`` (it writes
    1, scanner, for both; an output on an MNI template, code 4, then showed in another space in
    FSLeyes and AFNI: a trial, session 36). Both of its transforms hold the same grid, so whichever
    a reader takes, the grid is unchanged; a code of 0 leaves that transform to the other."""
    import gzip
    import struct

    if tmp.name.endswith(".gz"):
        with gzip.open(tmp, "rb") as fh:
            data = fh.read()
    else:
        data = tmp.read_bytes()
    e = _nifti1_endian(data[:348])
    if e is None:
        return
    patched = bytearray(data)
    struct.pack_into(e + "hh", patched, 252, *codes)
    if tmp.name.endswith(".gz"):
        # no file name and no time in the gzip header, as ITK writes it: the temporary's hidden name was
        # stored (`gunzip -N` restored it) and identical runs gave files of other checksums (a trial, session 46)
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6,
                                                   mtime=0) as fh:
            fh.write(patched)
    else:
        tmp.write_bytes(patched)


def _nifti1_endian(header: bytes | None) -> str | None:
    """The struct byte order ("<" or ">") of a NIfTI-1 header, None for anything else."""
    import struct

    if header is None or len(header) < 348:
        return None
    return next((e for e in "<>" if struct.unpack(e + "i", header[:4])[0] == 348), None)


def _nifti_affines(header: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """(qform, sform) as 3 x 4 RAS affines of a NIfTI-1 header when both codes are set, else None."""
    import struct

    e = _nifti1_endian(header)
    if e is not None:
        qcode, scode = struct.unpack_from(e + "2h", header, 252)
        if qcode <= 0 or scode <= 0:
            return None
        pixdim = struct.unpack_from(e + "8f", header, 76)
        b, c, d, qx, qy, qz = struct.unpack_from(e + "6f", header, 256)
        a = 1.0 - (b * b + c * c + d * d)
        if a < 1e-7:  # a 180-degree rotation, as niftilib reads it: float32 rounding left a of about 2e-4,
            norm = math.sqrt(b * b + c * c + d * d)  # a qform 0.02-0.1 mm off the sform ITK wrote with it
            b, c, d, a = b / norm, c / norm, d / norm, 0.0
        else:
            a = math.sqrt(a)
        rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                        [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
        qfac = -1.0 if pixdim[0] < 0 else 1.0
        qform = np.hstack([rot * np.array([pixdim[1], pixdim[2], qfac * pixdim[3]]), [[qx], [qy], [qz]]])
        sform = np.array(struct.unpack_from(e + "12f", header, 280), dtype=np.float64).reshape(3, 4)
        return qform, sform
    return None


def _note_nifti_qform_sform(p: Path, header: bytes, image: sitk.Image, tol_mm: float = 0.01) -> None:
    """NIfTI stores the grid twice (qform and sform). When both are set and disagree, ITK (and so
    Slicer) uses one of them and the output keeps only that one, while tools that read the other
    (FSL, nibabel) would see input and output in different places: say so (a warning, which the
    command line prints as a note)."""
    affines = _nifti_affines(header)
    if affines is None:
        return
    qform, sform = affines
    apart = _affines_apart(affines, (list(image.GetSize()) + [1, 1])[:3])  # a 2D file has two sizes
    if not apart > tol_mm:  # (NaN: a pixdim of NaN, which the voxel-size note names)
        return
    n = (list(image.GetSize()) + [1, 1])[:3]
    itk = _itk_ras_affine(image)  # which of the two ITK used: the nearer over the volume's corners (origins alone
    used = "qform" if _affines_apart((itk, qform), n) <= _affines_apart((itk, sform), n) else "sform"  # can tie)
    other = "sform" if used == "qform" else "qform"
    warnings.warn(f"{p.name}: its NIfTI header holds two different grids (qform and sform are up to {apart:.3g} mm "
                  f"apart); like ITK and Slicer, PAMSegment uses the {used}, and an output stores only that one, so "
                  f"tools that use the {other} would place input and output differently", stacklevel=3)


def _itk_ras_affine(image: sitk.Image) -> np.ndarray:
    """The 3 x 4 voxel-to-RAS affine of an image as ITK read it (its first three axes)."""
    d = image.GetDimension()
    direction = np.eye(3)
    direction[:min(d, 3), :min(d, 3)] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(d, d)[:3, :3]
    spacing = np.ones(3)
    spacing[:min(d, 3)] = image.GetSpacing()[:3]
    origin = np.zeros(3)
    origin[:min(d, 3)] = image.GetOrigin()[:3]
    flip = np.array([-1.0, -1.0, 1.0])  # ITK's LPS to NIfTI's RAS
    return np.hstack([(direction * spacing) * flip[:, None], (origin * flip)[:, None]])


def _check_nifti_finite(p: Path, header: bytes) -> None:
    """A NIfTI-1 header whose sform (or qform) in use holds NaN or infinity is refused before ITK reads
    it: ITK either took the NaN grid (a result written at origin 0 with plain axes) or called it
    sheared ("resample it onto an orthogonal grid")."""
    import struct

    e = _nifti1_endian(header)
    if e is None:
        return
    qcode, scode = struct.unpack_from(e + "2h", header, 252)
    bad = [form for form, code, at, n in (("sform (srow_x/y/z)", scode, 280, 12), ("qform (quatern_b/c/d, "
                                          "qoffset_x/y/z)", qcode, 256, 6))
           if code > 0 and not all(math.isfinite(v) for v in struct.unpack_from(e + f"{n}f", header, at))]
    if bad:
        raise InputError(f"{p.name}'s NIfTI header holds NaN or infinity in its {' and its '.join(bad)}: the file "
                         "has no usable position; export it again from where it came from")


def _check_finite_grid(p: Path, image: sitk.Image) -> None:
    """A grid holding NaN or infinity as ITK read it (a NIfTI-2 sform of NaN, which the NIfTI-1 header
    check does not parse; NRRD and MetaIO refuse or zero such values themselves) has no position:
    refused, naming what, before any check or output works with it (a NaN sform went on to a result
    written at origin 0 with identity axes, and to VNL's messages on stderr)."""
    parts = {"origin": image.GetOrigin(), "voxel size": image.GetSpacing(), "axes (direction)": image.GetDirection()}
    bad = [name for name, values in parts.items() if not all(math.isfinite(v) for v in values)]
    if bad:
        where = (" (in a NIfTI file: its sform srow_x/y/z or its qform quatern/qoffset and pixdim)"
                 if p.name.lower().endswith((".nii", ".nii.gz")) else "")
        raise InputError(f"{p.name}'s header gives its {' and '.join(bad)} as NaN or infinity{where}: the file has "
                         "no usable position; export it again from where it came from, or set a valid grid "
                         "(e.g. in Slicer's Volumes module)")
    odd = [f"{'ijk'[n]} {v:.3g} mm" for n, v in enumerate(image.GetSpacing()[:3]) if not 1e-7 <= abs(v) <= 1e5]
    if odd:  # 0.1 nm to 100 m: outside, a unit or a header is wrong (pixdim 1e-9 ran without a word)
        warnings.warn(f"{p.name}: its header gives a voxel size of {', '.join(odd)}, far outside what a scan or "
                      "microscope image has: is the header's unit or spacing wrong? PAMSegment's 20 mm walk window and "
                      "its distances count millimetres; fix the header (e.g. in Slicer's Volumes module) if so",
                      stacklevel=3)


def _affines_apart(affines, n) -> float:
    """How far (mm) a NIfTI header's two grids place a volume of ``n`` voxels (i, j, k): the largest
    distance between them over its corners."""
    corners = np.array([[0, 0, 0, 1], [n[0] - 1, 0, 0, 1], [0, n[1] - 1, 0, 1], [0, 0, n[2] - 1, 1]],
                       dtype=np.float64).T
    return float(np.max(np.linalg.norm(affines[0] @ corners - affines[1] @ corners, axis=0)))


def _two_grids_holding(p: Path | None, other: Volume, tol: float = 1e-3) -> float | None:
    """How far (mm) the two grids (qform, sform) of NIfTI file ``p``'s header are apart, when they
    differ by more than 0.01 mm and ``other`` lies on one of them (a grid mismatch between the two
    files then comes from tools reading different ones of the two); else None. One header read."""
    import struct

    header = _nifti_header(p) if p is not None else None
    affines = _nifti_affines(header) if header is not None else None
    if affines is None:
        return None
    dims = struct.unpack_from(_nifti1_endian(header) + "8h", header, 40)
    apart = _affines_apart(affines, [max(int(v), 1) for v in dims[1:4]])
    if not apart > 0.01:  # (or NaN: no distance to name)
        return None
    flip = np.diag([-1.0, -1.0, 1.0])  # NIfTI's RAS to ITK's LPS
    axes = np.asarray(other.direction, dtype=np.float64).reshape(3, 3) * np.asarray(other.spacing_ijk, dtype=np.float64)
    origin = np.asarray(other.origin, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(origin))))
    on_one = any(np.allclose(flip @ a[:, :3], axes, atol=tol) and np.allclose(flip @ a[:, 3], origin, atol=tol * scale)
                 for a in affines)
    return apart if on_one else None


def _nifti_pixdims(header: bytes) -> tuple[float, ...] | None:
    """pixdim[1..ndim] of a NIfTI-1 or NIfTI-2 header (as stored), None if it is not one."""
    import struct

    e = _nifti1_endian(header)
    if e is not None:
        ndim, pix = struct.unpack_from(e + "h", header, 40)[0], struct.unpack_from(e + "8f", header, 76)
    else:
        e = next((e for e in "<>" if len(header) >= 540 and struct.unpack(e + "i", header[:4])[0] == 540), None)
        if e is None:
            return None
        ndim, pix = struct.unpack_from(e + "q", header, 16)[0], struct.unpack_from(e + "8d", header, 104)
    return tuple(float(v) for v in pix[1:1 + max(0, min(int(ndim), 7))])


def _note_nifti_no_spacing(p: Path, header: bytes, dimension: int) -> None:
    """A NIfTI header whose voxel size (pixdim) is 0, NaN or infinite along an axis: ITK (and
    Slicer) read it as 1 mm without a word, and PAMSegment's walk window, drift test and the
    metrics count millimetres; say so (a warning, which the command line prints as a note)."""
    pix = _nifti_pixdims(header)
    if pix is None:
        return
    bad = [f"{'ijk'[n]} (pixdim[{n + 1}] = {v:g})" for n, v in enumerate(pix[:min(dimension, 3)])
           if not (math.isfinite(v) and v != 0)]
    negative = [f"pixdim[{n + 1}] = {v:g}" for n, v in enumerate(pix[:min(dimension, 3)]) if v < 0]
    if negative:  # ITK (and Slicer) flip that axis; FSL and nibabel take the size alone
        warnings.warn(f"{p.name}: its NIfTI header gives a negative voxel size ({', '.join(negative)}); like ITK "
                      "and Slicer, PAMSegment reads it as that axis flipped, where FSL and nibabel ignore the sign: "
                      "the result lies on the image as Slicer shows it, mirrored against it in those tools",
                      stacklevel=3)
    if bad:
        warnings.warn(f"{p.name}: its NIfTI header gives no voxel size along {', '.join(bad)}; like ITK and "
                      "Slicer, PAMSegment reads that as 1 mm, and its 20 mm walk window and distances count those "
                      "millimetres: fix the header (e.g. set the true spacing in Slicer's Volumes module) if that is "
                      "wrong", stacklevel=3)


def check_regular_file(p: Path) -> None:
    """InputError for an input that exists but is not a regular file or folder (a FIFO, a socket,
    a device): ITK would wait on a FIFO for ever."""
    import stat

    try:
        mode = p.stat().st_mode
    except OSError:
        return  # the reader names the problem
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise InputError(f"{p} is {kind}, not an image file; save the image to a file and give that")


def _check_detached_data(p: Path) -> None:
    """A header that names its voxel data's file (NRRD's ``data file:``, MetaImage's
    ``ElementDataFile``; any of .nrrd, .nhdr, .mha, .mhd may) must name an ordinary file that
    exists, as the image file itself must be one: a FIFO hung the run, /dev/urandom was segmented as
    noise, and a .mhd copied without its .raw was called damaged. LIST and LOCAL forms and numbered
    file patterns are left to ITK."""
    name = p.name.lower()
    nrrd = name.endswith((".nrrd", ".nhdr"))
    if not (nrrd or name.endswith((".mha", ".mhd"))):
        return
    try:
        with open(p, "rb") as fh:
            head = fh.read(64 * 1024).decode("latin-1")
    except OSError:
        return  # the reader names the problem
    if nrrd:
        head = re.split(r"\r?\n\r?\n", head, maxsplit=1)[0]  # the header ends at the first blank line
        pattern = r"^\s*data ?file\s*:(?!=)\s*(.+?)\s*$"  # a field ("data file: x"), not a "key:=value" pair
    else:
        end = re.search(r"^\s*ElementDataFile\s*=.*$", head, flags=re.MULTILINE | re.IGNORECASE)
        head = head[: end.end()] if end else ""  # the last line of a MetaImage header
        pattern = r"^\s*ElementDataFile\s*=\s*(.+?)\s*$"
    for found in re.finditer(pattern, head, flags=re.MULTILINE | (0 if nrrd else re.IGNORECASE)):
        target = found.group(1)
        if target.upper().startswith(("LIST", "LOCAL")) or "%" in target:
            continue
        data = Path(target) if Path(target).is_absolute() else p.parent / target
        if not _exists(data):
            raise InputError(f"{p.name} names {data} as its voxel data, which does not exist; copy the data file "
                             "beside its header too")
        if data.is_dir():
            raise InputError(f"{p.name} names {data} as its voxel data, which is a folder; give a header whose data "
                             "file is an ordinary file")
        try:
            check_regular_file(data)
        except InputError:
            raise InputError(f"{p.name} names {data} as its voxel data, which is not a regular file (a named pipe, "
                             "a socket or a device); give a header whose data file is an ordinary file") from None


def _exists(p: Path) -> bool:
    try:
        return p.exists()
    except OSError as error:  # e.g. a name longer than the file system allows
        raise InputError(f"cannot use the path {str(p)[:80]}... ({error.strerror})") from None


def _is_dicom_file(p: Path) -> bool:
    """A DICOM file by name (.dcm) or by content ("DICM" at byte 128; most scanner files have no
    extension)."""
    if p.name.lower().endswith(".dcm"):
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read_error(p: Path, reason: str) -> InputError:
    """ITK's failure to read file ``p`` as one line: a short read (MetaImage says "No such file",
    NRRD "fread got only" / "expected ... bytes") is a damaged copy, an allocation failure a
    header that declares more voxels than memory holds; only a file ITK found no reader for gets
    the list of formats (a truncated NRRD was told to be NIfTI, NRRD, ...)."""
    low = reason.lower()
    if any(k in low for k in ("no such file or directory", "fread got only", "data not read completely",
                              "unexpected end of file", "premature end", "expected", "_nrrdencoding")) \
            and "imageio" not in low:
        why = "" if "no such file or directory" in low else f" ({reason[:160]})"  # MetaIO's errno text, not a reason
        return InputError(f"cannot read {p}: its voxel data ends early or is damaged{why}; copy or download it again")
    short = _memory_short_of(p)
    if short is not None:  # a healthy file was called damaged under a memory limit (a review, session 33)
        need, left = short
        return InputError(f"cannot read {p}: not enough memory: reading it needs about {_mb_or_gb(need)} and about "
                          f"{_mb_or_gb(left)} is left to this process ({reason[:120]}); close other programs, run "
                          "where more memory is allowed (a larger job or container, a higher `ulimit -v`), or crop "
                          "the volume first")
    if "allocate" in low or "bad_alloc" in low:
        return InputError(f"cannot read {p}: its header declares more voxels than this machine's memory holds "
                          f"({reason[:160]}); is the header damaged? copy or download it again")
    if "unable to determine imageio reader" in low or "could not create io object" in low:
        if _nifti2_magic(p):
            return InputError(f"cannot read {p}: it is a NIfTI-2 file, which this ITK (and so SimpleITK and "
                              "Slicer's reader) does not read; save it as NIfTI-1 (nibabel: "
                              "nib.save(nib.Nifti1Image.from_image(img), 'x.nii.gz'), which keeps its values and "
                              "type)")
        other = _named_as_another_kind(p)
        return InputError(f"cannot read {p}: {other}" if other else
                          f"cannot read {p} as an image ({reason}); {_READ_HINT}")
    if "determinant is 0" in low:  # a singular direction matrix (two axes parallel, or one of zero length)
        return InputError(f"cannot read {p}: its header's axes (direction) are degenerate, two of them parallel or one "
                          f"of length zero ({reason[:120]}), so the image has no usable grid; export it again from "
                          "where it came from")
    if "orthonormal" in low:  # a sheared NIfTI grid (sform), not a damaged file (a trial, session 36)
        return InputError(f"cannot read {p}: its grid is not orthogonal (a sheared affine, e.g. an sform with a "
                          "tilt or a rounding skew, and no usable qform), which ITK and Slicer cannot place "
                          f"({reason[:120]}); resample it onto an orthogonal grid (e.g. nibabel's resample_to_output, "
                          "or FSL's flirt -applyxfm), or if the skew is only rounding, save it again with the "
                          "nearest orthogonal affine")
    return InputError(f"cannot read {p} as an image ({reason[:200]}); is the file damaged? copy or download it again")


def _memory_short_of(p: Path) -> tuple[int, int] | None:
    """(bytes reading ``p`` needs: the reader's buffer and ITK's, twice its voxels, bytes left to
    this process) when that does not fit what is left (MemAvailable within the process's limits,
    and the address space ``ulimit -v`` leaves beside what the process has mapped already); else
    None. (Called for a failure that is no short read: those are damaged files.)"""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(_itk_path(p))
        with _itk_warnings_hidden(), _native_stderr_hidden():
            reader.ReadImageInformation()
        voxels = math.prod(int(n) for n in reader.GetSize()) * max(int(reader.GetNumberOfComponents()), 1)
        itemsize = np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(),
                                                                 reader.GetPixelID())).dtype).itemsize
    except (RuntimeError, TypeError, ValueError):
        return None
    need = 2 * voxels * itemsize
    left = [v for v in (memory_budget()[1], _address_space_left()) if v is not None]
    return (need, min(left)) if left and need > min(left) else None


def _address_space_left() -> int | None:
    """What ``ulimit -v`` (RLIMIT_AS) leaves this process beside what it has mapped (VmSize); None
    without such a limit."""
    soft = _address_space_limit()
    mapped = _process_status("VmSize") if soft is not None else None
    return None if mapped is None else max(soft - mapped, 0)


def _address_space_limit() -> int | None:
    """The address-space limit (``ulimit -v``, RLIMIT_AS) in bytes; None without one (or off POSIX)."""
    try:
        import resource  # noqa: PLC0415 - POSIX only

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    except (ImportError, ValueError, OSError):
        return None
    return None if soft in (resource.RLIM_INFINITY, -1) or soft <= 0 else int(soft)


def _process_status(key: str) -> int | None:
    """A size line of /proc/self/status ("VmRSS", "VmSize") in bytes; None where it cannot be read."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def _mem_available() -> int | None:
    """The machine's MemAvailable (/proc/meminfo) in bytes; None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration, IndexError):
        return None


def physical_memory_bytes() -> int | None:
    """This machine's physical memory, None where the OS does not say (``os.sysconf``)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget() -> tuple[int | None, int | None]:
    """(limit, free) in bytes: the least of physical memory, the control group's limit (a container,
    a batch scheduler's job) and the address-space limit (``ulimit -v``), and what is free now
    (MemAvailable, within that limit); on Windows the physical memory and ``_windows_room``; None
    where the system does not say (macOS)."""
    if _on_windows():  # (no /proc, no sysconf): the physical memory, and what is free of it now
        status = _windows_memory_status()
        return (None, None) if status is None else (status["ullTotalPhys"], _windows_room(status))
    # (the address-space limit as it is: the estimates are of resident memory, so under `ulimit -v` a
    # run may pass the check and still fail; what the process maps without holding could not be
    # told in advance: it refused runs that fit, session 33)
    limits = [physical_memory_bytes(), *_cgroup_limits(), _address_space_limit()]
    known = [v for v in limits if v]
    limit = min(known) if known else None
    free = _mem_available()
    if free is not None and limit is not None:
        free = min(free, limit)
    return limit, free


def _on_windows() -> bool:
    return sys.platform == "win32"


def _windows_room(status: dict | None = None) -> int | None:
    """Windows: the least of the physical memory available now (``ullAvailPhys``: the standby, free
    and zero lists, as Linux's MemAvailable) and what this process may still commit
    (``ullAvailPageFile``: beyond it allocations fail), from ``GlobalMemoryStatusEx``; None if the
    call fails. ``status``: an already read ``_windows_memory_status``."""
    status = status if status is not None else _windows_memory_status()
    return None if status is None else min(status["ullAvailPhys"], status["ullAvailPageFile"])


def _windows_memory_status() -> dict | None:
    """``GlobalMemoryStatusEx``'s MEMORYSTATUSEX as a dict of ints; None if the call fails."""
    import ctypes  # noqa: PLC0415

    class MemoryStatusEx(ctypes.Structure):  # MEMORYSTATUSEX (sysinfoapi.h)
        # DWORD is 32 bits and DWORDLONG 64 on every Windows (64 bytes in all); c_ulong is not 32 bits everywhere
        _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                    ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                    ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                    ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                    ("ullAvailExtendedVirtual", ctypes.c_uint64)]

    status = MemoryStatusEx()
    status.dwLength = ctypes.sizeof(MemoryStatusEx)
    try:
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return None
    except (AttributeError, OSError):  # (not Windows after all)
        return None
    return {name: int(getattr(status, name)) for name, _ in MemoryStatusEx._fields_}


def _cgroup_limits(root: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> list[int]:
    """The memory limits of this process's control group and of every group above it (a batch
    scheduler's job or a systemd unit sits deep in the tree; a v2 root has no limit file), v2
    (``memory.max``) and v1 (``memory.limit_in_bytes``)."""
    return [limit for limit, _ in _cgroup_levels(root, own)]


def _cgroup_levels(root: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> list[tuple[int, int | None]]:
    """(limit, usage or None) of each control group level with a memory limit (``_cgroup_limits``):
    usage is what the whole group holds less its inactive file cache (``_cgroup_usage``)."""
    try:
        lines = Path(own).read_text().splitlines()
    except (OSError, ValueError):
        lines = []
    places = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            places.append((Path(root), parts[2], "memory.max"))
        elif "memory" in parts[1].split(","):
            places.append((Path(root) / "memory", parts[2], "memory.limit_in_bytes"))
    places += [(Path(root), "/", "memory.max"), (Path(root) / "memory", "/", "memory.limit_in_bytes")]
    found = []
    for base, group, name in places:
        folder = PurePosixPath(group if group.startswith("/") else "/" + group)
        for level in (folder, *folder.parents):
            try:
                text = (base / str(level).lstrip("/") / name).read_text().strip()
            except (OSError, ValueError):
                continue
            if text.isdigit() and int(text) < 2**60:  # "max", or v1's huge number: no limit
                found.append((int(text), _cgroup_usage(base / str(level).lstrip("/"), v2=name == "memory.max")))
    return found


def _cgroup_usage(folder: Path, v2: bool) -> int | None:
    """What a control group holds that the kernel cannot simply drop: its usage less its inactive
    file cache (as the kubelet's "working set"; reading or writing a large series filled the cache
    and made a job look short of memory), None when unreadable."""
    try:
        used = (folder / ("memory.current" if v2 else "memory.usage_in_bytes")).read_text().strip()
    except (OSError, ValueError):
        return None
    if not used.isdigit():
        return None
    inactive = 0
    key = "inactive_file" if v2 else "total_inactive_file"
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
                inactive = int(parts[1])
                break
    except (OSError, ValueError):
        pass
    return max(int(used) - inactive, 0)


def trim_heap() -> None:
    """Give the heap pages glibc keeps after large arrays are freed back to the OS (``malloc_trim``;
    Linux with glibc, elsewhere nothing to do). A long run's freed temporaries stayed resident and
    counted toward the next step's peak: 115 MB after a body outline's run on 512 x 512 x 300 before
    its result was written into Slicer (a re-review, session 40)."""
    try:
        import ctypes  # noqa: PLC0415

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def memory_room() -> int | None:
    """What this process can still take before the system refuses it memory or stops it: the least
    of the machine's available memory (MemAvailable), each memory control group's limit less what
    the whole group holds (a container's or job's other processes count), and ``ulimit -v`` less
    the address space the process maps; on Windows the physical memory available and what the
    process may still commit (``_windows_room``); None where the system says none of these (macOS)."""
    if _on_windows():
        return _windows_room()
    room = [_mem_available(), _address_space_left()]
    for limit, used in _cgroup_levels():
        used = used if used is not None else _process_status("VmRSS")
        if used is not None:
            room.append(max(limit - used, 0))
    known = [v for v in room if v is not None]
    return min(known) if known else None


def image_pixels_2d(path: PathLike) -> tuple[int, int, int] | None:
    """(rows, columns, colour channels: 1 or 3) of a 2D image file from its header alone, before a
    pixel is decoded; None when ITK cannot read the header (the full read then says why)."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(_itk_path(Path(path)))
        with _itk_warnings_hidden(), _native_stderr_hidden():
            reader.ReadImageInformation()
        size, components = reader.GetSize(), int(reader.GetNumberOfComponents())
    except RuntimeError:
        return _pixels_2d_without_itk(Path(path))
    flat = [int(n) for n in size if int(n) != 1] or [1]
    if len(flat) > 2:
        return None
    columns, rows = (flat + [1])[:2]
    return rows, columns, 3 if components >= 3 and _tiff_grey_page(Path(path)) is None else 1


def _pixels_2d_without_itk(p: Path) -> tuple[int, int, int] | None:
    """``image_pixels_2d`` of the files the reading falls back to tifffile or Pillow for (a grey +
    alpha PNG, a TIFF of 64-bit floats), from their tags; None when neither can say."""
    sizes = _tiff_page_sizes(p)
    if sizes:
        layout = _tiff_layout(p)
        return sizes[0][1], sizes[0][0], 3 if layout is not None and layout[0] >= 3 else 1
    try:
        with _pillow_unguarded() as Image, Image.open(p) as im:  # the header, not the pixels
            columns, rows = im.size
            return rows, columns, 3 if len(im.getbands()) >= 3 else 1
    except (ImportError, OSError, ValueError, TypeError):
        return None


def _mb_or_gb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB" if n < 2**30 else _gb(n)


def _gb(n: float) -> str:
    return f"{n / 1024**3:.1f} GB" if n < 10 * 1024**3 else f"{n / 1024**3:,.0f} GB"


def check_memory(need: int, what: str, advice, skip: bool = False) -> None:
    """Refuse (InputError) work that needs ``need`` bytes at its peak when that is more than 90 %
    of what this process may use (``memory_budget``): it would end in a MemoryError late in the run
    or in the system killing the process without a word. ``what`` says what needs it, ``advice``
    what to do instead (a callable: made from the limit); ``skip`` (--no-memory-check) lets it run
    anyway. Prints a warning when the work fits the limit but not what is free now."""
    limit, free = memory_budget()
    if limit and need > 0.9 * limit and not skip:
        raise InputError(f"{what} needs about {_gb(need)} of memory at its peak, more than 90 % of the "
                         f"{_gb(limit)} this process may use: nothing was done. {advice(limit)}, or run again with "
                         "--no-memory-check (with enough swap, say)")
    if free and need > free:
        print(f"warning: {what} needs about {_gb(need)} of memory at its peak and {_gb(free)} is free now: close "
              "other programs, or the system may stop it without a message", flush=True)


def _check_declared_size(p: Path) -> None:
    """A file whose header declares more voxels than this machine's memory holds as float32 (the
    engine's working copy) is refused before ITK allocates them: a damaged header, or a small
    compressed file that unpacks to terabytes (a "bomb"), would otherwise end in the OS killing
    the process, or Slicer. Headers ITK cannot read are left to the full read, which names the
    problem."""
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(_itk_path(p))
        with _itk_warnings_hidden(), _native_stderr_hidden():
            reader.ReadImageInformation()
        size, components = reader.GetSize(), reader.GetNumberOfComponents()
    except RuntimeError:
        return
    voxels = math.prod(int(n) for n in size) * max(int(components), 1)
    memory = physical_memory_bytes()
    if memory and 4 * voxels > memory:
        raise InputError(f"{p.name}'s header declares {_fmt_size(size)} = {voxels:,} voxels, "
                         f"{4 * voxels / 1024**3:,.0f} GB as float32, more than this machine's "
                         f"{memory / 1024**3:.0f} GB of memory: if the file is what it should be, crop or downsample "
                         "it (e.g. in Slicer's Crop Volume module); a small file declaring this is damaged")


def _read_sitk(path: PathLike, series_uid: str | None = None, single_slice_ok: bool = False,
               label_map: bool = False, role: str = "prompt") -> sitk.Image:
    """Read any supported file or DICOM folder and check it is one 3D scalar volume (``label_map``:
    a prompt or mask, said so when it is 2D; ``role``: "prompt", or "result" for an earlier result
    or its corrected copy, whose refusals say what to do with one of those)."""
    p = Path(path)
    if not _exists(p):
        raise InputError(f"{p} does not exist; check the path")
    if p.is_dir():
        image = _read_dicom_series(p, series_uid)
        _check_finite_grid(p, image)
    else:
        if p.name.upper() == "DICOMDIR":  # a disc's index, the first file a CD user tries (a trial, session 36)
            below = _subfolders_with_series(p.parent)
            shown = ", ".join(str(b) for b in below[:4]) + (f" and {len(below) - 4} more" if len(below) > 4 else "")
            if not below and dicom_series_ids(p.parent):
                below, shown = [p.parent], str(p.parent)  # a flat disc: the series beside its index
            raise InputError(f"{p} is the index of a DICOM disc, not an image: pass the folder of one series"
                             + (f" ({shown})" if below else " (the folder holding its image files)"))
        if series_uid is not None:
            raise InputError(f"series_uid applies to DICOM folders only, but {p} is a file")
        check_regular_file(p)
        _check_detached_data(p)
        _check_not_pyramid(p, volume=True)
        _check_declared_size(p)
        _check_grey_channels(p, most=1, pages_at_least=2)
        _refuse_dicom_objects_not_images(p)
        header = _nifti_header(p)  # read once for the NIfTI checks
        if header is not None:
            _check_nifti_layout(p, header)
            _check_nifti_finite(p, header)
            _check_nifti_complete(p, header)
        elif p.name.lower().endswith((".nrrd", ".nhdr")):
            _check_nrrd_complete(p)
        try:
            # ITK's warnings (NIfTI's "unexpected scales in sform": what matters is noted below) and what
            # MetaIO prints on a short read go: the failure is said below in one line.
            with _itk_warnings_hidden(), _native_stderr_hidden():
                image = sitk.ReadImage(_itk_path(p))
        except RuntimeError as error:
            raise _read_error(p, _itk_reason(error)) from None
        _check_finite_grid(p, image)
        if header is not None:
            _note_nifti_qform_sform(p, header, image)
            _note_nifti_no_spacing(p, header, image.GetDimension())
        elif image.HasMetaDataKey("0028|0008") and image.GetDimension() == 3:  # a DICOM file of several frames
            _check_multiframe(p, image, p.name)
    name = p.name

    ncomp = image.GetNumberOfComponentsPerPixel()
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{name} has complex voxels; PAMSegment needs a real-valued 3D volume")
    if ncomp > 1:
        if _is_seg_nrrd(name) and role == "result":  # (an update cannot take its labels one file at a time)
            raise InputError(
                f"{name} has {ncomp} overlapping segment layers; a correction must not overlap other labels: remove "
                "the overlaps (Segment Editor, Masking: Modify other segments: Overwrite all) or export a label map "
                "from Slicer (Segmentations > Export to label map) and give that"
            )
        if _is_seg_nrrd(name):
            raise InputError(
                f"{name} has {ncomp} overlapping segment layers; export a label map from Slicer "
                "(Segmentations > Export to label map) and use that, or, to keep the overlaps, save the overlapping "
                "segments to separate files and propagate each"
            )
        layout = _tiff_layout(p)
        if layout is not None and layout[0] == 1 and layout[1] == 1:  # ITK expands 1-bit pages to 4 channels
            raise InputError(f"{name} is a stack of 1-bit (black and white) TIFF pages, which ITK reads as colour; "
                             "save it as 8-bit grey (e.g. Fiji: Image > Type > 8-bit, then File > Save As > Tiff)")
        raise InputError(
            f"{name} has {ncomp} components per voxel (colour or vector image); "
            "PAMSegment needs a single-channel 3D volume"
        )
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4 and size[3] == 1:
        # A 4D file with a single time point / layer is just a 3D volume.
        image = sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0])
        dim, size = 3, image.GetSize()
    if dim == 2 and label_map:
        raise InputError(f"{name} is a 2D mask ({_fmt_size(size)}), which does not say which slice of the image it "
                         "was drawn on: save the drawing as a label map of the whole image (3D, empty but on the "
                         "drawn slice), e.g. the segmentation from 3D Slicer or ITK-SNAP as .seg.nrrd or NIfTI (2D "
                         "images, each with its own mask, are labelled with `pamsegment label-images`)")
    if dim == 2:
        raise InputError(f"{name} is 2D ({_fmt_size(size)}); PAMSegment needs a 3D volume")
    if dim != 3:
        if dim == 4 and p.is_dir():  # a DICOM folder of several multi-frame (enhanced) files: ITK stacks the files
            raise InputError(f"{name} holds {size[3]} multi-frame (enhanced) DICOM files of one series, which are read "
                             f"as {dim}D ({_fmt_size(size)}): parts of one scan (stacks), or its time points? Give one "
                             "file as the image (each is read and checked on its own), or convert the series into one "
                             "volume (e.g. dcm2niix, or 3D Slicer's DICOM module)")
        raise InputError(
            f"{name} is {dim}D ({_fmt_size(size)}); PAMSegment needs a 3D volume: extract one time point first"
        )
    if min(size) < 2 and not single_slice_ok and size[2] > 1:  # (i, j, k): thin along i or j, not one slice
        raise InputError(f"{name} is one voxel thick along {'ij'[list(size).index(min(size))]} ({_fmt_size(size)}); "
                         "PAMSegment needs a 3D volume of at least 2 voxels along every axis")
    if min(size) < 2 and not single_slice_ok:
        raise InputError(
            f"{name} has a single slice ({_fmt_size(size)}); PAMSegment needs a 3D volume"
            + (f" (for DICOM pass the series folder, {p.parent}, not one file)" if _is_dicom_file(p) else
               " (a set of single images is labelled with `pamsegment label-images`)")
        )
    return image


def read_volume(path: PathLike, series_uid: str | None = None) -> Volume:
    """Read a 3D image: NIfTI, NRRD (a 3D .seg.nrrd reads as its label map), MHA/MHD, or a
    DICOM series folder (the largest series unless ``series_uid`` is given).

    Returns a Volume with array (K, J, I) in the file's pixel type and spacing (k, j, i).
    Raises InputError for a missing/unreadable path, 2D, 4D or multi-component images, and
    NaN/inf voxels (ITK's NIfTI reader already turns those into 0, so this fires for the
    other formats).
    """
    # ITK's copy is let go as soon as the array is made, and the NaN/inf count goes slice by slice:
    # the whole-volume temporaries made a 600 MB float64 read peak at 1.6 GB (a review, s29)
    volume = Volume.from_sitk(_read_sitk(path, series_uid))
    volume.nifti_codes = _nifti_codes(Path(path))
    if volume.array.dtype.kind == "f":
        bad = sum(int(plane.size - np.count_nonzero(np.isfinite(plane))) for plane in volume.array)
        if bad:
            raise InputError(
                f"{Path(path).name} contains {bad} NaN/inf voxels; replace them with a finite value "
                "(e.g. the minimum intensity) first"
            )
    return volume


def _check_label_scaling(p: Path) -> None:
    """A NIfTI-1 label map whose header scales its values (scl_slope, scl_inter; ITK applies them,
    as Slicer does) is refused, naming the header: an offset shifts the background too, so every
    voxel became a label (it was called a 3D mask), and a slope renumbers the labels or makes them
    fractions or negative (then called a float mask or an image)."""
    import struct

    header = _nifti_header(p)
    e = _nifti1_endian(header)
    if e is None:
        return
    slope, inter = struct.unpack_from(e + "2f", header, 112)
    slope = slope or 1.0  # ITK reads a slope of 0 as 1 (and still adds the intercept)
    if not (np.isfinite(slope) and np.isfinite(inter)) or (slope == 1 and inter == 0):
        return
    background = f" and the background 0 as {inter:.8g}" if inter != 0 else ""
    raise InputError(f"{p.name}: its NIfTI header scales the stored values (scl_slope {slope:.8g}, scl_inter "
                     f"{inter:.8g}), so every label v reads as {slope:.8g} x v + {inter:.8g}{background}: save the "
                     "label map without scaling (scl_slope 1, scl_inter 0)")


def _as_integer_labels(image: sitk.Image, name: str) -> sitk.Image:
    """Cast a label image to the smallest integer pixel type holding its values."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind in "iu":
        return image
    if arr.dtype == bool:
        return sitk.Cast(image, sitk.sitkUInt8)
    if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
        values = np.unique(arr)  # (on this error path only)
        if 0 < values.size <= 8 and np.all(np.isfinite(values)):
            # each as short as its own precision allows (1.0000001 was printed "1", as if whole: a trial)
            listed = ", ".join(np.format_float_positional(v, unique=True, trim="-") if 1e-4 <= abs(v) < 1e6 or v == 0
                               else np.format_float_scientific(v, unique=True, trim="-") for v in values)
            raise InputError(f"{name} holds the values {listed}, not whole numbers: a mask saved as floats (or "
                             "resampled)? Round it to integer labels (e.g. 0 and 1) and save it as an integer "
                             "label map")
        raise InputError(
            f"{name} has non-integer values, so it is not a label map; save it as an integer label map (or "
            "are the image and the label map swapped?)"
        )
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo >= 0 and hi <= 255:
        return sitk.Cast(image, sitk.sitkUInt8)
    if lo >= 0 and hi <= 65535:
        return sitk.Cast(image, sitk.sitkUInt16)
    if lo >= -(2**31) and hi < 2**31:
        return sitk.Cast(image, sitk.sitkInt32)
    raise InputError(f"{name} has label values outside the 32-bit range; save it as an integer label map")


def _describe_difference(prop: str, label: Volume, ref: Volume) -> str:
    values = {
        "size": (label.shape, ref.shape),
        "spacing": (label.spacing, ref.spacing),
        "origin": (label.origin, ref.origin),
        "direction": (label.direction, ref.direction),
    }[prop]

    def short(v: Sequence[float]) -> str:
        return "(" + ", ".join(f"{float(x) + 0.0:.6g}" for x in v) + ")"  # + 0.0: no "-0"

    # origins and axes as ITK and Slicer give them (LPS): nibabel's RAS numbers differ in the signs of
    # x and y (a trial, session 36: "(179.4, ...)" against nibabel's (-179.4, ...))
    axes = " (k, j, i)" if prop in ("size", "spacing") else " (LPS)" if prop in ("origin", "direction") else ""
    return f"{prop}{axes} {short(values[0])} in it vs the image's {short(values[1])}"


def _physical_box(volume: Volume) -> np.ndarray:
    """The (2, 3) bounds in physical space (mm, x y z) of the volume's voxels' outer corners."""
    direction = np.asarray(volume.direction, dtype=np.float64).reshape(3, 3)
    size, spacing = np.asarray(volume.size_ijk, float), np.asarray(volume.spacing_ijk, float)
    corners = np.array([[-0.5 if bit == 0 else n - 0.5 for bit, n in zip(bits, size)] for bits in np.ndindex(2, 2, 2)])
    points = np.asarray(volume.origin, float) + (corners * spacing) @ direction.T
    return np.stack([points.min(axis=0), points.max(axis=0)])


def _overlaps(a: Volume, b: Volume) -> bool:
    box_a, box_b = _physical_box(a), _physical_box(b)
    return bool(np.all(box_a[0] < box_b[1]) and np.all(box_b[0] < box_a[1]))


def _no_position(path: Path) -> str | None:
    """How the header of ``path`` fails to place it in space (NIfTI with qform and sform codes 0,
    NRRD without space fields): ITK then gives it origin 0 and axes x, y, z, wherever it was
    drawn. None when the header places it (or the format always does)."""
    import struct

    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            header = _nifti_header(path)
            e = _nifti1_endian(header)
            return "NIfTI qform and sform codes 0" if e and struct.unpack_from(e + "2h", header, 252) == (0, 0) else None
        if name.endswith(".nrrd"):
            with open(path, "rb") as f:
                head = f.read(1 << 16).split(b"\n\n", 1)[0].lower()
            fields = {line.split(b":", 1)[0].strip() for line in head.splitlines() if b":" in line}
            if not fields & {b"space", b"space dimension", b"space directions"}:
                return "an NRRD without space fields"
    except (OSError, InputError):
        return None
    return None


def _writer_default(grid: Volume) -> bool:
    """Whether ``grid`` is what a script writes for an array saved without geometry: voxel size 1,
    origin 0 and the identity axes (SimpleITK's GetImageFromArray), or x and y flipped (nibabel's
    identity affine, which is RAS, read by ITK as LPS)."""
    direction = np.asarray(grid.direction, dtype=np.float64).reshape(3, 3)
    return (np.allclose(grid.spacing_ijk, 1.0, rtol=0, atol=1e-9) and np.allclose(grid.origin, 0.0, rtol=0, atol=1e-9)
            and any(np.allclose(direction, np.diag(d), rtol=0, atol=1e-9) for d in ((1, 1, 1), (-1, -1, 1))))


def _off_grid_error(name: str, labels: Volume, reference: Volume, diffs: list[str],
                    path: Path | None = None, reference_path: Path | None = None,
                    option: str = "resample=True", role: str = "prompt") -> InputError:
    """The refusal of a label map ``name`` that is not on the ``reference`` grid. ``option``: how the
    caller's user asks for resampling (the command line's ``--resample-prompt``)."""
    other_series = _series_holding_grid(reference_path, labels) if role == "prompt" else None
    if other_series is not None:  # drawn on another series of the folder (resampling wrote on the wrong one)
        uid = other_series[0]
        where = ("in a batch manifest, its series column; from Python, series_uid=" if uid.strip() else
                 'from Python, series_uid=""; a batch manifest\'s empty series cell reads the largest series, so '
                 "there give these files a folder of their own")
        return InputError(f"{name} is not on the grid of the series read from {reference_path.name}, but on that of "
                          f"its series {other_series[1]}: it was drawn on that series; choose it with "
                          f"{_series_argument(uid)} ({where})")
    split = [(q.name, mm) for q, other in ((reference_path, labels), (path, reference))
             if (mm := _two_grids_holding(q, other)) is not None]
    if split and set(diffs) & {"origin", "direction", "spacing"}:
        # Resampling would move the prompt by the two grids' difference: the files most likely hold the
        # same grid, written or read by tools that take different ones of the two.
        which = " and ".join(f"{n} (qform and sform up to {mm:.3g} mm apart)" for n, mm in split)
        details = "; ".join(_describe_difference(d, labels, reference) for d in diffs)
        return InputError(f"{name} is not on the image grid ({details}), and the NIfTI header of {which} holds "
                          f"two different grids: {'it' if role == 'result' else 'the prompt'} was probably saved by a "
                          f"tool that uses the other one of the two, so {option} would move it by their difference. "
                          f"Save {'it' if role == 'result' else 'the prompt'} with the "
                          "image's geometry as ITK reads it (SimpleITK: mask.CopyInformation(image)), or make the "
                          "file's qform and sform agree (nibabel: img.set_qform(img.get_sform()))")
    image_unplaced = (_no_position(reference_path) if reference_path is not None and labels.shape == reference.shape
                      and path is not None and _no_position(path) is None else None)
    if image_unplaced:  # the image's header is what lacks a position (the prompt was blamed: "drawn on another scan?")
        return InputError(f"{name} is not on the image grid because the image, {reference_path.name}, has no position "
                          f"in space in its header ({image_unplaced}: ITK gives it origin 0 and plain axes) while "
                          f"{name} has one, so the two cannot be matched by position ({option} would put it in the "
                          "wrong place). If it was drawn on this image's voxels, save it with the image's geometry "
                          "(SimpleITK: mask.CopyInformation(image)); better, give the image its position again (export "
                          "it again from the scan)")
    return (_never_resampled(name, labels, reference, diffs, path, option=option)
            or _generic_off_grid_error(name, labels, reference, diffs, option, role))


def _never_resampled(name: str, labels: Volume, reference: Volume, diffs: list[str],
                     path: Path | None = None, resample: bool = False,
                     option: str = "resample=True") -> InputError | None:
    """The refusal of a label map that resampling would put in the wrong place whatever the user
    asks (``read_labelmap`` raises it with ``resample=True`` too: --resample-prompt moved a prompt
    drawn on slice 60 to slice 93, exit 0): one of the image's size without a position in its
    header, or the image's grid with x and y flipped (RAS written as LPS). None otherwise."""
    unplaced = _no_position(path) if path is not None and labels.shape == reference.shape else None
    if not unplaced and labels.shape == reference.shape and _writer_default(labels) and not _writer_default(reference):
        # (also beside an image of 1 mm voxels at origin 0 in permuted axes, where a drawing on its
        # reformat would have this grid too: the two cannot be told apart, and resampling a script's
        # mask there transposed it silently, exit 0: refused as well)
        unplaced = ("voxel size 1, origin 0 and plain axes: what SimpleITK's GetImageFromArray or nibabel's "
                    "np.eye(4) affine writes when no geometry is given")
    if unplaced:  # resampling would place it by the origin and axes ITK made up: not where it was drawn
        how = "only a script's default position" if unplaced.startswith("voxel size 1") else "no position in space"
        return InputError(f"{name} has the image's size but {how} in its header ({unplaced}), so it "
                          f"cannot be placed on the image ({option} would put it in the wrong place). If it "
                          "was drawn on this image's voxels, save it with the image's geometry (SimpleITK: "
                          "mask.CopyInformation(image); nibabel: Nifti1Image(data, image.affine)) and try again")
    if _axes_in_another_order(labels, reference):
        size, image_size = (" x ".join(map(str, v.shape[::-1])) for v in (labels, reference))
        return InputError(f"{name} has the image's origin and axes and its numbers of voxels in another order "
                          f"({size} voxels against the image's {image_size}): an array saved with its axes in "
                          "another order (e.g. reversed: numpy and SimpleITK index a volume (k, j, i), nibabel "
                          f"(i, j, k)), so it cannot be placed on the image ({option} would put it in the wrong "
                          "place, along another axis). Put the array's axes in the image's order before saving it "
                          "with the image's geometry (for an array from SimpleITK's GetArrayFromImage saved by "
                          "nibabel: Nifti1Image(array.transpose(2, 1, 0), image.affine); in SimpleITK, "
                          "GetImageFromArray of the reordered array, then mask.CopyInformation(image)) and try again")
    flip = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS
    mirrored = Volume(labels.array, labels.spacing, tuple(flip @ np.asarray(labels.origin, dtype=np.float64)),
                      tuple((flip @ np.asarray(labels.direction, dtype=np.float64).reshape(3, 3)).ravel()))
    if set(diffs) & {"origin", "direction"} and not same_grid(mirrored, reference):
        # An image whose x and y extent is centred on 0 (a field of view centred on the isocentre):
        # there a copy reoriented to RAS (its voxels flipped with its axes, e.g. by nibabel's
        # as_closest_canonical) has the same grid as one written with the signs mixed up.
        box = _physical_box(reference)
        half = 0.5 * float(min(reference.spacing_ijk))
        if np.all(np.abs(box[0, :2] + box[1, :2]) <= half):
            if resample:  # resampled as before: right for a reoriented copy; said, since it cannot be told
                warnings.warn(f"{name} has the image's grid with x and y flipped, which on this image (centred on 0 "
                              "in x and y) is what a copy reoriented to RAS has: resampled as such; if a tool wrote "
                              "it with RAS numbers where the image's are LPS, the result is mirrored: check it",
                              stacklevel=4)
                return None
            return InputError(f"{name} is the image's grid with the x and y axes' signs flipped (origin and axes): "
                              "if it is a reoriented copy of a drawing on this image (its voxels flipped with its "
                              f"axes, as RAS tools save it), use {option}; if a tool wrote RAS numbers where "
                              "the image's are LPS, save it again with the image's geometry (SimpleITK: "
                              "mask.CopyInformation(image))")
        return InputError(f"{name} is the image's grid with the x and y axes' signs flipped (origin and axes): it was "
                          "written in RAS coordinates where the image's are LPS, or the reverse, by a tool that mixed "
                          f"the two up ({option} would mirror it); save it again with the image's geometry "
                          "(SimpleITK: mask.CopyInformation(image))")
    return None


def _axes_in_another_order(labels: Volume, reference: Volume) -> bool:
    """Whether ``labels`` has the reference's origin and axes and its numbers of voxels permuted (not
    all equal): an array written in the wrong index order (a SimpleITK (k, j, i) array given to
    nibabel, which takes (i, j, k), with the image's affine). Resampled, the drawing lands on
    another axis (a prompt drawn axially was propagated sagittally at Dice 0.63, exit 0)."""
    if labels.shape == reference.shape or sorted(labels.shape) != sorted(reference.shape):
        return False
    scale = float(max(reference.spacing_ijk))
    return bool(np.allclose(labels.origin, reference.origin, rtol=0, atol=1e-3 * scale)
                and np.allclose(labels.direction, reference.direction, rtol=0, atol=1e-4))


def _generic_off_grid_error(name: str, labels: Volume, reference: Volume, diffs: list[str],
                            option: str = "resample=True", role: str = "prompt") -> InputError:
    details = "; ".join(_describe_difference(d, labels, reference) for d in diffs)
    hint = (" (the segmentation has a geometry of its own, not the image's: in Slicer, set its geometry from "
            "the volume in the Segmentations module, or resample it here)" if _is_seg_nrrd(name) else "")
    advice = (f"use {option} to resample it onto the image grid" if _overlaps(labels, reference) else
              "it does not even overlap the image in space (drawn on another scan?): "
              + ("save it on the grid of the image it was propagated on" if role == "result" else
                 "draw the prompt on this image"))
    flipped, axes = _axes_flipped_to(labels, reference)
    part = _part_of_the_lattice(labels, reference)
    if part is not None and part[0] == 0 and part[1] > part[2] and role == "prompt" and _overlaps(labels, reference):
        # the prompt's scan had more slices of the same lattice: a series with files missing at an end, or
        # split over two folders, read as the image; resampling gave a partial result (a DICOM trial, s41)
        _, mine, theirs = part
        advice = (f"it lies on the image's voxel lattice but spans {mine} slices where the image has {theirs}: if "
                  "the image holds only part of the scan the prompt was drawn on (a DICOM series with files missing at "
                  "an end, or continued in another folder?), give the whole scan; otherwise "
                  f"{advice} (the result then covers only the {theirs} slices the image holds)")
    if axes and labels.shape == reference.shape and not same_grid(flipped, reference):
        # the image's own voxels stored with axes reversed (dcm2niix's conversion of a DICOM series, whose
        # j runs the other way): resampling is exact there, and said so (a trial, session 36)
        advice = (f"it lies on the image's own voxels, stored with its {axes} axis reversed (as some converters "
                  f"and viewers save it), so {option} puts it back exactly")
    elif diffs == ["spacing"] and labels.shape == reference.shape:
        # the image's voxels with another voxel size in the header: most often a header written wrong
        # (resampling moved a drawing on slice 14 to slice 12)
        advice = ("it has the image's number of voxels, origin and axes, so if it was drawn on this image's voxels "
                  "its header's voxel size is wrong: save it with the image's geometry (SimpleITK: "
                  f"mask.CopyInformation(image)); {option} only if it was drawn on a grid of that voxel size "
                  "(it would move the drawing)")
    return InputError(f"{name} is not on the image grid: {', '.join(diffs)} differ{'s' if len(diffs) == 1 else ''} "
                      f"({details}){hint}; {advice}")


def _part_of_the_lattice(labels: Volume, reference: Volume) -> tuple[int, int, int] | None:
    """(array axis, ``labels``' slices along it, ``reference``'s) when ``labels`` lies on
    ``reference``'s voxel lattice (``_lattice_offset``; stored with axes reversed too, as
    TotalSegmentator writes a DICOM series' labels: a trial, session 46, got no word of the missing
    file then) and covers the same rows and columns, but another run of slices along one axis; else None."""
    labels = _axes_flipped_to(labels, reference)[0]  # the same voxels in space, stored the image's way round
    offset = _lattice_offset(labels, reference)
    if offset is None:
        return None
    differ = [a for a in range(3) if labels.shape[a] != reference.shape[a] or offset[a] != 0]
    if len(differ) != 1:
        return None
    return differ[0], labels.shape[differ[0]], reference.shape[differ[0]]


def _is_seg_nrrd(name: str) -> bool:
    """A Slicer segmentation file, which Slicer saves cropped to its segments' extent."""
    return name.lower().endswith(".seg.nrrd")


def _axes_flipped_to(labels: Volume, reference: Volume) -> tuple[Volume, str]:
    """``labels`` with the array axes whose direction is the reverse of ``reference``'s flipped
    (voxels and origin moved with them: the same voxels in space), and which axes those were
    ("" when none). Slicer saves a segmentation of a left-handed image (FSL's LAS, dcm2niix) with
    k reversed, so that its own grid is right-handed: voxel for voxel still the image's lattice."""
    mine = np.asarray(labels.direction, dtype=np.float64).reshape(3, 3)
    theirs = np.asarray(reference.direction, dtype=np.float64).reshape(3, 3)
    dots = np.sum(mine * theirs, axis=0)  # per axis i, j, k: +1 same, -1 reversed
    if not np.all(np.abs(np.abs(dots) - 1) < 1e-6) or np.all(dots > 0):
        return labels, ""
    array, origin, flipped = labels.array, np.asarray(labels.origin, dtype=np.float64), []
    for a in range(3):  # i, j, k; array axes (k, j, i)
        if dots[a] < 0:
            array = np.flip(array, axis=2 - a)
            origin = origin + mine[:, a] * labels.spacing_ijk[a] * (labels.array.shape[2 - a] - 1)
            flipped.append("ijk"[a])
    return (Volume(np.ascontiguousarray(array), labels.spacing, tuple(origin), tuple((mine * np.sign(dots)).ravel())),
            " and ".join(flipped))


def _lattice_offset(labels: Volume, reference: Volume) -> tuple[int, int, int] | None:
    """Where ``labels`` starts on ``reference``'s voxel lattice, (k, j, i), when it is a crop or
    an extension of that lattice (same spacing and axes, origin on a voxel of it, within the
    tolerances of ``same_grid``); None otherwise. Axes reversed against the reference's are
    taken as flipped (``_axes_flipped_to``)."""
    labels = _axes_flipped_to(labels, reference)[0]
    if set(same_grid(labels, reference)) & {"spacing", "direction"}:
        return None
    direction = np.asarray(reference.direction, dtype=np.float64).reshape(3, 3)
    delta = np.asarray(labels.origin, dtype=np.float64) - np.asarray(reference.origin, dtype=np.float64)
    index = np.linalg.solve(direction, delta) / np.asarray(reference.spacing_ijk, dtype=np.float64)  # (i, j, k)
    off = np.round(index)
    slack_mm = 1e-4 * max(1.0, *(abs(float(v)) for v in (*labels.origin, *reference.origin)))
    if np.any(np.abs(index - off) * np.asarray(reference.spacing_ijk) > max(slack_mm, 1e-9)):
        return None
    return tuple(int(v) for v in reversed(off))  # type: ignore[return-value]


def _on_reference_lattice(labels: Volume, reference: Volume, name: str) -> Volume | None:
    """``labels`` put on ``reference``'s grid when it is a crop (or extension) of that lattice
    whose labels all fall inside the image: exact, no resampling, with a warning that says so; None
    otherwise. Used for Slicer's .seg.nrrd, which Slicer saves cropped to the segments' extent (other
    label maps on another extent stay refused: e.g. a prompt drawn on another series of the same
    geometry)."""
    labels, flipped = _axes_flipped_to(labels, reference)
    offset = _lattice_offset(labels, reference)
    if offset is None:
        return None
    out = np.zeros(reference.shape, dtype=labels.array.dtype)
    src, dst = [], []
    for o, n_lab, n_ref in zip(offset, labels.shape, reference.shape):
        lo, hi = max(o, 0), min(o + n_lab, n_ref)
        if lo >= hi:
            return None  # no voxel in common
        src.append(slice(lo - o, hi - o))
        dst.append(slice(lo, hi))
    inside = labels.array[tuple(src)]
    if np.count_nonzero(inside) != np.count_nonzero(labels.array):
        return None  # labels outside the image: the usual refusal says so
    out[tuple(dst)] = inside
    covered = tuple(dst) if any(d.start > 0 or d.stop < n for d, n in zip(dst, reference.shape)) else None
    turned = (f" (its {flipped} axis reversed, as Slicer saves a segmentation of a left-handed image)"
              if flipped else "")
    warnings.warn(f"{name} ({' x '.join(map(str, labels.shape))} voxels) lies on the image's own voxel grid{turned}, "
                  f"from voxel {offset} in k, j, i; placed there as it is, without resampling", stacklevel=3)
    return Volume(out, reference.spacing, reference.origin, reference.direction, covered=covered)


def _grid_from_header(p: Path) -> Volume | None:
    """The grid of a 3D image file from its header alone (a Volume whose array is a zero-strided
    view: no voxels are read), or None where the header does not say it plainly (a folder, a
    4D or 2D file, one ITK cannot read: the full read decides and names the problem). Kept per
    file as it is now (size and time): batch's pre-flight read one image's header 100 000 times
    for a manifest of that many rows (518 s before the first case)."""
    try:
        if not p.is_file():
            return None
        st = p.stat()
    except OSError:
        return None
    # the inode and ctime too (a file replaced by `cp -p`, rsync -t or tar keeps its size and mtime), and its
    # first 4 KB, where a header lies (Windows' ctime is the creation time, which an overwrite keeps)
    try:
        with open(p, "rb") as fh:
            head = hashlib.sha1(fh.read(4096)).hexdigest()
    except OSError:
        return None
    return _grid_from_header_of(str(p.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev, st.st_ctime_ns,
                                head)


@functools.lru_cache(maxsize=256)
def _grid_from_header_of(path: str, *stat_key) -> Volume | None:
    p = Path(path)
    try:
        if _dicom_object_kind(p) is not None:  # a DICOM SEG or RT structure set: the full read names it
            return None  # (not refused here: batch's pre-flight would stop every row for one)
        reader = sitk.ImageFileReader()
        reader.SetFileName(_itk_path(p))
        with _itk_warnings_hidden(), _native_stderr_hidden():
            reader.ReadImageInformation()
        size, dim = list(reader.GetSize()), reader.GetDimension()
        if dim == 4 and size[3] == 1:
            spacing, origin = reader.GetSpacing()[:3], reader.GetOrigin()[:3]
            d4 = reader.GetDirection()
            direction = tuple(d4[4 * r + c] for r in range(3) for c in range(3))
            size = size[:3]
        elif dim == 3:
            spacing, origin, direction = reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
        else:
            return None
        if reader.GetNumberOfComponents() != 1 or min(size) < 1:
            return None
    except (RuntimeError, OSError, InputError):
        return None
    shape = tuple(int(n) for n in reversed(size))
    spacing, direction = list(spacing), list(direction)
    for c in range(3):  # a negative pixdim: the header read keeps the sign, the full read flips the axis instead
        if spacing[c] < 0:
            spacing[c] = -spacing[c]
            for r in range(3):
                direction[3 * r + c] = -direction[3 * r + c]
    return Volume(np.broadcast_to(np.zeros((), np.uint8), shape), tuple(float(v) for v in reversed(spacing)),
                  tuple(float(v) for v in origin), tuple(float(v) for v in direction))


def _series_holding_grid(folder: Path | None, labels: Volume) -> tuple[str, str] | None:
    """(UID, name) of a series of the DICOM folder ``folder``, other than the one read, whose grid (from
    its headers) ``labels`` lies on; None if none does or ``folder`` is no folder of several series."""
    try:
        if folder is None or not Path(folder).is_dir():
            return None
        ids = dicom_series_ids(Path(folder))
        if len(ids) < 2 or len(ids) > 32:
            return None
        lister = sitk.ImageSeriesReader()
        by_uid = {uid: lister.GetGDCMSeriesFileNames(_itk_path(folder), uid) for uid in ids}
        read = _largest_image_series(ids, by_uid)[0]
        for uid in ids:
            if uid == read:
                continue
            grid = _grid_from_dicom_headers(Path(folder), uid, by_uid=by_uid)  # (the folder listed once)
            if grid is not None and not same_grid(labels, grid, tol=1e-3):  # (headers: decimal strings)
                return uid, _series_named(uid, by_uid[uid])
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def _grid_from_dicom_headers(folder: Path, series_uid: str | None = None, chose: list | None = None,
                             missing: list | None = None, by_uid: dict | None = None) -> Volume | None:
    """The grid the DICOM series of ``folder`` (``series_uid``, else the largest, as ``read_volume``
    chooses) reads as, from the headers of its first two files in GDCM's order, as ITK stacks them
    (origin and axes of the first, the spacing across from the step between the two positions);
    None where it cannot be told so plainly (no series, one file, two files of other orientations or
    sizes, a step not along the slices' normal: a tilted gantry): the full read decides. ``chose``
    gets a sentence saying which series was taken where the folder holds several and none was asked;
    ``missing`` gets how many slices the series lacks between its first and last file (its last
    file's header read too: the steps of the first two, over the span, against the files there are)."""
    try:
        if not folder.is_dir():
            return None
        ids = dicom_series_ids(folder) if by_uid is None else list(by_uid)  # (by_uid: the folder listed already)
        if not ids or (series_uid is not None and series_uid not in ids):
            return None
        if by_uid is None:
            lister = sitk.ImageSeriesReader()
            by_uid = {uid: lister.GetGDCMSeriesFileNames(_itk_path(folder), uid) for uid in ids}
        uid = series_uid if series_uid is not None else _largest_image_series(ids, by_uid)[0]  # as read_volume
        files = by_uid[uid]
        if series_uid is None and len(ids) > 1 and chose is not None:
            chose.append(f"{folder} holds {len(ids)} DICOM series; the largest, {_series_label(uid)} ({len(files)} "
                         "files), was compared")
        if files and _dicom_object_kind(Path(files[0])) is not None:
            return None  # a DICOM SEG: the full read names it (the row fails at its turn in batch)
        if len(files) < 2:
            return None
        heads = []
        for f in [*files[:2], *(files[-1:] if missing is not None and len(files) > 2 else ())]:
            reader = sitk.ImageFileReader()
            reader.SetFileName(f)
            with _itk_warnings_hidden(), _native_stderr_hidden():
                reader.ReadImageInformation()
            if reader.GetDimension() != 3 or reader.GetSize()[2] != 1 or reader.GetNumberOfComponents() != 1:
                return None
            heads.append((reader.GetSize()[:2], reader.GetSpacing()[:2], np.asarray(reader.GetOrigin()),
                          np.asarray(reader.GetDirection(), dtype=np.float64)))
    except (RuntimeError, OSError, InputError):
        return None
    (size, spacing, origin, direction), (size2, spacing2, origin2, direction2) = heads[:2]
    step = origin2 - origin
    across = float(step @ direction.reshape(3, 3)[:, 2])
    if size != size2 or not np.allclose(spacing, spacing2) or not np.allclose(direction, direction2, atol=1e-4) \
            or across <= 0 or np.linalg.norm(step - across * direction.reshape(3, 3)[:, 2]) > 1e-3 * across:
        return None
    if len(heads) == 3 and heads[2][0] == size and np.allclose(heads[2][3], direction, atol=1e-4):
        # (a localizer last in GDCM's order: not counted; a re-review, session 36)
        span = float((heads[2][2] - origin) @ direction.reshape(3, 3)[:, 2]) / across
        missing.append(max(int(round(span)) + 1 - len(files), 0))
    shape = (len(files), int(size[1]), int(size[0]))
    return Volume(np.broadcast_to(np.zeros((), np.uint8), shape), (across, float(spacing[1]), float(spacing[0])),
                  tuple(float(v) for v in origin), tuple(float(v) for v in direction))


def check_grids_from_headers(image_path: PathLike, prompt_path: PathLike,
                             resample_option: str = "resample=True", *, dicom_series: str | None | bool = False,
                             ) -> "Volume | None":
    """Before the image is read: a prompt file whose header puts it on another grid than the image
    file's is refused at once (as ``read_labelmap`` would refuse it after reading both, which for
    a large image takes a minute and gigabytes). Where either header cannot be compared so, nothing
    is said here and the full read decides. Returns the image's grid from its header
    (``_grid_from_header``; None where it does not say it plainly). With ``dicom_series`` (a
    SeriesInstanceUID, or None for the largest series; batch's pre-flight: a whole folder scan
    more, worth it before a batch's work, not before one read) an image that is a DICOM folder is
    placed from its first two files' headers (``_grid_from_dicom_headers``) and refused only where
    it differs 10 times beyond the full read's tolerance (its positions are decimal strings), in
    the slice plane, in origin or axes, or in the slice count by more than localizers explain."""
    tol, chose, dicom = 1e-4, [], False
    image = _grid_from_header(Path(image_path))
    if image is None and dicom_series is not False and Path(image_path).is_dir():
        lacks: list = []
        image, tol, dicom = _grid_from_dicom_headers(Path(image_path), dicom_series or None, chose, lacks), 1e-3, True
    prompt = _grid_from_header(Path(prompt_path))
    if image is None or prompt is None or min(image.shape) < 2:  # a one-slice image: the full read says so
        return image
    compared = image
    if dicom:
        # Two headers do not settle the spacing across (ITK takes the mean step over the series; two
        # rounded positions differ from it) nor the slice count (the full read leaves out a localizer
        # or two): those are left to the full read, but for a prompt of more slices than the folder
        # has files, or of far fewer.
        n = image.shape[0]
        if lacks and lacks[0] and prompt.shape[0] == n + lacks[0] and tuple(prompt.shape[1:]) == tuple(image.shape[1:]):
            # not a grid to resample onto: the scan lacks slices the prompt was drawn with (a trial,
            # session 36: "size differs; use --resample-prompt" for a file missing from the folder)
            raise InputError(f"{Path(prompt_path).name} has {prompt.shape[0]} slices but the DICOM series in "
                             f"{image_path} has {n} files, with a gap of {lacks[0]} slice{'s' if lacks[0] > 1 else ''} "
                             "between them: is a file missing from the folder? Put it back (resampling the prompt "
                             "would not mend the series)")
        k = prompt.shape[0] if n - max(2, n // 20) <= prompt.shape[0] <= n else n
        compared = Volume(np.broadcast_to(np.zeros((), np.uint8), (k, *image.shape[1:])),
                          (prompt.spacing[0], *image.spacing[1:]), image.origin, image.direction)
    diffs = same_grid(prompt, compared, tol=tol)
    if diffs and not (_is_seg_nrrd(Path(prompt_path).name) and _lattice_offset(prompt, compared) is not None):
        for path in (Path(image_path), Path(prompt_path)):  # what the full read would note: it may explain this
            if not path.is_file():
                continue
            # a file whose data is missing, cut short or absurd: the size its header declares is not the
            # mismatch to name (the prompt was told to be resampled, which then named the real fault; a .mhd
            # without its .raw was said not to overlap the prompt: a trial, session 45)
            _check_detached_data(path)
            _check_declared_size(path)
            header = _nifti_header(path)
            if header is not None:
                _check_nifti_layout(path, header)
                _check_nifti_complete(path, header)
                _note_nifti_no_spacing(path, header, 3)
            elif path.name.lower().endswith((".nrrd", ".nhdr")):
                _check_nrrd_complete(path)
        error = _off_grid_error(Path(prompt_path).name, prompt, compared, diffs, Path(prompt_path), Path(image_path),
                                option=resample_option)
        if chose:  # the series choice may be the mismatch
            raise InputError(f"{error} ({chose[0]}; choose another with the manifest's series column)")
        raise error
    return image


def as_volume(reference, what: str) -> "Volume":
    """``reference`` as a Volume: a SimpleITK image is converted (``Volume.from_sitk``); anything
    else but a Volume is an InputError (an AttributeError before)."""
    if isinstance(reference, Volume):
        return reference
    if isinstance(reference, sitk.Image):
        if reference.GetDimension() != 3 or reference.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"{what} must be a 3D single-component image, got a {reference.GetDimension()}D one with "
                             f"{reference.GetNumberOfComponentsPerPixel()} component(s) per voxel")
        return Volume.from_sitk(reference)
    raise InputError(f"{what} must be a Volume (read_volume) or a SimpleITK image, got {type(reference).__name__}")


def read_labelmap(path: PathLike, reference: Volume | None = None, resample: bool = False, *,
                  resample_option: str = "resample=True", only_labels: Sequence[int] | None = None,
                  role: str = "prompt", reference_path: PathLike | None = None, coverage: bool = False) -> Volume:
    """Read an integer label map (e.g. a prompt) as a Volume with an integer array (K, J, I).

    With ``reference``: the label map must lie on the reference grid (``same_grid``), else
    InputError naming what differs; with ``resample=True`` it is instead resampled onto the
    reference grid by nearest neighbour. A matching or resampled result carries the
    reference's exact spacing, origin and direction. ``resample_option``: how the refusal tells
    the user to ask for resampling (the command line passes ``--resample-prompt``). ``only_labels``:
    the labels the caller will propagate; what resampling did to others is not said (None: all).
    ``role``: "prompt", or "result" for an earlier result or its corrected copy (the refusals then
    say what to do with one of those, not with a prompt). ``reference_path``: the file or DICOM
    folder ``reference`` was read from, for the refusal (a prompt on another series of the folder).
    ``coverage``: a label map resampled from a grid that covers part of the reference's gets where
    it reaches in ``covered`` (a boolean array of the reference's shape); a cropped .seg.nrrd put
    back on the lattice always gets its box there.
    """
    name = Path(path).name
    if reference is not None:
        reference = as_volume(reference, "read_labelmap's reference")
    # A one-slice label map is fine: it has a 3D position and can be resampled onto the image.
    raw = _read_sitk(path, single_slice_ok=True, label_map=True, role=role)
    _check_label_scaling(Path(path))
    image = _as_integer_labels(raw, name)
    labels = Volume.from_sitk(image)
    if reference is None:
        return labels
    diffs = same_grid(labels, reference)
    placed = _on_reference_lattice(labels, reference, name) if diffs and _is_seg_nrrd(name) else None
    covered = None
    if placed is not None:  # a crop of the image's own grid (Slicer's .seg.nrrd): put back exactly
        labels, diffs, covered = placed, [], placed.covered
    if diffs:
        if not resample:
            raise _off_grid_error(name, labels, reference, diffs, Path(path),
                                  None if reference_path is None else Path(reference_path), option=resample_option,
                                  role=role)
        never = _never_resampled(name, labels, reference, diffs, Path(path), resample=True, option=resample_option)
        if never is not None:
            raise never
        resampler = sitk.ResampleImageFilter()
        resampler.SetSize(list(reference.size_ijk))
        resampler.SetOutputSpacing(reference.spacing_ijk)
        resampler.SetOutputOrigin(reference.origin)
        resampler.SetOutputDirection(reference.direction)
        resampler.SetInterpolator(sitk.sitkNearestNeighbor)
        resampler.SetDefaultPixelValue(0)
        resampler.SetOutputPixelType(image.GetPixelID())
        had_labels = bool(np.any(labels.array))
        drawn = labels
        labels = Volume.from_sitk(resampler.Execute(image))
        if had_labels and not labels.array.any():
            raise InputError(f"{name} holds labels, but none of them is left on the image grid after resampling: the "
                             "drawing lies outside the image or between two of its slices; draw it on the image itself")
        _check_not_oblique_strips(name, drawn, reference, labels.array)
        _note_half_a_voxel_off(name, drawn, reference)
        labels = Volume(_collapse_tilted_strips(name, drawn, reference, labels.array), labels.spacing,
                        labels.origin, labels.direction)
        _check_resampled_labels(name, drawn, reference, labels.array, only_labels)
        if coverage:  # where the file reaches (a corrected copy of a result: plan_update)
            ones = sitk.Image(image.GetSize(), sitk.sitkUInt8)
            ones.CopyInformation(image)
            resampler.SetOutputPixelType(sitk.sitkUInt8)
            reached = sitk.GetArrayViewFromImage(resampler.Execute(ones + 1)).astype(bool)
            covered = None if reached.all() else reached
    return Volume(labels.array, reference.spacing, reference.origin, reference.direction, covered=covered)


def halfway_axes(a: np.ndarray, b: np.ndarray, zero: float = 1e-6) -> list[int]:
    """The axes (0, 1, 2: i, j, k of the first grid) along which a grid lies half a voxel off another
    of the same voxel size, ``a`` (3 x 3) and ``b`` (3) mapping the first grid's voxel index to the
    other's (``a @ ijk + b``); entries of ``a`` within ``zero`` of 0 count as 0. Empty where the two are
    rotated against each other (ties only on a set of measure zero there). Slicer's segmentation grid
    (``mrml._check_not_half_a_voxel_apart``) and a resampled prompt (``_note_half_a_voxel_off``)."""
    rows = np.abs(a) > zero
    if not (rows.sum(axis=0) == 1).all() or not (rows.sum(axis=1) == 1).all():
        return []
    out = []
    for col in range(3):
        row = int(np.flatnonzero(rows[:, col])[0])
        if abs(abs(a[row, col]) - 1) < zero and abs(b[row] % 1.0 - 0.5) < 1e-3:
            out.append(col)
    return out


def _note_half_a_voxel_off(name: str, drawn: Volume, reference: Volume) -> None:
    """A note (UserWarning) when ``drawn``'s grid is parallel to the image's, with the image's voxel
    size along an axis, but lies half a voxel off it along that axis: each of its voxels lies halfway
    between two of the image's, and nearest-neighbour resampling takes one of them, so the drawing
    lands one voxel off one way (a trial, session 46: 1.5 mm off on 3 mm voxels, exit 0, no word;
    Slicer refuses such a segmentation grid, ``mrml._check_not_half_a_voxel_apart``)."""
    mine = np.asarray(drawn.direction, dtype=np.float64).reshape(3, 3)
    theirs = np.asarray(reference.direction, dtype=np.float64).reshape(3, 3)
    # the drawn grid's index of the image's voxels: index = A @ image_index + b
    a = np.diag(1 / np.asarray(drawn.spacing_ijk)) @ mine.T @ theirs @ np.diag(reference.spacing_ijk)
    b = np.diag(1 / np.asarray(drawn.spacing_ijk)) @ mine.T @ (np.asarray(reference.origin, dtype=np.float64)
                                                              - np.asarray(drawn.origin, dtype=np.float64))
    # (direction cosines of DICOM-derived files carry noise of 1e-5 and more)
    names = ("i (columns)", "j (rows)", "k (slices)")
    off = [names[col] for col in halfway_axes(a, b, zero=1e-3)]
    if off:
        warnings.warn(f"{name} lies half a voxel off the image grid along the image's {' and '.join(off)} axis, "
                      "with voxels of the same size: nearest-neighbour resampling put the drawing one voxel to one "
                      "side there; if that matters, draw the prompt on the image itself", UserWarning, stacklevel=3)


def _slices_holding(mask: np.ndarray) -> list[int]:
    """How many slices along each array axis hold ``mask``."""
    return [int(np.count_nonzero(mask.any(axis=tuple(a for a in range(3) if a != ax)))) for ax in range(3)]


# A drawing on a grid tilted at most this much from the image's is put back on one image slice per
# drawn slice when its outline crosses several of them as strips (``_collapse_tilted_strips``); a
# more oblique one that crosses many is refused (``_check_not_oblique_strips``).
STRIPS_COLLAPSE_DEGREES = 5.0


def _check_not_oblique_strips(name: str, drawn: Volume, reference: Volume, resampled: np.ndarray,
                              most: int = 3) -> None:
    """A label drawn on one slice of a grid oblique to the image's (its plane's normal more than
    STRIPS_COLLAPSE_DEGREES from every image axis) must not cross more than ``most`` of the image's
    slices along every axis once resampled: such a drawing became 27 strips, each kept as a drawn
    keyframe, so the result was the strips (exit 0). Nearer to parallel, the strips are put back on
    one slice (``_collapse_tilted_strips``); a slice of a parallel grid, even a coarser one, is fine."""
    axes = np.asarray(drawn.direction, dtype=np.float64).reshape(3, 3)  # columns: i, j, k
    image_axes = np.asarray(reference.direction, dtype=np.float64).reshape(3, 3)
    aligned = np.max(np.abs(image_axes.T @ axes), axis=0) >= np.cos(np.deg2rad(STRIPS_COLLAPSE_DEGREES))
    if aligned.all():
        return  # a grid parallel to the image's (the usual case): no label can cross it obliquely
    values = np.unique(drawn.array[drawn.array != 0])
    for value in values[:64]:
        counts = _slices_holding(drawn.array == value)
        ax = int(np.argmin(counts))  # the axis it was drawn across: the fewest slices hold it
        if counts[ax] > 10:
            continue  # a 3D mask rather than drawn slices: resampled as it is
        if aligned[2 - ax]:  # array axis k, j, i is direction column 2, 1, 0
            continue
        crossed = min(_slices_holding(resampled == value))
        if crossed > max(most, 3 * counts[ax]):
            drawn_on = "one slice" if counts[ax] == 1 else f"{counts[ax]} slices"
            raise InputError(f"{name}: label {value} was drawn on {drawn_on} of a grid oblique to the image's; on "
                             f"the image it crosses {crossed} slices along every axis as thin strips, which would "
                             "each count as a drawn slice. Draw the prompt on the image's own slices (in Slicer: on "
                             "this volume, in a view aligned with it)")


def _drawn_slice_of(drawn: Volume, reference: Volume, where, ax: int) -> np.ndarray:
    """For image voxels ``where`` (k, j, i index arrays on ``reference``), the slice of ``drawn``'s
    grid along its array axis ``ax`` each lies in (its physical point's nearest index there)."""
    ijk = np.stack([where[2], where[1], where[0]]).astype(np.float64) * np.asarray(reference.spacing_ijk)[:, None]
    points = np.asarray(reference.direction, dtype=np.float64).reshape(3, 3) @ ijk \
        + np.asarray(reference.origin, dtype=np.float64)[:, None]
    axes = np.asarray(drawn.direction, dtype=np.float64).reshape(3, 3)
    index = (axes.T @ (points - np.asarray(drawn.origin, dtype=np.float64)[:, None]))[2 - ax]
    return np.floor(index / drawn.spacing_ijk[2 - ax] + 0.5).astype(np.int64)  # halves up, as ITK's nearest


DRAWING_RUN = 3  # drawn slices in runs of at most this many adjacent slices are a drawing; longer runs a 3D mask


def _drawing_slices(mine: np.ndarray, ax: int) -> set[int]:
    """The slices along ``ax`` of a label's mask ``mine`` that are drawn slices: those in runs of at
    most DRAWING_RUN adjacent slices (the engine keeps up to 3 adjacent drawn slices of a small
    object as keyframes); longer runs are a 3D mask (a registered lesion's), resampled as it is."""
    held = np.flatnonzero(np.moveaxis(mine, ax, 0).any(axis=(1, 2)))
    out, run = set(), []
    for s in [*held.tolist(), None]:
        if run and (s is None or s != run[-1] + 1):
            if len(run) <= DRAWING_RUN:
                out.update(run)
            run = []
        if s is not None:
            run.append(s)
    return out


def _check_resampled_labels(name: str, drawn: Volume, reference: Volume, resampled: np.ndarray,
                            only: Sequence[int] | None = None) -> None:
    """After resampling a prompt: a label left with nothing on the image's grid is said (with two
    labels drawn on thin slices, one vanished and the run went on without a word; refusing it
    refused a label outside a cropped image that --label could not leave out), and
    drawn slices that left nothing are said: drawn on slices thinner than the image's, nearest-
    neighbour sampling keeps only those an image slice's centre falls in (three slices drawn on a
    1 mm grid over a 5 mm image became 381 voxels on one slice, without a word). Slices of a 3D
    mask (longer runs) may fall between the image's: downsampling drops slices, nothing to say.
    ``only``: the labels to say this of (those the caller propagates; None: all)."""
    present = set(np.unique(resampled).tolist())
    asked = None if only is None else {int(v) for v in only}
    values = [int(v) for v in np.unique(drawn.array[drawn.array != 0]) if asked is None or int(v) in asked]
    gone = [v for v in values[:1024] if v not in present]
    if gone and len(present - {0}):  # (none left at all is the caller's refusal)
        which = f"label {gone[0]}" if len(gone) == 1 else f"labels {', '.join(map(str, gone))}"
        warnings.warn(f"{name}: {which} left nothing on the image grid once resampled (outside the image, or between "
                      f"two of its slices): {'it is' if len(gone) == 1 else 'they are'} not propagated; if "
                      f"{'it' if len(gone) == 1 else 'they'} should be, draw {'it' if len(gone) == 1 else 'them'} on "
                      "the image itself", stacklevel=3)
    for value in values[:64]:
        if int(value) in gone:
            continue  # said above
        mine = drawn.array == value
        counts = _slices_holding(mine)
        ax = int(np.argmin(counts))
        drawing = _drawing_slices(mine, ax) if counts[ax] <= 10 else set()
        if not drawing:
            continue
        where = np.nonzero(resampled == value)
        lost = sorted(drawing - set(np.unique(_drawn_slice_of(drawn, reference, where, ax)).tolist()))
        if not lost:
            continue
        outside = [s for s in lost if not _drawn_slice_inside(drawn, reference, mine, ax, s)]
        between = [s for s in lost if s not in outside]
        parts = []
        for what, slices in (("fell between the image's slices", between),
                             ("lie" if len(outside) > 1 else "lies", outside)):
            if slices:
                shown = ", ".join(map(str, slices[:5])) + (" ..." if len(slices) > 5 else "")
                verb = what if slices is between else f"{what} outside the image"
                parts.append(f"{len(slices)} of them ({shown}) {verb}")
        warnings.warn(f"{name}: label {int(value)} was drawn on {len(drawing)} slice{'s' if len(drawing) > 1 else ''} "
                      f"of its grid, and {' and '.join(parts)} once resampled: check the prompt, or draw it on the "
                      "image's own slices", stacklevel=3)


def _drawn_slice_inside(drawn: Volume, reference: Volume, mine: np.ndarray, ax: int, s: int) -> bool:
    """Whether drawn slice ``s`` (of label mask ``mine``, along ``ax``) lies within the image's
    extent: its drawn voxels' centre, as a continuous index of the image, within every axis."""
    points = np.argwhere(np.moveaxis(mine, ax, 0)[s])
    centre = np.insert(points.mean(axis=0), 0, s)  # along (ax, the other two) of the drawn array
    order = [ax] + [a for a in range(3) if a != ax]
    kji = np.empty(3)
    kji[order] = centre
    ijk = kji[::-1] * np.asarray(drawn.spacing_ijk)
    point = np.asarray(drawn.direction, dtype=np.float64).reshape(3, 3) @ ijk + np.asarray(drawn.origin)
    direction = np.asarray(reference.direction, dtype=np.float64).reshape(3, 3)
    index = np.linalg.solve(direction, point - np.asarray(reference.origin)) / np.asarray(reference.spacing_ijk)
    return bool(np.all((index >= -0.5) & (index <= np.asarray(reference.size_ijk) - 0.5)))


def _collapse_tilted_strips(name: str, drawn: Volume, reference: Volume, resampled: np.ndarray) -> np.ndarray:
    """A label drawn on a few slices of a grid tilted slightly against the image's (another series
    of the study, a registered copy: up to STRIPS_COLLAPSE_DEGREES) crosses several image slices
    once resampled, as strips: at 1 degree an outline 112 mm wide lay on 3 slices of 1 mm (2801,
    9608 and 2920 voxels), each kept as a drawn slice, and the result was the strips (Dice 0.33
    against 0.99 drawn on the image). Each drawn slice's strips are put back on the one image slice
    holding most of them, as the union of their outlines (that slice's voxels of other labels
    kept), and a warning says so. Strips are told from a coarser parallel slice, which covers
    several image slices with the same outline, by how little they overlap: the strips' areas add
    up to at most 1.5 times their union's. Returns ``resampled``, changed or not."""
    axes = np.asarray(drawn.direction, dtype=np.float64).reshape(3, 3)  # columns: i, j, k
    image_axes = np.asarray(reference.direction, dtype=np.float64).reshape(3, 3)
    cosines = np.abs(image_axes.T @ axes)  # [image axis column, drawn axis column]
    out = resampled
    for value in np.unique(drawn.array[drawn.array != 0])[:64]:
        counts = _slices_holding(drawn.array == value)
        ax = int(np.argmin(counts))  # the drawn grid's array axis it was drawn across
        column = 2 - ax
        image_column = int(np.argmax(cosines[:, column]))
        tilt = float(np.degrees(np.arccos(min(1.0, cosines[image_column, column]))))
        if counts[ax] > 10 or tilt < 1e-3 or tilt > STRIPS_COLLAPSE_DEGREES:
            continue  # a 3D mask, a parallel grid, or too oblique (refused above if it crosses many)
        img_ax = 2 - image_column
        where = np.nonzero(out == value)
        if where[0].size == 0:
            continue
        source = _drawn_slice_of(drawn, reference, where, ax)  # the drawn slice each voxel came from
        # only drawn slices (runs of at most DRAWING_RUN) are put back: a longer run is a 3D mask (a
        # registered lesion's), resampled as it is (collapsing each of its slices cut a lesion's
        # Dice from 0.999 to 0.65 at 4.5 degrees)
        isolated = _drawing_slices(drawn.array == value, ax)
        plane_shape = tuple(n for a, n in enumerate(out.shape) if a != img_ax)
        plans, moved = [], []
        for s in np.unique(source):
            if int(s) not in isolated:
                continue
            sel = source == s
            layers, areas = np.unique(where[img_ax][sel], return_counts=True)
            if layers.size < 2:
                continue
            in_plane = [where[a][sel] for a in range(3) if a != img_ax]
            union = np.unique(np.ravel_multi_index(in_plane, plane_shape))
            if areas.sum() > 1.5 * union.size:
                continue  # several image slices holding the same outline: a coarser slice, not strips
            target = int(layers[np.argmax(areas)])
            plans.append((tuple(a[sel] for a in where), target, union))
            moved.append((int(layers[0]), int(layers[-1]), target))
        if plans and out is resampled:
            out = resampled.copy()
        for picked, _, _ in plans:  # every strip taken out first, then each drawing put on its slice
            out[picked] = 0
        for _, target, union in plans:
            rows, cols = np.unravel_index(union, plane_shape)
            index = [rows, cols]
            index.insert(img_ax, np.full(union.size, target))
            index = tuple(index)
            free = (out[index] == 0) | (out[index] == value)  # other labels' voxels there are kept
            out[tuple(i[free] for i in index)] = value
        if moved:
            spans = ", ".join(f"slices {a}-{b} onto slice {t}" for a, b, t in moved)
            warnings.warn(f"{name}: label {int(value)} was drawn on a grid tilted {tilt:.1f} degrees from the image's; "
                          f"its outline crossed the image's slices along axis {img_ax} in strips ({spans}): put back "
                          "on one slice each, as drawn slices of the image", stacklevel=3)
    return out


# ----------------------------------------------------------------------------- writing


def without_extension(name: str, extensions: Sequence[str]) -> str:
    """``name`` less the first of ``extensions`` it ends with (any case; ``a.nii.gz`` -> ``a``),
    or as it is."""
    ext = next((e for e in extensions if name.lower().endswith(e)), "")
    return name[: len(name) - len(ext)]


def _write_extension(path: Path, extensions: Sequence[str] = _WRITE_EXTENSIONS) -> str:
    if path.name in ("", ".", ".."):
        raise InputError(f"{str(path)!r} is not a file name; give one ending in {', '.join(extensions)}")
    lower = path.name.lower()
    for ext in extensions:
        if lower.endswith(ext):
            return ext
    if path.exists() and not path.is_file() and not path.is_dir():  # -o /dev/null: "the output format of null"
        raise InputError(f"{path} is a device or pipe, not a file the output can be written to; give a file name "
                         f"ending in {', '.join(extensions)}")
    raise InputError(
        f"cannot tell the output format of {path.name}; use one of {', '.join(extensions)}"
    )


def check_output_path(path: PathLike, extensions: Sequence[str] = _WRITE_EXTENSIONS, probe: bool = True,
                      example: str | None = None) -> str:
    """What can be checked of an output path before any work (the format from its extension, its
    folder exists and, with ``probe``, a file can be made in it, it is not itself a folder);
    returns the extension. Raises InputError. The writers pass ``probe=False``: the check before
    the work has tried the folder, and a failed write says why itself. ``example``: the file name
    suggested for a folder given as the output (default result.nii.gz, or the first extension's)."""
    target = Path(path)
    check_name_length(target)
    default = example or "result" + (".nii.gz" if ".nii.gz" in extensions else extensions[0])
    if str(path).endswith(("/", os.sep)) and not target.is_dir():  # Path() drops the trailing slash
        raise InputError(f"{path} names a folder (it ends with a slash); give a file name (e.g. {target / default})")
    if target.is_dir():  # before the extension: `-o results/` is a folder, not a file of unknown format
        ext = next((e for e in extensions if target.name.lower().endswith(e)), None)
        name = default if ext is None else "result" + ext
        raise InputError(f"{target} is a folder; give a file name (e.g. {target / name})")
    ext = _write_extension(target, extensions)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        if parent.is_file():
            raise InputError(f"{parent} is a file, not a folder: {target} cannot be made inside it; choose another "
                             "output path")
        raise InputError(f"folder {parent} does not exist; create it or choose another output path")
    if probe:
        check_writable_output(target, extensions)
        check_folder_writable(parent)
    return ext


def check_writable_output(path: PathLike, extensions: Sequence[str] = _WRITE_EXTENSIONS) -> None:
    """Before any work, for an output that exists already: a symbolic link must point at a file
    name of an output format (the file is written onto the link's target), and a file protected
    by its permissions (no write bit at all: ``chmod a-w``) is not replaced, although the folder
    would let a new file be moved over it. Raises InputError."""
    path = Path(path)
    if path.is_symlink():
        target = through_link(path)
        if not any(target.name.lower().endswith(e) for e in extensions):
            raise InputError(f"{path} is a symbolic link to {target}, which is not a file of an output format "
                             f"({', '.join(extensions)}); remove the link or choose another output")
    check_not_read_only(path)


def check_not_read_only(path: PathLike) -> None:
    """InputError if the output ``path`` (through a symbolic link) is an existing file without
    any write permission bit (``chmod a-w``, how users protect a result): replacing it by moving
    a new file over it would be allowed by the folder, but not what its owner asked for."""
    import stat

    try:
        mode = Path(path).stat().st_mode
    except OSError:
        return  # nothing there yet (or a folder problem the other checks name)
    if stat.S_ISREG(mode) and not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise InputError(f"{path} exists and is read-only (mode {stat.S_IMODE(mode):04o}), so it is kept as it is; make "
                         "it writable (chmod u+w) to replace it, or choose another output name")


NAME_MAX = 255  # bytes in one file or folder name on the common file systems (ext4, XFS, APFS, NTFS)


def check_name_length(path: PathLike, suffix: str = "", whose: str = "") -> None:
    """InputError if a name in ``path`` (its last one with ``suffix`` added, the name of a file
    ``whose`` the command writes beside it) is longer than the file system takes: the OSError
    (ENAMETOOLONG) came as a traceback, in batch after the case had been computed (default names
    join every folder)."""
    parts = Path(path).parts
    unit = "characters" if os.name == "nt" else "bytes"  # NTFS counts UTF-16 units, the others bytes

    def length(text: str) -> int:
        return len(text.encode("utf-16-le")) // 2 if os.name == "nt" else len(os.fsencode(text))

    for n, part in enumerate(parts):
        last = n == len(parts) - 1 and suffix
        size = length(part + suffix) if last else length(part)
        if size > NAME_MAX:
            where = Path(*parts[:n]) if n else None  # the folder holding it (the whole path repeated the name)
            folder = f" in {where}" if where is not None else ""
            raise InputError(f"the name {part[:40]}...{folder} is {size} {unit} long"
                             + (f" as {part[:12]}...{suffix}, the name of {whose}" if last else "")
                             + f"; file systems take at most {NAME_MAX}: choose a shorter name")


def check_folder_writable(folder: PathLike, what: str = "the output") -> None:
    """Can files be made, renamed and removed in ``folder``, as writing an output does (a
    temporary beside it, moved in)? Tried with a real file (``os.access`` says yes to root);
    raises InputError otherwise."""
    folder = Path(folder)
    stem = folder / f".pamsegment-{uuid.uuid4().hex[:12]}"
    probe, moved = stem.with_name(stem.name + ".probe"), stem.with_name(stem.name + ".probe2")
    failed = None
    try:
        probe.touch(exist_ok=False)
        os.replace(probe, moved)
        moved.unlink()
    except OSError as error:
        failed = error
    finally:  # also on Ctrl-C: no probe is left behind
        for leftover in (probe, moved):
            try:
                leftover.unlink(missing_ok=True)
            except OSError:
                pass
    if failed is not None:
        reason = failed.strerror or str(failed)
        if failed.errno == errno.ENOENT and folder.is_dir():  # /proc, some virtual file systems
            reason = "the folder takes no new files"
        raise InputError(f"cannot write {what} in folder {folder} ({reason}): files must be made, "
                         "renamed and removed there; choose another folder")


def check_not_a_broken_link(folder: PathLike, option: str = "-o") -> None:
    """InputError if ``folder`` is a symbolic link to nothing, or one of a loop: making it would
    fail with "File exists" after the work."""
    folder = Path(folder)
    try:
        broken = folder.is_symlink() and not folder.exists()
    except (OSError, RuntimeError):  # a loop, on some Pythons
        broken = True
    if broken:
        raise InputError(f"{option} {folder} is a symbolic link to nothing (or one of a loop of links); give a folder, "
                         "or point the link at one")


def make_writable_folder(folder: PathLike, what: str = "the output") -> None:
    """Make ``folder`` (with its parents) and ``check_folder_writable`` it; InputError if either fails."""
    folder = Path(folder)
    check_not_a_broken_link(folder, "the folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot make folder {folder} for {what} ({error.strerror or error}); choose another "
                         "folder") from None
    check_folder_writable(folder, what)


def check_link_target(path: PathLike) -> None:
    """Before any work: an output that is a symbolic link is written onto its target (the link
    stays one), so the target's folder must exist and take new files. Raises InputError."""
    path = Path(path)
    if not path.is_symlink():
        return
    target = Path(os.path.realpath(path))
    if not target.parent.is_dir():
        raise InputError(f"{path} is a symbolic link to {target}, whose folder does not exist; remove the link or "
                         "choose another output")
    check_folder_writable(target.parent, f"{path.name} (a symbolic link to {target})")


def through_link(path: Path) -> Path:
    """Where writing ``path`` lands: a symbolic link's target (moving a file in there keeps the
    link a link, as writing in place does), else ``path``."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _listed(paths: Sequence[Path]) -> str:
    """Output names for a message: all of up to three, else the first and last and how many."""
    names = [p.name for p in paths]
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]} ({len(names)} files)"


def os_reason(error: OSError) -> str:
    """An OSError for a message: "no space left on the disk" for ENOSPC, else its own words."""
    return "no space left on the disk" if error.errno == errno.ENOSPC else (error.strerror or str(error))


def replace_together(outputs, keep_ctrl_c_ignored: bool = False, after=None, defer_interrupt: bool = False) -> None:
    """Write files that belong together, then put them in place together.

    ``outputs``: ``(path, suffix, write)`` in the order they are moved in; ``write(tmp)`` writes
    the file to ``tmp``, a temporary named with ``suffix`` (the format's extension) beside where
    the file lands (for a symbolic link: beside its target, so the link stays one). Once every
    temporary is written they are moved in with Ctrl-C ignored, and ``after()`` (e.g. printing what
    was written) runs within that too (``keep_ctrl_c_ignored``: left ignored after it, when the
    process ends with the command; ``defer_interrupt``: a Ctrl-C or SIGTERM meanwhile is raised
    once they are in, for callers that go on). A temporary that cannot be written is one InputError naming
    the output (nothing was replaced). A move that fails puts back the files moved in before it
    (each existing file is kept as a hard link, or a copy, until all are in place), so that the
    outputs never mix two runs; the InputError says so, or, should a file not go back, which ones
    mix and where their earlier files are kept. No temporary stays behind."""
    from .cli import ctrl_c_ignored

    stamp = f".pamsegment-{uuid.uuid4().hex[:12]}"
    moves = []  # (temporary, where it lands, the path as given)
    kept = []  # per move: where it lands, the earlier file kept aside (None: there was none), moved in yet
    keep_aside = set()  # earlier files that could not be put back: left beside their outputs, and named
    try:
        for n, (path, suffix, write) in enumerate(outputs):
            path = Path(path)
            at = through_link(path)
            tmp = at.with_name(f"{stamp}-{n}.tmp{suffix}")
            moves.append((tmp, at, path))
            try:
                write(tmp)
            except OSError as error:
                hint = "" if error.errno == errno.ENOSPC else (f"; check that the folder {at.parent} exists and can be "
                                                              "written")
                raise InputError(f"cannot write {path} ({os_reason(error)}); nothing was replaced{hint}") from None
            except InputError as error:  # a writer's own message names the temporary: name the output
                raise InputError(str(error).replace(str(tmp), str(path))) from None
        with ctrl_c_ignored(keep=keep_ctrl_c_ignored, defer=defer_interrupt):
            for k, (tmp, at, path) in enumerate(moves):
                entry = {"at": at, "old": None, "moved": False}
                kept.append(entry)
                try:
                    if at.is_file():  # the earlier file, kept until every new one is in place
                        entry["old"] = at.with_name(f"{stamp}-{k}.old{tmp.suffix}")
                        _keep_aside(at, entry["old"])
                    os.replace(tmp, at)
                    entry["moved"] = True
                except OSError as error:
                    stranded = None  # this output's earlier file, renamed aside and not back (the name is empty)
                    if entry["old"] is not None and not at.exists():  # set aside by renaming, not moved in: back
                        try:
                            os.replace(entry["old"], at)
                            entry["old"] = None
                        except OSError:
                            stranded = entry["old"]
                            keep_aside.add(stranded)
                    failed = _put_back(kept)
                    done = [m[2] for m, e in zip(moves, kept) if e["moved"]]
                    rest = [m[2] for m in moves[k + 1:]]
                    again = "it was" if len(done) == 1 else "they were"
                    if not failed:
                        state = (f"nothing was replaced ({_listed(done)} put back as {again})" if done else
                                 "nothing was replaced")
                    else:
                        aside = ", ".join(e["old"].name for e in failed if e["old"] is not None)
                        state = (f"replaced: {_listed([e['at'] for e in failed])}, which could not be put back"
                                 + (f" (the earlier files are kept beside them as {aside})" if aside else "")
                                 + "; not replaced: this one" + (f" and {_listed(rest)}" if rest else "")
                                 + " (the outputs now mix two runs)")
                        keep_aside.update(e["old"] for e in failed if e["old"] is not None)
                    if stranded is not None:
                        state += (f"; {path.name} itself is missing: its earlier file is kept beside it as "
                                  f"{stranded.name}")
                    raise InputError(f"cannot write {path} ({error.strerror or error}): {state}; fix that and "
                                     "run again") from None
            if after is not None:
                after()
    finally:
        for tmp, _, _ in moves:
            tmp.unlink(missing_ok=True)
        for entry in kept:
            if entry["old"] is not None and entry["old"] not in keep_aside:
                entry["old"].unlink(missing_ok=True)


LEFTOVER_NAME = re.compile(r"\.pamsegment-[0-9a-f]{12}(-\d+)?\.(tmp|old|probe2?)(\..*)?"
                           r"|batch_report(\.shard\d+-of-\d+)?\.csv\.[0-9a-f]{12}\.tmp")  # (batch's report)
LEFTOVER_AGE_SECONDS = 600.0  # younger ones may be another run's, writing into the same folder now


def leftover_note(paths) -> str | None:
    """A note when the folders of ``paths`` (outputs just written) hold files an earlier run left
    because it was killed (SIGKILL, a power cut) while writing: temporaries, and earlier outputs
    kept aside while the new ones were moved in (``.old``: the outputs there may then mix two runs;
    a review, session 31: nothing said so, and nothing ever removed them). Only files untouched for
    LEFTOVER_AGE_SECONDS count. None if there are none."""
    found: list[Path] = []
    folders = sorted({through_link(Path(p)).parent for p in paths})
    now = time.time()
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    try:
                        if LEFTOVER_NAME.fullmatch(entry.name) and now - entry.stat().st_ctime > LEFTOVER_AGE_SECONDS:
                            found.append(folder / entry.name)
                    except OSError:
                        continue
        except OSError:
            continue
    if not found:
        return None
    found.sort()
    kept = [f for f in found if ".old" in f.name]
    holding = sorted({str(f.parent) for f in found})
    where = ", ".join(holding)
    shown = ", ".join(f.name for f in found[:3]) + (" ..." if len(found) > 3 else "")
    return (f"{where} hold{'s' if len(holding) == 1 else ''} {len(found)} file{'s' if len(found) > 1 else ''} an "
            f"earlier run left when it was stopped while writing ({shown})"
            + ("; those named .old are outputs it had set aside, so the outputs there may mix two runs: check them"
               if kept else "") + f"; remove {'them' if len(found) > 1 else 'it'} once checked")


def say_leftovers(paths) -> None:
    """Print ``leftover_note(paths)`` as a command's note, if there is one."""
    note = leftover_note(paths)
    if note:
        print(f"note: {note}", flush=True)


def _keep_aside(at: Path, old: Path) -> None:
    """The file at ``at`` kept as ``old`` until the new one is in place, to put back should a later
    move fail: a hard link (``at`` stays in place), or, where the file system makes none, ``at``
    renamed to ``old`` (in the same folder: a rename works wherever the temporaries could be made).
    OSError if neither works: nothing is moved in then (a copy, tried before, could fail on a full
    disk and left the file to be deleted as if there had been none)."""
    try:
        os.link(at, old)
    except OSError:
        os.replace(at, old)


def _put_back(kept) -> list[dict]:
    """Undo the moves done (``kept`` entries moved in): each earlier file back, or a new file where
    there was none removed. Returns the entries that could not be put back (their earlier file, if
    any, stays aside)."""
    failed = []
    for entry in reversed(kept):
        if not entry["moved"]:
            continue
        try:
            if entry["old"] is not None:
                os.replace(entry["old"], entry["at"])
                entry["old"] = None
            else:
                entry["at"].unlink()
        except OSError:
            failed.append(entry)
    return failed[::-1]


def _atomic_write(image: sitk.Image, path: PathLike, extensions: Sequence[str] = _WRITE_EXTENSIONS,
                  nifti_codes: tuple[int, int] | None = None) -> Path:
    """Write ``image`` compressed to ``path`` via a temporary file in the same folder, so an
    existing file is either fully replaced or left untouched. A symbolic link stays one: its
    target is written. ``nifti_codes``: a NIfTI output's (qform_code, sform_code), the image's."""
    _itk_path(path)  # a name ITK cannot take: refused before anything is written, naming the output
    target = through_link(Path(path))
    ext = check_output_path(target, extensions, probe=False)
    parent = target.parent if str(target.parent) else Path(".")
    if image.GetDimension() == 3:
        check_geometry_fits(image.GetDirection(), target)
    # The temporary name keeps the extension (ITK picks the format from it) and stays short.
    tmp = parent / f".pamsegment-{uuid.uuid4().hex[:12]}.tmp{ext}"
    try:
        with _itk_warnings_hidden(), _native_stderr_hidden():  # a failure is reported below, in one line naming OUT
            sitk.WriteImage(image, _itk_path(tmp), useCompression=True)
        _check_written(tmp, image, ext)
        if nifti_codes is not None and tuple(nifti_codes) != (1, 1) and ext in (".nii", ".nii.gz"):
            _patch_nifti_codes(tmp, nifti_codes)
            _check_written(tmp, image, ext)
        os.replace(tmp, target)
    except (RuntimeError, OSError) as error:
        reason = _itk_reason(error) if isinstance(error, RuntimeError) else os_reason(error)
        if "no space left on device" in reason.lower() or (isinstance(error, RuntimeError) and _disk_full(parent)):
            # ITK's words for ENOSPC, or its NRRD writer's own ("_nrrdGzClose: failed to flush pending
            # data") on a full disk (looked at before the partial file is removed): said as for every format
            reason = "no space left on the disk"
        raise InputError(f"cannot write {path} ({reason}); nothing was replaced") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return Path(path)


def _disk_full(folder: Path) -> bool:
    """Whether the file system holding ``folder`` has (nearly) no space left for this user: less
    than 256 KiB, so that a write failing there failed for want of space."""
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):  # (no statvfs on Windows)
        return False
    return stat.f_bavail * stat.f_frsize < 256 * 1024


class IncompleteWrite(OSError):
    """ITK's NIfTI, NRRD and PNG writers do not fail when the disk fills up: they leave an empty or
    cut file, which must not be moved over the user's previous output."""


def _check_written(tmp: Path, image: sitk.Image, ext: str) -> None:
    """Is the file ITK just wrote whole? Without reading it back where its format tells: a NIfTI by
    the size its header declares (the gzip trailer's for .nii.gz), a gzip-encoded NRRD by its
    trailer, a MetaImage by the data size its header declares; other formats (PNG: its writer
    does not fail on a full disk) by reading it back and comparing the voxels. Raises
    IncompleteWrite (an OSError, with ENOSPC when the disk has no room left)."""
    import shutil

    def incomplete():
        try:
            full = shutil.disk_usage(tmp.parent).free < 1 << 20
        except OSError:
            full = False
        return IncompleteWrite(errno.ENOSPC if full else errno.EIO,
                               "the file written is incomplete: is the disk full?")

    size = tmp.stat().st_size
    nbytes = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    if ext in (".nii", ".nii.gz"):
        try:
            header = _nifti_header(tmp)
            if header is None or _nifti_data_bytes(header) is None:
                raise incomplete()
            _check_nifti_complete(tmp, header)
        except InputError:
            raise incomplete() from None
        return
    if ext in (".nrrd", ".seg.nrrd", ".mha"):
        with open(tmp, "rb") as fh:
            head = fh.read(65536)
            fh.seek(max(size - 4, 0))
            trailer = int.from_bytes(fh.read(4), "little")
        if ext == ".mha":  # the data follows the header's last line, ElementDataFile = LOCAL
            end = head.find(b"ElementDataFile = LOCAL")
            line_end = head.find(b"\n", max(end, 0))
            try:
                declared = next((int(line.split(b"=")[1]) for line in head[:max(end, 0)].splitlines()
                                 if line.startswith(b"CompressedDataSize")), nbytes)
            except (ValueError, IndexError):
                raise incomplete() from None
            if end < 0 or line_end < 0 or size < line_end + 1 + declared:
                raise incomplete()
            return
        fields = head.split(b"\n\n")[0] + b"\n"
        if b"\nencoding: gzip\n" in fields:  # ITK reads a stream cut in its trailer without a word
            if size < 18 or trailer != nbytes % (1 << 32):
                raise incomplete()
            return
        if b"\nencoding: raw\n" in fields and size >= len(head.split(b"\n\n")[0]) + 2 + nbytes:
            return
    try:
        with _itk_warnings_hidden():
            back = sitk.ReadImage(_itk_path(tmp))
    except RuntimeError:
        raise incomplete() from None
    written, wanted = sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image)
    if back.GetSize() != image.GetSize() or not np.array_equal(written, wanted, equal_nan=wanted.dtype.kind in "fc"):
        raise incomplete()


def _is_orthonormal(direction: Sequence[float], tol: float = 1e-4) -> bool:
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return bool(np.allclose(d.T @ d, np.eye(3), atol=tol))


def check_geometry_fits(direction: Sequence[float], path: PathLike) -> None:
    """NIfTI stores only rotations (its quaternion / affine as ITK writes it): a sheared grid
    (e.g. CT with gantry tilt) would be written on a different grid. InputError before any work."""
    name = Path(path).name.lower()
    if name.endswith((".nii", ".nii.gz")) and not _is_orthonormal(direction):
        raise InputError(f"the image's grid is sheared (its axes are not perpendicular, e.g. a gantry tilt), which "
                         f"NIfTI cannot store; write {Path(path).name.split('.')[0]}.nrrd or .mha instead")


_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def seg_nrrd_segments(path: PathLike) -> dict[int, dict[str, str]]:
    """The segments a Slicer .seg.nrrd names, by label value: {value: {"ID", "Name", "Color"}}
    (from its header; {} for another file or one whose fields are missing or odd), so that a
    result written as .seg.nrrd keeps the prompt's segment names and colours."""
    p = Path(path)
    if not _is_seg_nrrd(p.name) or not p.is_file():
        return {}
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(_itk_path(p))
        with _itk_warnings_hidden():
            reader.ReadImageInformation()
        keys = set(reader.GetMetaDataKeys())
        out, ids = {}, set()
        for n in range(10000):
            if f"Segment{n}_LabelValue" not in keys:
                break
            fields = {k: reader.GetMetaData(f"Segment{n}_{k}") for k in ("ID", "Name", "Color", "LabelValue", "Tags")
                      if f"Segment{n}_{k}" in keys}
            if "Tags" in fields:  # e.g. the terminology entry; not PAMSegment's own run and record tags
                kept = [t for t in fields.pop("Tags").split("|") if t and not t.startswith("PAMSegment.")]
                if kept:
                    fields["Tags"] = "|".join(kept) + "|"
            try:
                value = int(fields.pop("LabelValue"))
            except ValueError:
                continue  # this segment's fields are odd: it is named by its label
            # a field with control characters (an ESC sequence clears or retitles the terminal the summary is
            # printed on) or bidirectional overrides (text shown other than it reads) is left out
            fields = {k: v for k, v in fields.items() if 0 < len(v) < 1000 and not _UNPRINTABLE.search(v)}
            try:
                rgb = [float(c) for c in fields.get("Color", "").split()]
            except ValueError:
                rgb = []
            if len(rgb) != 3 or not all(0.0 <= c <= 1.0 for c in rgb):
                fields.pop("Color", None)  # Slicer reads three numbers from 0 to 1
            if fields.get("ID") in ids:
                fields.pop("ID")  # Slicer needs them unique
            if 1 <= value <= 65535 and value not in out:
                ids.add(fields.get("ID"))
                out[value] = fields
        return out
    except (RuntimeError, OSError, InputError):
        return {}


def _seg_nrrd_metadata(image: sitk.Image, labels: np.ndarray, segments: dict[int, dict[str, str]] | None = None,
                       empty_segments: Sequence[int] = ()) -> None:
    """Segment fields Slicer reads from a .seg.nrrd, one segment per non-zero label and per value of
    ``empty_segments`` (segments without a voxel, as Slicer writes them: a label value no voxel
    holds); names and colours (and tags: Slicer's terminology) from ``segments``
    (``seg_nrrd_segments`` of the prompt) where it has the label."""
    extent = " ".join(f"0 {n - 1}" for n in image.GetSize())
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    palette = [(0.5, 0.68, 0.5), (0.94, 0.84, 0.57), (0.69, 0.48, 0.4), (0.44, 0.72, 0.82), (0.85, 0.4, 0.4)]
    values = sorted({int(v) for v in np.unique(labels) if v != 0} | {int(v) for v in empty_segments if 0 < v <= 65535})
    for n, value in enumerate(values):
        r, g, b = palette[n % len(palette)]
        given = (segments or {}).get(value, {})
        for key, text in (
            ("ID", given.get("ID", f"Segment_{value}")),
            ("Name", given.get("Name", f"Segment_{value}")),
            ("NameAutoGenerated", "0" if "Name" in given else "1"),
            ("Color", given.get("Color", f"{r} {g} {b}")),
            ("ColorAutoGenerated", "0" if "Color" in given else "1"),
            ("Extent", extent),
            ("Layer", "0"),
            ("LabelValue", str(value)),
            ("Tags", given.get("Tags", "|")),
        ):
            image.SetMetaData(f"Segment{n}_{key}", text)


def write_labelmap(array: np.ndarray, reference: Volume, path: PathLike,
                   segments: dict[int, dict[str, str]] | None = None, empty_segments: Sequence[int] = ()) -> Path:
    """Write a label map (K, J, I), bool or integer-valued, on ``reference``'s exact grid.

    Stored as uint8 (uint16 if the largest label exceeds 255), compressed; the format follows
    the extension (.nii.gz, .nii, .nrrd, .seg.nrrd, .mha). Written atomically. Returns the path.
    ``segments``: for .seg.nrrd, the segment IDs, names and colours by label value
    (``seg_nrrd_segments`` of a Slicer prompt); others are named Segment_<label>. ``empty_segments``:
    label values written as segments of a .seg.nrrd although no voxel holds them (a prompt's empty
    segments, kept in the result as Slicer keeps them).
    """
    target = Path(path)
    _write_extension(target)
    reference = as_volume(reference, "write_labelmap's reference")
    labels = np.asarray(array)
    if labels.shape != reference.shape:
        raise InputError(
            f"label map shape {labels.shape} does not match the image {reference.shape} (k, j, i)"
        )
    if labels.dtype.kind == "f" and (not np.all(np.isfinite(labels)) or not np.array_equal(labels, np.round(labels))):
        raise InputError("label map has non-integer values; pass a boolean or integer array")
    if labels.dtype.kind not in "biuf":
        raise InputError(f"label map has dtype {labels.dtype}; pass a boolean or integer array")
    lo = float(labels.min()) if labels.size else 0.0
    hi = float(labels.max()) if labels.size else 0.0
    if lo < 0:
        raise InputError(f"label map has negative labels (min {lo:g}); labels must be 0 (background) or positive")
    if hi > 65535:
        raise InputError(f"label map has labels up to {hi:g}; at most 65535 labels can be written")
    dtype = np.uint8 if hi <= 255 else np.uint16
    image = reference.to_sitk(labels.astype(dtype, copy=False))
    if _is_seg_nrrd(target.name):
        _seg_nrrd_metadata(image, labels, segments, empty_segments)
    return _atomic_write(image, target, nifti_codes=reference.nifti_codes)


def empty_segments_of(segments: dict[int, dict[str, str]], propagated: Sequence[int],
                      chosen: Sequence[int] | None) -> list[int]:
    """The label values of a .seg.nrrd prompt's segments (``seg_nrrd_segments``) that a result keeps
    as empty segments: those not ``propagated`` when every label was asked for (``chosen`` None: a
    segment the user added and left empty, e.g. for a lesion to draw later, which the result dropped
    without a word); with ``--label`` choosing labels, none (the others were left out on purpose)."""
    if chosen is not None:
        return []
    done = {int(v) for v in propagated}
    return [v for v in segments if v not in done]


def write_volume(volume: Volume, path: PathLike) -> Path:
    """Write an image Volume (any numeric dtype) with its geometry, compressed and atomically."""
    return _atomic_write(volume.to_sitk(), path)


# ----------------------------------------------------------------------------- 2D images (image sets)

# What a set of 2D images may hold (a folder is scanned for these), and what a 2D mask is written as.
IMAGE_2D_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".nii.gz", ".nii", ".nrrd", ".mha",
                       ".mhd")
MASK_2D_EXTENSIONS = (".png", ".tif", ".tiff", ".nii.gz", ".nii", ".nrrd", ".mha")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey value of RGB


def _read_png_with_pil(p: Path) -> sitk.Image | None:
    """A grey + alpha PNG's grey channel (the alpha is dropped); None if it is not one."""
    if not p.name.lower().endswith(".png"):
        return None
    try:
        with open(p, "rb") as f:
            head = f.read(29)
    except OSError:
        return None
    # 16-bit grey + alpha (IHDR bit depth 16, colour type 4): Pillow opens it as 8-bit RGBA and ITK
    # not at all; refused by name, not called damaged (a review, s29), nor read at a lost precision
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24:26] == b"\x10\x04":
        raise InputError(f"{p.name} is a 16-bit grey PNG with an alpha channel, which cannot be read here at its "
                         "full depth: save it without the alpha channel (16-bit grey PNG or TIFF)")
    try:
        # unguarded: Pillow's bomb guard raised its own error (a traceback, exit 1) for a cut PNG over
        # 179 Mpx that ITK had failed on; here only the header is read unless it is grey + alpha
        with _pillow_unguarded() as Image, Image.open(p) as im:
            if im.mode not in ("LA", "La"):
                return None
            width, height = im.size  # from the header: checked before a pixel is decoded (ITK could not)
            memory = physical_memory_bytes()
            if memory and 4 * 2 * width * height > memory:
                raise InputError(f"{p.name}'s header declares {width} x {height} pixels with alpha, more than this "
                                 f"machine's {memory / 1024**3:.0f} GB of memory holds as float32: if the file is "
                                 "what it should be, save a smaller region; a small file declaring this is damaged")
            return sitk.GetImageFromArray(np.asarray(im.getchannel("L")))
    except InputError:  # (a ValueError) the size refusal above
        raise
    except (ImportError, OSError, ValueError):  # ValueError: e.g. a damaged chunk; ITK's reason is said then
        return None


@contextlib.contextmanager
def _pillow_unguarded():
    """Pillow with its decompression-bomb guard off (and its warning hidden) inside: a large slide the
    user asked for, or only its tags, not a bomb; Image.MAX_IMAGE_PIXELS as it was after."""
    import warnings

    from PIL import Image

    guard = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield Image
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def _tiff_grey_page(p: Path) -> "TiffPage | None":
    """The page of a TIFF of one grey sample a pixel (white- or black-is-zero), the only page ITK
    reads as the image (a slide's flagged thumbnail is not one), whatever its bits or tiling; None
    for any other file. Such a page is one channel however ITK decodes it: tiled 8-bit and 1-bit ones
    come through libtiff's RGBA reader as 4 equal channels (a grey slide export was costed and
    labelled as colour, 3 times the features; a 1-bit mask refused as a colour image)."""
    if not p.name.lower().endswith((".tif", ".tiff")):
        return None
    pages = _image_pages(p)
    if len(pages) == 1 and pages[0].samples == 1 and pages[0].photometric in (0, 1):
        return pages[0]
    return None


def _image_pages(p: Path) -> "list[TiffPage]":
    """The pages of the TIFF ``p`` (known by its content) that ITK reads as the image, up to 8: a
    slide's flagged pages (reduced resolution, masks) are not; [] for any other file."""
    return [page for page in (tiff_pages(p, most=8) or []) if not page.flagged]


def _check_grey_channels(p: Path, most: int, pages_at_least: int = 1) -> None:
    """InputError for a TIFF (known by its content: ITK reads one named .btf too) whose page ITK reads
    stores more than ``most`` grey samples a pixel (photometric white- or black-is-zero, as tagged: a
    page without the tag is read by libtiff's guess, colour for 3 or more samples). ITK reads such a
    page as one grey channel with the samples interleaved into its rows (values scrambled: cells were
    labelled at F1 0.03 against 0.86 on the same pixels saved as grey, exit 0), or, stored plane after
    plane, as colour. 2D images read two samples faithfully (grey + alpha, ``_faithful_tiff``), so
    ``most`` is 2 there and 1 for volumes, which check files of ``pages_at_least`` 2 pages (one page
    is refused as 2D, which says what is wrong)."""
    pages = _image_pages(p)
    page = pages[0] if len(pages) >= pages_at_least else None
    if page is not None and page.samples > most and page.photometric in (0, 1) and page.photometric_tagged:
        raise InputError(f"{p.name} stores {page.samples} grey channels a pixel (channels of a microscope, or grey "
                         "and alpha, not colour), which cannot be read here as one image: save the channel you mean "
                         "as a grey image of its own (e.g. Fiji: Image > Color > Split Channels, then File > Save "
                         "As > Tiff)")


def _tiff_layout(p: Path) -> tuple[int, int, bool, int] | None:
    """A TIFF's (samples per pixel, bits per sample, tiled, pages: 1, or 2 for two or more) from its
    first page's tags (``tiff_pages``), without decoding the pixels; None for any other file (named
    other than .tif or .tiff) or one whose tags cannot be read."""
    if not p.name.lower().endswith((".tif", ".tiff")):
        return None
    # the pages ITK reads as the image's: a slide export's flagged thumbnail is not one (a 16-bit tiled grey
    # image with one was taken for a stack, left to ITK's 8-bit reader and read as colour, its values / 256)
    pages = _image_pages(p) or tiff_pages(p, most=2)
    if not pages:
        return None
    first = pages[0]
    return first.samples, first.bits, first.tiled, min(len(pages), 2)


@dataclass(frozen=True)
class TiffPage:
    """The tags of one TIFF page (image file directory) that decide how ITK reads it."""

    columns: int
    rows: int
    subfile_type: int | None  # NewSubfileType (tag 254), None when the page has none
    samples: int = 1
    bits: int = 1  # of the first sample
    sample_format: int = 1  # 1 unsigned, 2 signed, 3 float
    planar: int = 1  # 1 samples interleaved, 2 stored plane after plane
    tiled: bool = False
    photometric: int = 1  # 0 white is zero, 1 black is zero (grey), 2 RGB, 3 palette, ...
    photometric_tagged: bool = True  # False: the page has no PhotometricInterpretation (1 is then a guess)

    @property
    def flagged(self) -> bool:
        """Marked a reduced-resolution image or a mask (NewSubfileType bits 0 and 2): ITK skips it."""
        return bool((self.subfile_type or 0) & 5)


TIFF_MOST_PAGES = 65535  # ITK's TIFF reader counts pages in 16 bits: a file with more is misread
TIFF_MOST_ENTRIES = 4096  # tags a page may have: libtiff (ITK) and tifffile refuse a page with more
_TIFF_TYPES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_TIFF_TAGS = (254, 255, 256, 257, 258, 262, 277, 284, 322, 339)  # the tags a TiffPage holds (255: old SubfileType)


def tiff_pages(p: Path, most: int | None = None) -> list[TiffPage] | None:
    """The pages of a TIFF (classic or BigTIFF, known by its content: ITK reads a TIFF named .btf,
    .ndpi or .dat as one too) from their tags, at most ``most`` (TIFF_MOST_PAGES + 1 unless given:
    enough to know a file has too many). The chain of image file directories is walked here,
    reading a few bytes per page (65 536 pages in about 0.6 s; tifffile parses every tag of every
    page, about 6 s for 100 000, and Pillow's page count reads the pages too, 94 s), so that every
    page ITK would read is checked. None for any other file (a DICOM file with a TIFF preamble is
    none) or when the first page's tags cannot be read; a damaged chain ends the list where it
    breaks (or loops), as a page of more than TIFF_MOST_ENTRIES tags does (libtiff refuses it)."""
    most = TIFF_MOST_PAGES + 1 if most is None else most
    try:
        fh = open(p, "rb")
    except OSError:
        return None
    with fh:
        try:
            head = fh.read(132)
            size = os.fstat(fh.fileno()).st_size
        except OSError:
            return None
        if head[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") or head[128:132] == b"DICM":
            return None
        end = "<" if head[:2] == b"II" else ">"
        big = head[2:4] in (b"+\x00", b"\x00+")
        if len(head) < (16 if big else 8):
            return None
        word = "Q" if big else "I"  # offsets and counts are of the layout's size
        offset = struct.unpack_from(end + word, head, 8 if big else 4)[0]
        entries = np.dtype([("tag", end + "u2"), ("type", end + "u2"), ("count", end + ("u8" if big else "u4")),
                            ("value", f"V{8 if big else 4}")])  # an entry of the page's table of tags
        pages: list[TiffPage] = []
        seen = set()
        while offset and offset not in seen and len(pages) < most:
            seen.add(offset)
            try:
                page = _tiff_page(fh, offset, end, big, entries, size)
            except (OSError, struct.error, ValueError, OverflowError):
                page = None
            if page is None:
                break
            tags, offset = page
            pages.append(tags)
        return pages or None


def _tiff_page(fh, offset: int, end: str, big: bool, entries: np.dtype, size: int):
    """(TiffPage, the next page's offset) of the image file directory at ``offset``; None where it
    cannot be read (past the file's end, more than TIFF_MOST_ENTRIES tags, no width or height). A
    value stored past the file's end is taken as absent."""
    count_size, width = (8, 8) if big else (2, 4)  # of the tag count, and of an offset or value field
    if offset + count_size > size:
        return None
    fh.seek(offset)
    n = struct.unpack(end + ("Q" if big else "H"), fh.read(count_size))[0]
    if n > TIFF_MOST_ENTRIES or offset + count_size + n * entries.itemsize + width > size:
        return None
    block = fh.read(n * entries.itemsize + width)
    table = np.frombuffer(block, entries, count=n)
    tags = {}
    for k in np.flatnonzero(np.isin(table["tag"], _TIFF_TAGS)):  # a few of the page's entries, in order
        tag, kind, count = int(table["tag"][k]), int(table["type"][k]), int(table["count"][k])
        if kind not in _TIFF_TYPES or tag in tags or count < 1:
            continue
        value_size = struct.calcsize(_TIFF_TYPES[kind])
        field = table["value"][k].tobytes()
        if count * value_size <= width:  # the first value, where it is stored: in the entry
            raw = field[:value_size]
        else:  # or elsewhere in the file
            where = struct.unpack(end + ("Q" if big else "I"), field)[0]
            if where + value_size > size:
                continue
            fh.seek(where)
            raw = fh.read(value_size)
        tags[tag] = int(struct.unpack(end + _TIFF_TYPES[kind], raw)[0])
    following = struct.unpack_from(end + ("Q" if big else "I"), block, n * entries.itemsize)[0]
    if not tags.get(256) or not tags.get(257):
        return None
    subfile_type = tags.get(254)
    if subfile_type is None and 255 in tags:  # the old SubfileType, as libtiff reads it: 2 reduced, 3 a page
        subfile_type = {2: 1, 3: 2}.get(tags[255])
    return TiffPage(columns=tags[256], rows=tags[257], subfile_type=subfile_type, samples=tags.get(277, 1),
                    bits=tags.get(258, 1), sample_format=tags.get(339, 1), planar=tags.get(284, 1),
                    tiled=322 in tags, photometric=tags.get(262, 1), photometric_tagged=262 in tags), following


def _tiff_page_sizes(p: Path) -> list[tuple[int, int]] | None:
    """The (columns, rows) of the pages ITK reads as a TIFF's slices (``tiff_pages`` not flagged)."""
    pages = tiff_pages(p)
    return None if pages is None else [(page.columns, page.rows) for page in pages if not page.flagged]


def _check_not_pyramid(p: Path, volume: bool = False) -> None:
    """Refuse, before ITK reads it, a TIFF that ITK would misread or crash on. ITK takes a TIFF's
    size and pixel layout from its first page and reads as slices the pages whose NewSubfileType is
    0 (when any page says so; else every page not flagged as a reduced image or a mask), each at
    the place its page number gives (flagged ones counted), and counts pages in 16 bits. So:
    a whole-slide (pyramidal) TIFF or SVS, whose levels, thumbnail and label images are pages of
    different sizes, crashed the process (a segmentation fault: a smaller page first, or an Aperio
    thumbnail after a tiled full-resolution level) or was cropped to the first page's size without
    a word; a flagged first page (a preview) was read instead of the image, or crashed a volume (a
    preview between slices, as a Zeiss LSM stores them); pages of which some but not all say
    NewSubfileType 0 crashed it (pages appended to a stack by another program); pages storing
    their pixels differently (8 and 16 bits, grey and colour) gave those slices wrong values; a
    tiled stack was read as colour; and past 65 535 pages the count wrapped (100 000 pages read as
    34 464 slices). ITK is given a TIFF only when its first page is unflagged, its flagged pages
    all come last, the rest share one size and pixel layout, and it has at most 65 535 pages. Every
    page is looked at (``tiff_pages``), as a 2D image and as a volume (``volume``)."""
    pages = tiff_pages(p)
    if not pages or len(pages) == 1:  # one page, flagged or not, reads as it is
        return
    if len(pages) > TIFF_MOST_PAGES:
        raise InputError(f"{p.name} has more than {TIFF_MOST_PAGES:,} pages, more than the TIFF reader can count (it "
                         "would read a wrong number of slices); save the stack as one NRRD, NIfTI or MHA file (Fiji: "
                         "File > Save As > Nrrd) or split it into stacks of fewer pages")
    images = [page for page in pages if not page.flagged]
    sizes = [(page.columns, page.rows) for page in images]
    if len(set(sizes)) > 1:
        raise _pyramid_error(p, sizes, volume)
    flags = [page.flagged for page in pages]
    if all(flags):  # every page flagged: read as its first page, as before
        return
    if flags[0] or (True in flags and False in flags[flags.index(True):]):
        where = "the first page" if flags[0] else "a page between its images"
        raise InputError(f"{p.name}: {where} is a reduced-resolution preview or a mask (NewSubfileType), which the "
                         "TIFF reader cannot skip there; save the image (or the slices) without previews or mask "
                         "pages, e.g. with Fiji (File > Save As > Tiff) or `tifffile`, and give that file")
    if len(images) < 2:
        return
    save_again = ("save the slices again as one stack (Fiji: File > Save As > Tiff; or tifffile) or as one NRRD, NIfTI "
                  "or MHA file, and give that file")
    marked = [page.subfile_type == 0 for page in images]
    if any(marked) and not all(marked):
        raise InputError(f"{p.name}: its pages are marked inconsistently ({sum(marked)} of {len(images)} carry "
                         "NewSubfileType 0, the others not), which crashes the TIFF reader (pages added to a stack by "
                         f"another program?); {save_again}")
    layouts = {(page.samples, page.bits, page.sample_format, page.planar if page.samples > 1 else 1, page.tiled)
               for page in images}
    if len(layouts) > 1:
        described = "; ".join(_tiff_layout_words(*layout) for layout in sorted(layouts)[:4])
        raise InputError(f"{p.name}: its pages store their pixels differently ({described}), and the TIFF reader "
                         f"reads every page as the first one is stored (the other slices' values would be wrong); "
                         f"{save_again}")
    if images[0].tiled and volume:  # (as a 2D image, a stack is refused as 3D with what to do)
        raise InputError(f"{p.name} is a tiled TIFF of {len(images)} pages, which the TIFF reader reads as colour "
                         f"(red, green, blue, alpha), not as the values stored; {save_again}")


def _tiff_layout_words(samples: int, bits: int, sample_format: int, planar: int, tiled: bool) -> str:
    """A page layout in words: "1 sample of 16-bit unsigned integers, tiled"."""
    kind = {2: "signed integers", 3: "floats"}.get(sample_format, "unsigned integers")
    words = f"{samples} sample{'s' if samples != 1 else ''} of {bits}-bit {kind}"
    return words + (", planes apart" if planar == 2 else "") + (", tiled" if tiled else "")


def _pyramid_error(p: Path, sizes: list[tuple[int, int]], volume: bool = False) -> InputError:
    """What to do with a TIFF whose pages are images of different ``sizes`` (a whole-slide image)."""
    (w, h) = max(sizes, key=lambda wh: wh[0] * wh[1])
    distinct = list(dict.fromkeys(sizes))  # in the order the pages come
    shown = ", ".join(f"{a:,} x {b:,}" for a, b in distinct[:4]) + (", ..." if len(distinct) > 4 else "")
    pages = f"its pages are images of different sizes ({shown} px), the largest {w:,} x {h:,} px"
    if volume:
        return InputError(f"{p.name} is no volume: {pages} (a whole-slide image?); a volume's slices all have one "
                          "size: give a NIfTI, NRRD, MHA or DICOM volume, or label a 2D region of a slide with "
                          "`pamsegment label-cells` or `label-images`")
    return InputError(f"{p.name} is a whole-slide (pyramidal) image: {pages}; PAMSegment reads one plain 2D image, "
                      "so export the region to label from the full-resolution level as a TIFF or PNG (QuPath: "
                      "File > Export images; or OpenSlide, `vips crop`)")


def _tiff_pixels(p: Path) -> np.ndarray | None:
    """A single-page TIFF's pixels as (rows, columns[, samples]) with their own bits: tifffile when it
    can decode them (some compressions need imagecodecs), else Pillow; None if neither can."""
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            page = tif.pages[0]
            arr = page.asarray()
            if arr.ndim == 3 and page.samplesperpixel > 1 and arr.shape[0] == page.samplesperpixel \
                    and page.planarconfig == 2:  # samples stored plane after plane
                arr = np.moveaxis(arr, 0, -1)
            return arr
    except Exception:  # noqa: BLE001 - not installed, or a compression it has no codec for: try Pillow
        pass
    try:
        with _pillow_unguarded() as Image, Image.open(p) as im:  # ITK has read this file already: not a bomb
            return np.asarray(im.getchannel("L") if im.mode in ("LA", "La") else im)
    except (ImportError, OSError, ValueError):
        return None


def _faithful_tiff(p: Path, image: sitk.Image, layout: tuple[int, int, bool, int]) -> sitk.Image:
    """``image`` as ITK read the TIFF ``p``, or, in the two cases where ITK loses the values, the
    TIFF read again: a tiled TIFF of more than 8 bits per sample (ITK falls back to an 8-bit RGBA
    reader: a 16-bit slide export loses its values) and a grey + alpha (two-sample) TIFF (ITK
    interleaves the two samples into one grey row). Multi-page TIFFs are left to ITK (a stack is a
    3D image, refused as such). ``layout``: ``_tiff_layout(p)``. InputError if such a file cannot be
    read faithfully here."""
    samples, bits, tiled, pages = layout
    page = _tiff_grey_page(p) if image.GetNumberOfComponentsPerPixel() in (3, 4) else None
    if page is not None and page.bits <= 8 and (page.tiled or page.bits == 1):  # through the RGBA reader
        grey = sitk.VectorIndexSelectionCast(image, 0)  # its grey, once (R = G = B; alpha all opaque)
        if page.photometric == 0:  # white-is-zero, which the RGBA reader shows inverted: the values as
            grey = 255 - grey  # stored, as ITK reads an untiled one (a 1-bit mask: its 1 bits 255)
        if page.sample_format == 2 and page.bits == 8:  # signed: -125 was read as 131
            values = sitk.GetArrayFromImage(grey).view(np.int8)
            signed = sitk.GetImageFromArray(values)
            signed.CopyInformation(grey)
            grey = signed
        return grey
    itk_bits = 8 * np.dtype(sitk.GetArrayViewFromImage(image).dtype).itemsize
    # tiled, or samples stored plane after plane (tifffile's default for a (3, H, W) array): ITK's
    # 8-bit fallback reader divides the values by 256 (a dim 12-bit image came out as 3 grey levels)
    lossy_fallback = bits > 8 and itk_bits == 8
    interleaved = samples == 2 and image.GetNumberOfComponentsPerPixel() == 1
    if pages != 1 or not (lossy_fallback or interleaved):
        return image
    arr = _tiff_pixels(p)
    if arr is None or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] != samples):
        kind = "tiled TIFF" if tiled else "TIFF"
        raise InputError(f"{p.name} is a {kind} of {samples} sample(s) x {bits} bits per pixel "
                         f"that ITK reads as {image.GetNumberOfComponentsPerPixel()} x {itk_bits} bits (values would "
                         "be lost); install tifffile and imagecodecs (pip install tifffile imagecodecs) or save it "
                         "as an untiled TIFF or PNG")
    if arr.ndim == 3 and samples == 2:  # grey + alpha (or two channels): the first, as for PNG
        arr = arr[..., 0]
    out = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=arr.ndim == 3)
    if image.GetDimension() == 2 and image.GetSize() == out.GetSize():
        out.CopyInformation(image)  # ITK's pixel size from the resolution tags
    return out


def _read_2d(path: PathLike, what: str) -> tuple[sitk.Image, sitk.Image]:
    """(the 2D image, the image as read: a one-slice 3D file keeps its 3D geometry there)."""
    p = Path(path)
    if not _exists(p):
        raise InputError(f"{p} does not exist; check the path")
    if p.is_dir():
        raise InputError(f"{p} is a folder; give an image file ({', '.join(IMAGE_2D_EXTENSIONS)})")
    _check_not_pyramid(p)
    _check_declared_size(p)
    _check_grey_channels(p, most=2)
    try:
        layout = _tiff_layout(p)
        if layout is not None:  # its fallback warning: _faithful_tiff checks what it read
            with _itk_warnings_hidden():
                image = _faithful_tiff(p, sitk.ReadImage(_itk_path(p)), layout)
        else:
            image = sitk.ReadImage(_itk_path(p))
    except RuntimeError as error:
        image = _read_png_with_pil(p)  # grey + alpha PNGs, which ITK cannot read
        if image is None and layout is not None and layout[3] == 1:  # a TIFF ITK cannot read (64-bit floats)
            arr = _tiff_pixels(p)
            if arr is not None and arr.ndim in (2, 3) and np.issubdtype(arr.dtype, np.number):
                image = sitk.GetImageFromArray(np.ascontiguousarray(arr), isVector=arr.ndim == 3)
        if image is None:
            known = p.name.lower().endswith(tuple(IMAGE_2D_EXTENSIONS))
            reason = _itk_reason(error).lower()
            other = (_named_as_another_kind(p) if "unable to determine imageio reader" in reason
                     or "could not create io object" in reason else None)  # (not for a missing data file)
            if other:
                raise InputError(f"cannot read {p}: {other}") from None
            raise InputError(f"cannot read {p} as an image ({_itk_reason(error)}); "
                             + ("is the file damaged? copy or export it again" if known else
                                f"expected {', '.join(IMAGE_2D_EXTENSIONS)}")) from None
    size = image.GetSize()
    original = image
    if image.GetDimension() == 3 and 1 in size:
        # a one-slice volume: an axial slice (the usual one-slice file), or a coronal or sagittal one
        # (a slice saved from a volume in that plane: refused before, and propagate refused it too)
        flat = _flat_axis(size)
        image = sitk.Extract(image, [0 if a == flat else n for a, n in enumerate(size)], [0, 0, 0])
    elif image.GetDimension() != 2:
        pages = " (a TIFF of several pages: channels, or a stack?)" if layout is not None else ""
        raise InputError(f"{p.name} is a {image.GetDimension()}D image ({_fmt_size(size)}){pages}, not a 2D {what}; "
                         + ("save the channel or plane to label as a file of its own; " if layout is not None else "")
                         + "for a volume use `pamsegment propagate`")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InputError(f"{p.name} has complex pixels; a 2D {what} needs real grey values")
    return image, original


def plane_name(direction: Sequence[float], axis: int) -> str:
    """Anatomical name of the slices perpendicular to array ``axis`` (k, j, i order) of an image
    whose ``direction`` (row-major 3 x 3, columns the i, j, k directions, LPS or RAS alike) is
    given: "axial" when their normal points mostly superior-inferior, "coronal", "sagittal", or
    "oblique" more than ~25 degrees off every anatomical plane."""
    normal = np.asarray(direction, dtype=float).reshape(3, 3)[:, 2 - int(axis)]  # array axis 0 is k: column 2
    norm = float(np.linalg.norm(normal))
    if norm == 0:
        return "oblique"
    normal = np.abs(normal) / norm
    dominant = int(np.argmax(normal))
    if normal[dominant] < np.cos(np.deg2rad(25)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[dominant]  # normal along x (L-R), y (P-A) or z (I-S)


def _flat_axis(size) -> int:
    """The ITK axis (0 = i, 1 = j, 2 = k) of a one-slice 3D image's single slice: k when it is 1
    (an axial slice), else the last axis of size 1."""
    return 2 if size[2] == 1 else max(a for a, n in enumerate(size) if n == 1)


def float32_values(arr: np.ndarray, precision: bool = False) -> tuple[np.ndarray, bool]:
    """``arr`` as float32, and whether it was rescaled: finite float64 values that float32 cannot hold
    (beyond 1e30 or under 1e-37 in size: inf or 0 and numpy's warnings in the cast) are rescaled to
    0-1 in float64 first, and with ``precision`` also values far from 0 varying by under 1e-5 of their
    size (1e6 + 0.01 x signal: all one value in float32; label-cells, which learns from the values
    themselves); a constant beyond float32's range becomes 0. Values float32 holds are left as they
    are (with --no-normalize a set keeps its shared scale)."""
    if arr.dtype.kind == "f" and arr.itemsize > 4 and arr.size and np.isfinite(arr).all():
        low, high = float(np.min(arr)), float(np.max(arr))
        half, size = high / 2 - low / 2, max(abs(low), abs(high))  # (halved: high - low may overflow)
        if half == 0 and size > 1e30:
            return np.zeros(arr.shape, np.float32), True
        if half > 0 and (size > 1e30 or size < 1e-37 or (precision and (size < 1e-30 or half < 1e-5 * size))):
            return ((arr / 2 - low / 2) / half).astype(np.float32), True
    return arr.astype(np.float32), False


def read_image_2d(path: PathLike, keep_colour: bool = False, say: Callable[[str], None] | None = None,
                  precision: bool | None = None, exif: bool = True) -> tuple[np.ndarray, sitk.Image]:
    """A 2D image (PNG, JPEG, TIFF, BMP, a single DICOM file, 2D NIfTI/NRRD/MHA) as a float32
    (rows, columns) array of grey values, and the SimpleITK image (its geometry, for writing a
    mask; a one-slice 3D file, e.g. a DICOM file, keeps its 3D position and orientation there).
    Colour images become grey (BT.601 luma of the first three channels; alpha is ignored), or
    with ``keep_colour`` stay (rows, columns, 3). ``say``: told when an alpha channel that is
    not opaque everywhere is left out (transparency does not mark background), or values are
    rescaled (``float32_values``, with its ``precision``: by default with ``keep_colour``, as
    label-cells reads its images, so that its Python example and the command agree), and when the
    file carries an EXIF orientation (``exif_note``; not with ``exif`` False: a set says it once).
    A grey TIFF stored white-is-zero is read as viewers show it (inverted from the values stored)."""
    image, original = _read_2d(path, "image")
    if exif:
        _exif_note(path, say)
    arr = sitk.GetArrayFromImage(image)
    ncomp = image.GetNumberOfComponentsPerPixel()
    page = _tiff_grey_page(Path(path)) if ncomp == 1 and arr.dtype.kind == "u" else None
    if page is not None and page.photometric == 0:  # white-is-zero (ImageJ's inverted LUT), read as stored:
        top = 255 if page.bits == 1 else min(2 ** page.bits - 1, int(np.iinfo(arr.dtype).max))  # shown as viewers
        arr = top - np.minimum(arr, top)  # show it (a 1-bit page's 1 bits were read as 255)
    alpha, second = None, ncomp == 2
    if say is not None and ncomp in (2, 4) and np.issubdtype(arr.dtype, np.integer):
        alpha = arr[..., -1]
    elif say is not None and ncomp == 1:  # a grey + alpha PNG (read through Pillow without its alpha)
        alpha = _png_alpha(Path(path))
        if alpha is None:  # a two-sample TIFF (read through tifffile, its first sample kept)
            alpha = _tiff_second_sample(Path(path))
            second = alpha is not None
    if alpha is not None and np.issubdtype(alpha.dtype, np.integer):
        see_through = float(np.mean(alpha < np.iinfo(alpha.dtype).max))
        if see_through > 0:  # (a 2-channel image may be two stains, not grey + alpha: said as a question)
            which = "its second channel (alpha?)" if second else "its alpha (transparency) channel"
            share = ("no pixel is opaque" if see_through == 1 else
                     f"{min(100 * see_through, 99.9):.3g} % of the pixels are not opaque")
            say(f"{Path(path).name}: {which} is left out ({share}): the pixels are used as stored; to leave a "
                "region out, mark it as background")
    if ncomp > 1:
        if ncomp == 2:  # grey + alpha
            arr = arr[..., 0]
        elif keep_colour:
            arr = arr[..., :3]
        else:
            wide = np.float64 if arr.dtype.itemsize > 4 else np.float32  # (float64 colour beyond float32's range)
            arr = np.tensordot(arr[..., :3].astype(wide), np.asarray(_LUMA, wide), axes=([-1], [0]))
    bad = int(np.count_nonzero(~np.isfinite(arr))) if arr.dtype.kind == "f" else 0  # in the file's own type
    if bad:
        raise InputError(f"{Path(path).name} contains {bad} NaN/inf pixels; replace them with a finite value first")
    # (finite float64 beyond float32 became "NaN/inf pixels" the file has not; ``precision``: label-cells, see
    # float32_values)
    arr, rescaled = float32_values(arr, keep_colour if precision is None else precision)
    if rescaled and say is not None:
        say(f"{Path(path).name} holds values float32 cannot (or can only as one value); they were rescaled to 0-1")
    return arr, original


_EXIF_TURNS = {2: "mirrored left to right", 3: "turned half round", 4: "mirrored top to bottom",
               5: "mirrored along its diagonal", 6: "turned a quarter clockwise",
               7: "turned a quarter and mirrored", 8: "turned a quarter anticlockwise"}


def exif_orientation(path: PathLike) -> int | None:
    """A photo's EXIF Orientation (tag 274) when it asks viewers for a turn or a mirror (2-8): phones
    store a photo as the sensor took it and this tag for how to show it. None when it is 1, absent
    or unreadable, and for files other than JPEG, PNG and TIFF. The pixels are used as stored."""
    p = Path(path)
    if not p.name.lower().endswith((".jpg", ".jpeg", ".png", ".tif", ".tiff")):
        return None
    try:
        with _pillow_unguarded() as Image, Image.open(p) as im:  # (the header only)
            value = im.getexif().get(274)
    except (ImportError, OSError, ValueError, SyntaxError, struct.error):
        return None
    return int(value) if isinstance(value, int) and 2 <= value <= 8 else None


def exif_note(paths: Sequence[PathLike]) -> str | None:
    """What to tell a user of ``paths`` (images or masks) that carry an EXIF orientation
    (``exif_orientation``), in one note; None if none does."""
    turned = [(Path(p).name, t) for p in paths for t in [exif_orientation(p)] if t is not None]
    if not turned:
        return None
    if len(turned) == 1:
        name, turn = turned[0]
        who, shown_as, them, pixels = (f"{name} carries an EXIF orientation ({turn})", f"show it {_EXIF_TURNS[turn]}",
                                       "it", "its pixels")
    else:
        listed = ", ".join(name for name, _ in turned[:3]) + (" ..." if len(turned) > 3 else "")
        turns = sorted({t for _, t in turned})
        who = f"{len(turned)} files carry an EXIF orientation ({', '.join(map(str, turns))}: {listed})"
        shown_as, them, pixels = "show them turned or mirrored", "them", "their pixels"
    return (f"{who}: phones, web browsers and most photo viewers {shown_as}, but {pixels} are used as stored (as "
            f"Fiji, napari and ITK show {them}); a mask drawn on a photo as such a viewer shows it does not line up "
            "with it: draw masks on the images as stored, or save the photos with the turn applied (without the tag)")


def _exif_note(path: PathLike, say: Callable[[str], None] | None) -> None:
    """Tell ``say`` (if given) that ``path`` carries an EXIF orientation (``exif_note``)."""
    text = exif_note([path]) if say is not None else None
    if text is not None:
        say(text)


def _one_bit(path: Path) -> bool:
    """A 1-bit grey PNG or TIFF (a black-and-white mask), which is read as 0 and 255."""
    name = path.name.lower()
    if name.endswith(".png"):
        try:
            with open(path, "rb") as f:
                head = f.read(26)
        except OSError:
            return False
        return head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and head[24:26] == b"\x01\x00"
    page = _tiff_grey_page(path) if name.endswith((".tif", ".tiff")) else None
    return page is not None and page.bits == 1


def _png_alpha(path: Path) -> np.ndarray | None:
    """A grey + alpha PNG's alpha channel (which the grey reading drops); None for any other file."""
    if not path.name.lower().endswith(".png"):
        return None
    try:
        with _pillow_unguarded() as Image, Image.open(path) as im:
            return np.asarray(im.getchannel("A")) if im.mode in ("LA", "La") else None
    except (ImportError, OSError, ValueError, SyntaxError, struct.error):
        return None


def _tiff_second_sample(path: Path) -> np.ndarray | None:
    """A two-sample grey TIFF's second sample (grey + alpha, or a second channel), which the reading
    leaves out (``_faithful_tiff``); None for any other file, or where its pixels cannot be decoded."""
    layout = _tiff_layout(path)
    if layout is None or layout[0] != 2 or layout[3] != 1:
        return None
    arr = _tiff_pixels(path)
    return arr[..., 1] if arr is not None and arr.ndim == 3 and arr.shape[-1] == 2 else None


def _transparent_as_background(arr: np.ndarray, alpha: np.ndarray | None, name: str,
                               say: Callable[[str], None] | None) -> np.ndarray:
    """A mask's fully transparent pixels (``alpha`` 0) as background: labels drawn on a transparent
    layer leave the layer's grey (often white) under it, which no viewer shows."""
    if alpha is None or alpha.shape != arr.shape:
        return arr
    if arr.size and not arr.any() and alpha.min() != alpha.max():  # no label at all, the alpha marking pixels
        marked = int(np.count_nonzero(alpha != alpha.min()))
        raise InputError(f"{name} holds no label (0 everywhere), but its alpha (transparency) channel marks {marked:,} "
                         "pixels: if the drawing is in the alpha channel, save it as grey values (0 = background, 1, "
                         "2 ... = labels); for an image where the object is absent, save the mask without an alpha "
                         "channel")
    hidden = (alpha == 0) & (arr != 0)
    count = int(np.count_nonzero(hidden))
    if count:
        arr = arr.copy()
        arr[hidden] = 0
        if say is not None:
            say(f"{name}: {count:,} fully transparent pixels hold label values, which no viewer shows; they are read "
                "as background (0)")
    return arr


def _grey_of_colour_mask(image: sitk.Image, name: str, say: Callable[[str], None] | None) -> np.ndarray:
    """A mask read as colour whose red, green and blue are equal everywhere (a grey BMP, which ITK
    reads as colour; a grey mask saved as RGB or RGBA) as its grey labels, transparent pixels as
    background; InputError for a real colour image."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or not (
            np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2])):
        raise InputError(f"{name} is a colour image; save the mask as a grey-level label image "
                         "(0 = background, 1, 2 ... = labels)")
    grey = sitk.GetImageFromArray(np.array(arr[..., 0]))
    labels = sitk.GetArrayFromImage(_as_integer_labels(grey, name))
    return _transparent_as_background(labels, np.array(arr[..., 3]) if arr.shape[-1] == 4 else None, name, say)


def _palette_indices(path: Path) -> np.ndarray | None:
    """An indexed-colour (palette) PNG's, TIFF's or BMP's pixel indices, which annotation tools use as
    labels (SimpleITK expands them to colours); None for any other file."""
    found = _palette(path)
    return None if found is None else found[0]


VOC_VOID_COLOUR = (224, 224, 192)  # PASCAL VOC's palette entry 255: "void" (unlabelled borders)


def _palette(path: Path) -> tuple[np.ndarray, tuple[int, ...]] | None:
    """``_palette_indices`` and the palette's colour of index 255 (() if it has none)."""
    if not path.name.lower().endswith((".png", ".tif", ".tiff", ".bmp")):
        return None
    try:
        with _pillow_unguarded() as Image, Image.open(path) as im:  # a mask of a large slide: not a bomb
            if im.mode != "P":
                return None
            colours = im.getpalette() or []
            return np.asarray(im), tuple(colours[3 * 255:3 * 256])
    # (a file ITK reads and Pillow cannot, e.g. a 64-bit integer TIFF: no palette; it raised out, a re-review)
    except (ImportError, OSError, ValueError, SyntaxError, struct.error):
        return None


def _edge_labels(arr: np.ndarray, present: np.ndarray, enough: int | None = None, fewest: int = 5) -> list[int]:
    """Labels whose pixels nearly all touch another label's: the grey steps of an anti-aliased or
    lossy-compressed mask's edges, not structures. Each label is looked at within its bounding
    box (a cell-example mask may hold many labels on a large image). ``present``: ``np.unique(arr)``;
    ``enough``: stop once that many are found; ``fewest``: none looked for below that many labels."""
    from scipy import ndimage

    values = [int(v) for v in present if v > 0]
    if len(values) < fewest:  # read_labelmap_2d refuses only masks with more grey values than that
        return []
    if values[-1] > 4 * len(values) + 65536:  # find_objects keeps a slot per value up to the largest: a label of
        # 4e9 was a MemoryError ("not enough memory" for a 256 px mask); numbered 1.. in value order here instead
        index = np.searchsorted(np.asarray(values, dtype=arr.dtype), arr) + 1  # (in the mask's own type: int64
        # against uint64 compares as float64, which misplaces labels over 2**53)
        index[arr <= 0] = 0
        boxes = ndimage.find_objects(index)
        slot = {v: n for n, v in enumerate(values)}
    else:
        boxes = ndimage.find_objects(arr)  # label v's box at index v - 1 (negative values are skipped)
        slot = {v: v - 1 for v in values}
    out = []
    for v in values:
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in boxes[slot[v]])
        sub = arr[box]
        own = sub == v
        touching = own & ndimage.binary_dilation((sub != v) & (sub != 0))
        if touching.sum() >= 0.8 * own.sum():
            out.append(v)
            if enough is not None and len(out) >= enough:
                break
    return out


AS_DRAWN_HINT = "run again with --as-drawn (Python: as_drawn=True)"


def read_labelmap_2d(path: PathLike, reference: tuple[np.ndarray, sitk.Image] | None = None,
                     say: Callable[[str], None] | None = None, as_drawn: bool = False) -> np.ndarray:
    """A 2D label map (0 = background, 1..65535 = labels) as an integer array; with ``reference``
    (what ``read_image_2d`` returned) its size must match. Palette PNGs give their indices;
    JPEG masks and masks with anti-aliased edges (grey steps between labels) are refused. With 2-4
    labels such steps cannot be told from a drawn rim (an interior/boundary mask): ``say`` gets a
    note naming them. ``as_drawn``: the values are the labels as drawn, whatever they look like (a
    label map whose own thin structures, such as a spine's endplates between body and disc, or a
    dense instance mask, looks like grey steps: refused with no way around it, a trial, session 46);
    neither grey-value refusal nor the note."""
    name = Path(path).name
    if isinstance(reference, np.ndarray) and reference.ndim >= 2:  # the image's array alone: its size is checked
        reference = (reference, None)
    elif reference is not None and not (isinstance(reference, (tuple, list)) and len(reference) == 2
                                        and isinstance(reference[0], np.ndarray) and reference[0].ndim >= 2):
        # (an array's first row made the size check fail and its message raise; a Volume was not subscriptable)
        raise InputError(f"reference must be what read_image_2d returned, (array, image), or the image's array; got "
                         f"{type(reference).__name__}")
    if name.lower().endswith((".jpg", ".jpeg")):
        raise InputError(f"{name} is a JPEG: its compression changes label values along every edge; save the mask "
                         "as PNG or TIFF")
    image, original = _read_2d(path, "mask")
    _exif_note(path, say)
    palette = _palette(Path(path))
    if palette is not None:
        arr = palette[0].astype(np.uint8)
        drawn = np.unique(arr)
        # index 255 coloured as VOC's "void", beside other labels (a grey ramp's 255, a 255th instance: labels)
        if 255 in drawn and np.count_nonzero(drawn) > 1 and palette[1] == VOC_VOID_COLOUR:
            arr[arr == 255] = 0
            if say is not None:
                say(f"{name}: palette index 255 (\"void\" in VOC-style masks: borders and regions left "
                    "unlabelled) is read as background, beside the labels "
                    f"{', '.join(str(int(v)) for v in drawn[(drawn > 0) & (drawn < 255)][:10])}")
    elif image.GetNumberOfComponentsPerPixel() > 1:
        arr = _grey_of_colour_mask(image, name, say)
    else:
        arr = sitk.GetArrayFromImage(_as_integer_labels(image, name))
        arr = _transparent_as_background(arr, _png_alpha(Path(path)), name, say)
        if _one_bit(Path(path)):  # its 1 bits read as 255: label 1, as stored
            arr = (arr != 0).astype(np.uint8)
    present = np.unique(arr)
    n_values = len(present)
    # Beyond 64 values three edge labels are enough to refuse (an image given as a mask has hundreds).
    edges = [] if as_drawn else _edge_labels(arr, present, enough=3 if n_values > 64 else None)
    if n_values > 64 and len(edges) >= 3:  # most likely the image itself, given where the mask goes
        raise InputError(f"{name} has {n_values - 1} grey values and looks like an image, not a label map: was the "
                         "image given in the mask's place? A mask holds 0 = background, 1, 2 ... = labels (an "
                         "anti-aliased mask, saved with smoothing, looks like this too). If it is a dense instance "
                         f"mask whose values are its labels as drawn: {AS_DRAWN_HINT}")
    if len(edges) >= 3 and n_values > 5:  # a ramp of grey steps, not a few thin structures
        raise InputError(f"{name} has {n_values - 1} grey values, {len(edges)} of them only along the "
                         "edges of others: an anti-aliased (smoothed) mask, not a label map; save it without "
                         "smoothing (0 = background, 1, 2 ... = labels), or if its values are the labels as drawn "
                         f"(thin structures of their own, such as a spine's endplates): {AS_DRAWN_HINT}")
    # (a trial, session 35: 0/127/255 was read as two structures)
    if say is not None and 3 <= n_values <= 5 and not as_drawn:
        rims = _edge_labels(arr, present, fewest=2)
        if 0 < len(rims) < n_values - 1:
            them = ", ".join(map(str, rims))
            ones = "labels" if len(rims) > 1 else "label"
            say(f"{name}: {ones} {them} lie{'' if len(rims) > 1 else 's'} only along the edges of another label; "
                "if the mask was resized or saved with smoothing, those are the grey steps of an edge, not "
                "structures (they are labelled as drawn): save it without smoothing (nearest neighbour), one value "
                "per structure")
    if reference is not None and arr.shape != reference[0].shape[:2]:
        rows, cols = reference[0].shape[:2]
        turned = (" (the image's size turned a quarter: drawn on the photo as a viewer showed it turned by its "
                  "EXIF orientation? draw it on the image as stored)" if arr.shape == (cols, rows) else "")
        raise InputError(f"the mask {Path(path).name} is {arr.shape[1]} x {arr.shape[0]} pixels but its image is "
                         f"{cols} x {rows}; draw the mask on that image{turned}")
    if reference is not None and reference[1] is not None:
        _check_same_2d_grid(name, original, reference[1])
    return arr


def has_position(image: sitk.Image) -> bool:
    """Whether the file ``image`` was read from places it in space (NIfTI, NRRD, MetaImage, a DICOM
    file with its image position and orientation), from the metadata ITK's readers leave; PNG,
    TIFF, JPEG and BMP do not (ITK gives them a unit grid at 0), nor a DICOM file without them (a
    secondary capture)."""
    keys = set(image.GetMetaDataKeys())
    reader = image.GetMetaData("ITK_InputFilterName") if "ITK_InputFilterName" in keys else ""
    if keys & {"qform_code", "sform_code"} or any(k.startswith("NRRD_") for k in keys) \
            or reader in ("NrrdImageIO", "MetaImageIO"):  # such a file may keep DICOM tags too: it is placed
        return True
    if any(k.startswith(("0020|", "0008|")) for k in keys):  # DICOM: placed with its position and orientation
        return {"0020|0032", "0020|0037"} <= keys
    return bool(reader)


def in_plane_geometry(image: sitk.Image):
    """(origin, the two in-plane axes as columns, their spacings, the normal and the spacing across,
    or None and 0 for a 2D image) of a 2D image or a one-slice 3D one (its single slice along any
    axis, ``_flat_axis``): what places its pixels, whatever the file's dimension. The axes' order
    is that of the 2D array's columns then rows."""
    size = image.GetSize()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(image.GetDimension(), -1)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    if image.GetDimension() == 2:
        return origin, direction, spacing, None, 0.0
    flat = _flat_axis(size)
    kept = [a for a in range(3) if a != flat]
    return origin, direction[:, kept], spacing[kept], direction[:, flat], float(spacing[flat])


def _check_same_2d_grid(name: str, mask: sitk.Image, image: sitk.Image) -> None:
    """A mask whose file places it in space (NIfTI, NRRD, MetaImage, DICOM) must lie on its image's
    pixels when the image's file does too: one stored flipped (the same physical placement) or placed
    elsewhere was used pixel by pixel, mirrored (Dice 0.79 instead of 1.0) or somewhere else, exit 0.
    Compared in the slice's plane (spacing, axes, origin; for one-slice volumes also how far apart
    the two planes are, within half a slice: the spacing across one slice is arbitrary, ITK gives a
    DICOM file 1 where other tools write its thickness). PNG, TIFF, JPEG and BMP hold no position:
    their size alone is compared (above)."""
    if mask.GetDimension() != image.GetDimension() or not (has_position(mask) and has_position(image)):
        return

    def short(values) -> str:
        return "(" + ", ".join(f"{float(v) + 0.0:.6g}" for v in np.ravel(values)) + ")"

    o_m, axes_m, sp_m, normal_m, across_m = in_plane_geometry(mask)
    o_i, axes_i, sp_i, normal_i, across_i = in_plane_geometry(image)
    diffs = []
    if np.any(np.abs(sp_m - sp_i) > 1e-4 * np.maximum(sp_i, 1e-12)):
        diffs.append(f"pixel spacing {short(sp_m)} vs the image's {short(sp_i)}")
    if np.any(np.abs(axes_m - axes_i) > 1e-4):
        diffs.append(f"axes {short(axes_m.T)} vs the image's {short(axes_i.T)}")
    offset = o_m - o_i
    if np.any(np.abs(axes_i.T @ offset) > 1e-3 * float(min(sp_i))) or (
            normal_i is not None and abs(float(normal_i @ offset)) > max(0.5 * max(across_m, across_i), 1e-3)):
        diffs.append(f"origin {short(o_m)} vs the image's {short(o_i)}")
    if diffs:
        raise InputError(f"the mask {name} is not on its image's grid ({'; '.join(diffs)}): it would be used pixel by "
                         "pixel, flipped or shifted against the image; save it with the image's geometry "
                         "(SimpleITK: mask.CopyInformation(image)), or as a PNG or TIFF of the image's pixels")


def write_labelmap_2d(array: np.ndarray, reference: sitk.Image, path: PathLike) -> Path:
    """Write a 2D label map on ``reference``'s grid (its spacing and origin), as uint8 (uint16 past
    255, uint32 past 65535 where the format holds it), atomically; the format follows the extension (``MASK_2D_EXTENSIONS``; no lossy JPEG)."""
    labels = np.asarray(array)
    size = reference.GetSize()
    # a one-slice 3D reference: its slice's two axes (a coronal or sagittal slice's are not i and j)
    kept = [a for a in range(len(size)) if a != _flat_axis(size)] if len(size) == 3 else [0, 1]
    if labels.shape != tuple(size[a] for a in reversed(kept)):
        raise InputError(f"mask shape {labels.shape} does not match its image {tuple(reversed(size))}")
    hi = int(labels.max()) if labels.size else 0
    if labels.min() < 0 or hi >= 2**32:
        raise InputError("mask labels must be 0 or positive 32-bit numbers")
    if hi > 65535 and Path(path).name.lower().endswith(".png"):
        raise InputError(f"{hi} labels do not fit a PNG file (at most 65535); write .tif, .nrrd or .nii.gz")
    dtype = np.uint8 if hi <= 255 else np.uint16 if hi <= 65535 else np.uint32
    name = Path(path).name.lower()
    if reference.GetDimension() == 3 and name.endswith((".nii", ".nii.gz", ".nrrd", ".mha")):
        # A one-slice volume (a DICOM file, a slice of a scan): the mask lies where its image does.
        image = sitk.GetImageFromArray(np.expand_dims(labels.astype(dtype, copy=False), 2 - _flat_axis(size)))
        image.CopyInformation(reference)
        return _atomic_write(image, path, MASK_2D_EXTENSIONS)
    image = sitk.GetImageFromArray(labels.astype(dtype, copy=False))
    image.SetSpacing([reference.GetSpacing()[a] for a in kept])
    image.SetOrigin([reference.GetOrigin()[a] for a in kept])
    if reference.GetDimension() == 2:
        image.SetDirection(reference.GetDirection())
    return _atomic_write(image, path, MASK_2D_EXTENSIONS)
