"""Synthetic training volumes that teach boundary following, not organ recognition.

`generate_volume(rng)` draws a small 3D volume with 4-10 labelled objects of varied shape
(smooth blobs, lobulated blobs, tubes, non-convex rings/C-shapes/shells, and objects that split
and merge between slices: Y-shaped tubes, tubes that bend back along the slice axis, two blobs
joined by a bridge over part of their extent), plus unlabelled distractors of similar intensity,
textures, partial-volume blur, bias field, Gaussian or Rician noise and a CT-like or MR-like
intensity range.

All geometry is generated in physical space (mm), then sampled on the voxel grid, so a large
slice spacing really squashes the objects along axis 0. Arrays are (k, j, i) = (slice, row,
column) and `spacing` is in the same order. Everything random comes from the `rng` argument, so a
volume is fully determined by the generator state. Cost: roughly 0.1-0.3 s for 48 x 128 x 128 on
one core (smooth noise fields are separable Gaussian-weighted lattices: three small matrix
products instead of a 3D filter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["SyntheticVolume", "generate_volume", "split_merge_slices", "component_counts",
           "KINDS", "SPLIT_MERGE_KINDS", "TUBULAR_KINDS"]

#: Every object kind the generator can draw.
KINDS = ("blob", "noise_blob", "lobulated", "tube", "tube_bent", "c_shape", "torus", "shell",
         "y_tube", "bridged_blobs")
#: Kinds whose 2D cross-sections split into several components on some slices by construction.
SPLIT_MERGE_KINDS = ("y_tube", "bridged_blobs", "tube_bent")
#: Kinds that are swept tubes.
TUBULAR_KINDS = ("tube", "tube_bent", "y_tube", "c_shape")

_MIN_VOXELS = 150
_MIN_SLICES = 3


@dataclass
class SyntheticVolume:
    image: np.ndarray                      # float32 (k, j, i)
    labels: np.ndarray                     # int16 (k, j, i); 0 background, 1..n objects
    spacing: tuple[float, float, float]    # mm, (k, j, i)
    kinds: dict[int, str]                  # label -> kind name (one of KINDS)
    style: str = "CT"                      # "CT" (HU-like range) or "MR" (arbitrary units)
    params: dict = field(default_factory=dict)  # appearance parameters drawn (for inspection)


# ----------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------

class _Canvas:
    """Voxel grid with physical coordinates of voxel centres: x_axis = index * spacing."""

    def __init__(self, shape, spacing):
        self.shape = tuple(int(s) for s in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.extent = np.asarray(self.shape) * self.spacing
        self.axes = [np.arange(n) * s for n, s in zip(self.shape, self.spacing)]

    def box(self, lo, hi):
        """Index slices covering the physical box [lo, hi] (clipped); None if empty."""
        sl = []
        for a in range(3):
            i0 = max(int(np.floor(lo[a] / self.spacing[a])), 0)
            i1 = min(int(np.ceil(hi[a] / self.spacing[a])) + 1, self.shape[a])
            if i1 <= i0:
                return None
            sl.append(slice(i0, i1))
        return tuple(sl)

    def coords(self, sl, center):
        """Open-grid physical coordinates relative to `center` for the region `sl`."""
        z = (self.axes[0][sl[0]] - center[0]).astype(np.float32)[:, None, None]
        y = (self.axes[1][sl[1]] - center[1]).astype(np.float32)[None, :, None]
        x = (self.axes[2][sl[2]] - center[2]).astype(np.float32)[None, None, :]
        return z, y, x

    def empty(self):
        return np.zeros(self.shape, dtype=bool)


def _rotation(rng):
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / (np.linalg.norm(v) + 1e-12)


def _inplane_unit(rng):
    a = rng.uniform(0, 2 * np.pi)
    return np.array([0.0, np.cos(a), np.sin(a)])


def _smooth_field(rng, axes_coords, scale_mm, spacing=None):
    """Unit-variance smooth random field on the grid given by three 1D physical coordinate arrays.

    The field is a Gaussian-weighted sum of i.i.d. normal values on a lattice of pitch `scale_mm`
    (per axis, never finer than the voxel spacing), computed separably with three matrix
    products; every point has variance exactly 1.
    """
    mats = []
    for a, c in enumerate(axes_coords):
        c = np.asarray(c, dtype=np.float64)
        pitch = float(scale_mm)
        if spacing is not None:
            pitch = max(pitch, float(spacing[a]))
        lo, hi = c.min() - 2 * pitch, c.max() + 2 * pitch
        n = max(int(np.ceil((hi - lo) / pitch)) + 1, 2)
        nodes = lo + pitch * np.arange(n)
        w = np.exp(-0.5 * ((c[:, None] - nodes[None, :]) / (0.75 * pitch)) ** 2)
        w /= np.sqrt((w ** 2).sum(axis=1, keepdims=True)) + 1e-12
        mats.append(w.astype(np.float32))
    wz, wy, wx = mats
    coarse = rng.standard_normal((wz.shape[1], wy.shape[1], wx.shape[1])).astype(np.float32)
    f = (wz @ coarse.reshape(wz.shape[1], -1)).reshape(wz.shape[0], wy.shape[1], wx.shape[1])
    f = np.matmul(wy[None], f)          # (K, J, nx)
    f = f @ wx.T                        # (K, J, I)
    return f


def _field_on(rng, canvas, sl, scale_mm):
    return _smooth_field(rng, [canvas.axes[a][sl[a]] for a in range(3)], scale_mm, canvas.spacing)


def _ellipsoid_d2(canvas, sl, center, radii, rot):
    """Squared normalised ellipsoid distance on region sl (1 on the surface)."""
    z, y, x = canvas.coords(sl, center)
    r = rot.astype(np.float32)
    d2 = np.zeros(np.broadcast_shapes(z.shape, y.shape, x.shape), dtype=np.float32)
    for a in range(3):
        u = r[0, a] * z + r[1, a] * y + r[2, a] * x
        d2 += (u / np.float32(radii[a])) ** 2
    return d2


def _paint_spheres(mask, canvas, points, radii):
    """OR into `mask` a sphere of radius radii[n] (mm) at every physical point."""
    for p, r in zip(points, radii):
        sl = canvas.box(p - r, p + r)
        if sl is None:
            continue
        z, y, x = canvas.coords(sl, p)
        mask[sl] |= (z * z + y * y + x * x) <= np.float32(r * r)


def _resample_polyline(points, step):
    """Points along the polyline at arc-length spacing <= step."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(int(np.ceil(s[-1] / step)) + 1, 2)
    t = np.linspace(0, s[-1], n)
    return np.stack([np.interp(t, s, points[:, a]) for a in range(3)], axis=1)


def _random_walk_curve(rng, start, direction, length, curvature, n=60):
    """Smooth persistent random walk in mm starting at `start` heading `direction`."""
    d = _unit(direction)
    step = length / n
    pts = [np.asarray(start, dtype=np.float64)]
    for _ in range(n):
        d = _unit(d + curvature * rng.standard_normal(3))
        pts.append(pts[-1] + step * d)
    pts = np.array(pts)
    pts[1:] = ndimage.gaussian_filter1d(pts, 2.0, axis=0, mode="nearest")[1:]
    return pts


def _varying_radius(rng, n, r0, rel=0.3):
    t = np.linspace(0, 1, n)
    k = rng.integers(1, 4)
    v = np.zeros(n)
    for _ in range(k):
        v += rng.uniform(-1, 1) * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t + rng.uniform(0, 6.3))
    v /= k
    return np.maximum(r0 * (1 + rel * v), 0.6 * r0)


def _tube(mask, canvas, pts, r0, min_r, rng, rel=0.3):
    step = max(0.4 * min(r0, min_r * 2), 0.3)
    pts = _resample_polyline(pts, step)
    radii = np.maximum(_varying_radius(rng, len(pts), r0, rel), min_r)
    _paint_spheres(mask, canvas, pts, radii)


# ----------------------------------------------------------------------------------------------
# object kinds: each returns a full-size boolean mask (may be empty) for centre c (mm)
# ----------------------------------------------------------------------------------------------

def _shape_blob(rng, cv, c, size, min_r):
    radii = size * rng.uniform(0.5, 1.2, 3)
    rot = _rotation(rng)
    rmax = radii.max() * 1.4
    sl = cv.box(c - rmax, c + rmax)
    m = cv.empty()
    if sl is None:
        return m
    d = np.sqrt(_ellipsoid_d2(cv, sl, c, radii, rot))
    f = _field_on(rng, cv, sl, rng.uniform(0.4, 1.0) * radii.mean())
    m[sl] = d + np.float32(rng.uniform(0.05, 0.25)) * f <= 1.0
    return m


def _shape_noise_blob(rng, cv, c, size, min_r):
    radii = size * rng.uniform(0.7, 1.3, 3)
    rot = _rotation(rng)
    rmax = radii.max() * 1.2
    sl = cv.box(c - rmax, c + rmax)
    m = cv.empty()
    if sl is None:
        return m
    d2 = _ellipsoid_d2(cv, sl, c, radii, rot)
    f = _field_on(rng, cv, sl, rng.uniform(0.25, 0.5) * radii.mean())
    m[sl] = (1.0 - d2) + np.float32(rng.uniform(0.4, 0.8)) * f > np.float32(rng.uniform(0.2, 0.5))
    return m


def _shape_lobulated(rng, cv, c, size, min_r):
    m = cv.empty()
    for _ in range(int(rng.integers(3, 8))):
        off = _unit(rng.standard_normal(3)) * size * rng.uniform(0.3, 0.9)
        radii = size * rng.uniform(0.35, 0.75, 3)
        cc = c + off
        rmax = radii.max()
        sl = cv.box(cc - rmax, cc + rmax)
        if sl is None:
            continue
        m[sl] |= _ellipsoid_d2(cv, sl, cc, radii, _rotation(rng)) <= 1.0
    return m


def _shape_tube(rng, cv, c, size, min_r):
    r0 = max(size * rng.uniform(0.12, 0.3), min_r)
    length = size * rng.uniform(4, 9)
    d = _unit(rng.standard_normal(3))
    start = c - 0.5 * length * d
    pts = _random_walk_curve(rng, start, d, length, rng.uniform(0.05, 0.35))
    m = cv.empty()
    _tube(m, cv, pts, r0, min_r, rng)
    return m


def _shape_tube_bent(rng, cv, c, size, min_r):
    """Arch lying in a plane that contains axis 0: both legs appear on the same slices, the
    apex joins them (two components -> one, along k)."""
    r0 = max(size * rng.uniform(0.12, 0.25), min_r)
    h = _inplane_unit(rng)
    half_w = max(size * rng.uniform(0.6, 1.4), 2.5 * r0)      # leg separation / 2
    height = max(size * rng.uniform(1.5, 3.5), 4 * cv.spacing[0] + 2 * r0)
    sign = rng.choice([-1.0, 1.0])
    t = np.linspace(-1, 1, 80)
    wig = 0.15 * half_w * np.sin(np.pi * rng.uniform(0.5, 2) * t + rng.uniform(0, 6.3))
    side = _unit(np.cross(h, [1.0, 0, 0]))
    pts = (c[None, :]
           + (t * half_w)[:, None] * h[None, :]
           + (sign * height * (0.5 - t ** 2))[:, None] * np.array([1.0, 0, 0])[None, :]
           + wig[:, None] * side[None, :])
    m = cv.empty()
    _tube(m, cv, pts, r0, min_r, rng, rel=0.2)
    return m


def _shape_y_tube(rng, cv, c, size, min_r):
    """Y-shaped bifurcating tube whose trunk runs mostly along axis 0."""
    r0 = max(size * rng.uniform(0.12, 0.25), min_r)
    ax = np.array([rng.choice([-1.0, 1.0]), 0, 0])
    d0 = _unit(ax + 0.5 * rng.uniform(-1, 1, 3) * np.array([0, 1, 1]))
    trunk_len = max(size * rng.uniform(1.2, 3.0), 3 * cv.spacing[0])
    start = c - trunk_len * d0
    trunk = _random_walk_curve(rng, start, d0, trunk_len, 0.05, n=30)
    fork = trunk[-1]
    perp = _unit(np.cross(d0, _inplane_unit(rng)))
    theta = np.deg2rad(rng.uniform(25, 50))
    m = cv.empty()
    _tube(m, cv, trunk, r0, min_r, rng, rel=0.15)
    for s in (-1.0, 1.0):
        db = _unit(np.cos(theta) * d0 + s * np.sin(theta) * perp)
        blen = max(size * rng.uniform(1.5, 3.5), 4 * cv.spacing[0] + 3 * r0)
        br = _random_walk_curve(rng, fork, db, blen, 0.08, n=30)
        _tube(m, cv, br, max(r0 * rng.uniform(0.65, 0.9), min_r), min_r, rng, rel=0.15)
    return m


def _ring_points(rng, c, radius, arc):
    rot = _rotation(rng)
    phi0 = rng.uniform(0, 2 * np.pi)
    n = max(int(radius * arc / 0.5), 40)
    phi = phi0 + np.linspace(0, arc, n)
    return c[None, :] + radius * (np.cos(phi)[:, None] * rot[:, 0][None] + np.sin(phi)[:, None] * rot[:, 1][None])


def _shape_torus(rng, cv, c, size, min_r):
    big = size * rng.uniform(0.8, 1.4)
    small = max(big * rng.uniform(0.2, 0.4), min_r)
    m = cv.empty()
    _tube(m, cv, _ring_points(rng, c, big, 2 * np.pi), small, min_r, rng, rel=0.15)
    return m


def _shape_c_shape(rng, cv, c, size, min_r):
    big = size * rng.uniform(0.8, 1.4)
    small = max(big * rng.uniform(0.25, 0.5), min_r)
    arc = np.deg2rad(rng.uniform(180, 300))
    m = cv.empty()
    _tube(m, cv, _ring_points(rng, c, big, arc), small, min_r, rng, rel=0.25)
    return m


def _shape_shell(rng, cv, c, size, min_r):
    radii = size * rng.uniform(0.8, 1.3, 3)
    thick = max(radii.min() * rng.uniform(0.2, 0.45), 1.5 * min_r)
    rot = _rotation(rng)
    rmax = radii.max()
    sl = cv.box(c - rmax, c + rmax)
    m = cv.empty()
    if sl is None:
        return m
    outer = _ellipsoid_d2(cv, sl, c, radii, rot) <= 1.0
    inner = _ellipsoid_d2(cv, sl, c, np.maximum(radii - thick, 0.3), rot) <= 1.0
    shell = outer & ~inner
    z, y, x = cv.coords(sl, c)
    norm = np.sqrt(z * z + y * y + x * x) + 1e-6
    for _ in range(int(rng.integers(1, 4))):
        hdir = _unit(rng.standard_normal(3)).astype(np.float32)
        cosang = np.float32(np.cos(np.deg2rad(rng.uniform(20, 45))))
        shell &= (hdir[0] * z + hdir[1] * y + hdir[2] * x) / norm < cosang
    m[sl] = shell
    return m


def _shape_bridged_blobs(rng, cv, c, size, min_r):
    """Two blobs side by side (in-plane), joined by a thin bridge over part of their k-extent:
    2 components on some slices, 1 on the bridge slices."""
    h = _inplane_unit(rng)
    rz = max(size * rng.uniform(0.8, 1.5), 3.0 * cv.spacing[0])
    r_in = size * rng.uniform(0.5, 0.9, 2)
    gap = max(size * rng.uniform(0.3, 0.8), 2.5 * min_r)
    m = cv.empty()
    centres = []
    for s, r in zip((-1.0, 1.0), r_in):
        cc = c + s * (gap / 2 + r) * h + np.array([rng.uniform(-0.2, 0.2) * rz, 0, 0])
        centres.append(cc)
        radii = np.array([rz * rng.uniform(0.85, 1.15), r, r * rng.uniform(0.7, 1.2)])
        rot = np.eye(3)
        # small tilt keeps the pair from looking identical without losing the side-by-side layout
        rot = _small_tilt(rng, 0.25)
        rmax = radii.max()
        sl = cv.box(cc - rmax, cc + rmax)
        if sl is None:
            continue
        d = np.sqrt(_ellipsoid_d2(cv, sl, cc, radii, rot))
        f = _field_on(rng, cv, sl, radii.mean() * 0.7)
        m[sl] |= d + np.float32(0.08) * f <= 1.0
    # bridge: a slab between the two centres, thin in-plane across, limited along k
    bz = max(rz * rng.uniform(0.15, 0.4), 0.6 * cv.spacing[0])
    bw = max(size * rng.uniform(0.1, 0.25), min_r)
    mid = 0.5 * (centres[0] + centres[1])
    half_len = 0.5 * np.linalg.norm(centres[1] - centres[0])
    ext = np.array([bz, half_len + bw, half_len + bw])
    sl = cv.box(mid - ext, mid + ext)
    if sl is not None:
        z, y, x = cv.coords(sl, mid)
        along = h[1] * y + h[2] * x
        across = -h[2] * y + h[1] * x
        m[sl] |= (np.abs(z) <= bz) & (np.abs(along) <= half_len) & (np.abs(across) <= bw)
    return m


def _small_tilt(rng, max_angle):
    axis = _unit(rng.standard_normal(3))
    ang = rng.uniform(-max_angle, max_angle)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(ang) * k + (1 - np.cos(ang)) * (k @ k)


_SHAPES = {
    "blob": _shape_blob,
    "noise_blob": _shape_noise_blob,
    "lobulated": _shape_lobulated,
    "tube": _shape_tube,
    "tube_bent": _shape_tube_bent,
    "c_shape": _shape_c_shape,
    "torus": _shape_torus,
    "shell": _shape_shell,
    "y_tube": _shape_y_tube,
    "bridged_blobs": _shape_bridged_blobs,
}
_KIND_WEIGHTS = np.array([1.2, 1.0, 1.0, 1.0, 0.7, 0.7, 0.6, 0.6, 0.8, 0.8])


def _keep_largest(mask):
    lab, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def _bbox(mask):
    idx = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    if any(len(i) == 0 for i in idx):
        return None
    return tuple(slice(int(i[0]), int(i[-1]) + 1) for i in idx)


def _grid(rng, shape, spacing, p_iso: float, max_slice_mm: float):
    """Voxel grid of a synthetic volume: (spacing, canvas, in-plane field of view mm, thinnest
    visible tube radius mm). Without a given spacing: in-plane ~ U(0.5, 1.5) mm, slices near
    isotropic with probability p_iso, else ~ U(1, max_slice_mm) mm."""
    if spacing is None:
        inplane = rng.uniform(0.5, 1.5)
        if rng.random() < p_iso:
            sz = inplane * rng.uniform(0.9, 1.2)           # near isotropic
        else:
            sz = rng.uniform(1.0, max_slice_mm)
        spacing = (float(sz), float(inplane), float(inplane * rng.uniform(0.95, 1.05)))
    spacing = tuple(float(s) for s in spacing)
    cv = _Canvas(shape, spacing)
    return spacing, cv, float(min(cv.extent[1], cv.extent[2])), 0.9 * max(spacing[1], spacing[2])


def _render(rng, cv: _Canvas, labels: np.ndarray, n_obj: int, fov: float, min_r: float,
            groups: dict[int, int] | None = None):
    """Appearance of a labelled geometry: unlabelled distractors, per-tissue intensity, texture,
    blur, bias field, noise and a CT-like or MR-like range. Returns (image, style, params).

    groups: optional {label: group id}; labels of one group get nearly the same mean intensity
    (repeated structures such as a column of vertebrae look alike).
    """
    shape, spacing = cv.shape, tuple(cv.spacing)
    # --- distractors (unlabelled, similar intensity) ------------------------------------------
    tissue = labels.astype(np.int16).copy()
    n_distr = int(rng.integers(1, 5))
    for t in range(n_distr):
        kind = str(rng.choice(("blob", "noise_blob", "tube", "lobulated", "c_shape")))
        size = fov * rng.uniform(0.05, 0.14)
        c = np.array([rng.uniform(0.1, 0.9) * cv.extent[a] for a in range(3)])
        m = _SHAPES[kind](rng, cv, c, size, min_r) & (tissue == 0)
        tissue[m] = n_obj + 1 + t

    # --- appearance (normalised units, background around 0.2-0.8) -----------------------------
    bg = rng.uniform(0.2, 0.8)
    n_tis = n_obj + n_distr + 1
    means = np.zeros(n_tis, dtype=np.float32)
    means[0] = bg
    group_mean: dict[int, float] = {}
    for lab in range(1, n_obj + 1):
        g = None if groups is None else groups.get(lab)
        if g is not None and g in group_mean:
            means[lab] = group_mean[g] + rng.uniform(-0.02, 0.02)
            continue
        for _ in range(20):
            contrast = rng.uniform(0.03, 0.1) if rng.random() < 0.25 else rng.uniform(0.1, 0.5)
            mu = bg + rng.choice([-1.0, 1.0]) * contrast
            if np.all(np.abs(means[1:lab] - mu) >= 0.04):
                break
        means[lab] = mu
        if g is not None:
            group_mean[g] = float(mu)
    for t in range(n_distr):
        ref = means[int(rng.integers(1, n_obj + 1))] if n_obj else bg
        means[n_obj + 1 + t] = ref + rng.uniform(-0.06, 0.06)

    image = means[tissue]

    # body / field-of-view outline: a large elliptic cylinder along axis 0 with a dark outside
    if rng.random() < 0.4:
        z, y, x = cv.coords((slice(None),) * 3, cv.extent / 2)
        a, b = cv.extent[1] * rng.uniform(0.45, 0.7), cv.extent[2] * rng.uniform(0.45, 0.7)
        outside = ((y / a) ** 2 + (x / b) ** 2) > 1.0
        outside = np.broadcast_to(outside, shape) & (labels == 0)
        image[outside] = np.float32(min(bg - 0.15, rng.uniform(-0.05, 0.1)))

    # textures: two shared fields at different scales, each tissue mixes them with its own weights
    fov_axes = [cv.axes[a] for a in range(3)]
    t_fine = _smooth_field(rng, fov_axes, rng.uniform(1.0, 3.0), spacing)
    t_coarse = _smooth_field(rng, fov_axes, rng.uniform(4.0, 12.0), spacing)
    wf = rng.uniform(0, 0.05, n_tis).astype(np.float32) * (rng.random(n_tis) < 0.8)
    wc = rng.uniform(0, 0.08, n_tis).astype(np.float32)
    image += wf[tissue] * t_fine + wc[tissue] * t_coarse

    # partial-volume blur (in voxels; along k a fraction of a slice)
    sig = (rng.uniform(0.0, 0.6), rng.uniform(0.2, 1.2), rng.uniform(0.2, 1.2))
    image = ndimage.gaussian_filter(image, sig, mode="nearest", truncate=3.0)

    # multiplicative smooth bias field
    bias_amp = rng.uniform(0.0, 0.3) if rng.random() < 0.7 else 0.0
    if bias_amp > 0:
        bias = _smooth_field(rng, fov_axes, rng.uniform(0.3, 0.8) * float(cv.extent.max()), spacing)
        image *= np.exp(np.float32(bias_amp) * bias)

    style = "CT" if rng.random() < 0.5 else "MR"
    noise_sigma = rng.uniform(0.005, 0.06) if rng.random() < 0.85 else rng.uniform(0.06, 0.12)
    if style == "MR":
        image = np.maximum(image, 0)
        n1 = rng.standard_normal(shape, dtype=np.float32)
        n2 = rng.standard_normal(shape, dtype=np.float32)
        image = np.sqrt((image + np.float32(noise_sigma) * n1) ** 2
                        + (np.float32(noise_sigma) * n2) ** 2)          # Rician magnitude
        scale = rng.uniform(50, 3000)
        offset = 0.0
    else:
        image = image + np.float32(noise_sigma) * rng.standard_normal(shape, dtype=np.float32)
        scale = rng.uniform(300, 2000)
        offset = rng.uniform(-1000, 0) - bg * scale * rng.uniform(0, 0.5)
    image = (image * np.float32(scale) + np.float32(offset)).astype(np.float32)

    params = dict(n_objects=n_obj, n_distractors=n_distr, background=float(bg),
                  blur_sigma_vox=tuple(float(s) for s in sig), bias_amp=float(bias_amp),
                  noise_sigma=float(noise_sigma), scale=float(scale), offset=float(offset))
    return image, style, params


# ----------------------------------------------------------------------------------------------
# main entry points
# ----------------------------------------------------------------------------------------------

def generate_volume(rng: np.random.Generator, shape=(48, 128, 128),
                    spacing=None) -> SyntheticVolume:
    """Draw one synthetic volume. Deterministic given the generator state.

    spacing: optional (k, j, i) mm; by default slice spacing ~ U(1, 5) mm (sometimes near
    isotropic) and in-plane ~ U(0.5, 1.5) mm.
    """
    shape = tuple(int(s) for s in shape)
    spacing, cv, fov, min_r = _grid(rng, shape, spacing, p_iso=0.2, max_slice_mm=5.0)

    # --- objects --------------------------------------------------------------------------
    n_target = int(rng.integers(4, 11))
    required = [str(rng.choice(SPLIT_MERGE_KINDS)), str(rng.choice(("tube", "y_tube", "tube_bent")))]
    labels = np.zeros(shape, dtype=np.int16)
    kinds: dict[int, str] = {}
    centres: list[tuple[np.ndarray, float]] = []
    p = _KIND_WEIGHTS / _KIND_WEIGHTS.sum()
    attempts = 0
    while len(kinds) < n_target and attempts < 4 * n_target + 8:
        attempts += 1
        kind = required.pop(0) if required else str(rng.choice(KINDS, p=p))
        size = fov * rng.uniform(0.06, 0.22)
        if centres and rng.random() < 0.35:               # touch an existing object
            c_prev, s_prev = centres[int(rng.integers(len(centres)))]
            c = c_prev + _unit(rng.standard_normal(3) * np.array([0.5, 1, 1])) * (s_prev + size) * 0.9
        else:
            c = np.array([rng.uniform(0.15, 0.85) * cv.extent[0],
                          rng.uniform(0.18, 0.82) * cv.extent[1],
                          rng.uniform(0.18, 0.82) * cv.extent[2]])
        # organs are often elongated along the body axis: draw the shape in a frame stretched
        # along axis 0 (a shape of size R then spans R * stretch mm along k)
        stretch = 1.0 if rng.random() < 0.5 else rng.uniform(1.0, 3.0)
        cvs = _Canvas(shape, (spacing[0] / stretch, spacing[1], spacing[2])) if stretch != 1.0 else cv
        m = _SHAPES[kind](rng, cvs, c * np.array([1.0 / stretch, 1.0, 1.0]), size, min_r)
        m &= labels == 0                                   # earlier objects win: touching borders
        bb = _bbox(m)
        if bb is None:
            continue
        sub = _keep_largest(m[bb])
        if sub.sum() < _MIN_VOXELS or sub.any(axis=(1, 2)).sum() < _MIN_SLICES:
            if kind in SPLIT_MERGE_KINDS or kind in TUBULAR_KINDS:
                if len(kinds) < 2:
                    required.insert(0, kind)               # keep trying to get the required kinds
            continue
        lab = len(kinds) + 1
        labels[bb][sub] = lab
        kinds[lab] = kind
        centres.append((c, size))
    n_obj = len(kinds)

    image, style, params = _render(rng, cv, labels, n_obj, fov, min_r)
    return SyntheticVolume(image=image, labels=labels, spacing=spacing, kinds=kinds, style=style,
                           params=params)


def component_counts(labels: np.ndarray, label: int) -> np.ndarray:
    """Number of 8-connected 2D components of `labels == label` on every slice along axis 0."""
    st = np.ones((3, 3), dtype=bool)
    out = np.zeros(labels.shape[0], dtype=np.int32)
    for k in np.flatnonzero((labels == label).any(axis=(1, 2))):
        out[k] = ndimage.label(labels[k] == label, structure=st)[1]
    return out


def split_merge_slices(labels: np.ndarray, label: int) -> list[int]:
    """Slice indices k (axis 0) where the 2D component count of `label` differs from slice k-1.

    Only changes inside the object's extent count (both slices contain the object), so an object
    simply starting or ending is not a split/merge. Index k marks the change between k-1 and k.
    """
    n = component_counts(labels, label)
    return [int(k) for k in range(1, len(n)) if n[k] > 0 and n[k - 1] > 0 and n[k] != n[k - 1]]


# ----------------------------------------------------------------------------------------------
# layered columns (spine-like): repeated look-alike blocks separated by thin layers
# ----------------------------------------------------------------------------------------------

#: Object kinds of `generate_stack_volume`.
STACK_KINDS = ("stack_block", "stack_layer", "stack_plate", "stack_canal", "stack_process")


def generate_stack_volume(rng: np.random.Generator, shape=(48, 128, 128),
                          spacing=None) -> SyntheticVolume:
    """A column of 4-8 look-alike blocks separated by thin layers, with optional thin plates on
    the block faces, a canal running behind the blocks and a process sticking out of each block.

    This is the geometry that defeats a boundary follower trained on isolated objects: the
    neighbour across a thin layer looks exactly like the object, and thin layers and plates end
    laterally where nothing in the image marks their end but the block's edge. The column runs
    in-plane (a sagittal/coronal view, where a slice cuts every block), along axis 0 (an axial
    view, where blocks and layers alternate from slice to slice) or obliquely, and bends gently.
    Blocks share one mean intensity (group), layers another, plates and processes theirs.
    Labels are 1..n consecutive; `kinds` maps each to one of STACK_KINDS.
    """
    shape = tuple(int(s) for s in shape)
    spacing, cv, fov, min_r = _grid(rng, shape, spacing, p_iso=0.35, max_slice_mm=4.0)

    # column frame: d along the column, e1 lateral, e2 "posterior" (towards canal and processes)
    r = rng.random()
    if r < 0.55:
        d = _inplane_unit(rng)
    elif r < 0.8:
        d = np.array([1.0, 0.0, 0.0])
    else:
        d = _unit(rng.standard_normal(3))
    e1 = _unit(np.cross(d, _unit(rng.standard_normal(3))))
    e2 = np.cross(d, e1)
    if rng.random() < 0.5:
        e1, e2 = e2, e1
    c0 = cv.extent / 2 + rng.uniform(-0.1, 0.1, 3) * cv.extent

    n_blocks = int(rng.integers(4, 9))
    size = fov * rng.uniform(0.08, 0.16)                   # block half-width scale (mm)
    block_len = size * rng.uniform(0.8, 1.6)
    layer = max(block_len * rng.uniform(0.12, 0.35), 1.5 * min_r)
    plate = max(block_len * rng.uniform(0.06, 0.14), 0.8 * min_r) if rng.random() < 0.6 else 0.0
    period = block_len + layer
    ra, rb = size * rng.uniform(0.9, 1.4), size * rng.uniform(0.7, 1.1)
    bend = rng.uniform(-1, 1) * 0.4 / max(n_blocks * period, 1.0)

    z, y, x = cv.coords((slice(None),) * 3, c0)
    u = d[0] * z + d[1] * y + d[2] * x
    v = e1[0] * z + e1[1] * y + e1[2] * x
    w = e2[0] * z + e2[1] * y + e2[2] * x - np.float32(bend) * u * u   # gentle curve
    u0 = u + np.float32(0.5 * n_blocks * period)
    idx = np.floor(u0 / period).astype(np.int32)
    pos = u0 - idx * np.float32(period)
    inside_col = (idx >= 0) & (idx < n_blocks)
    # per-block size jitter, evaluated through the block index
    scale = rng.uniform(0.9, 1.1, n_blocks + 1).astype(np.float32)
    sc = scale[np.clip(idx, 0, n_blocks)]
    ell = (v / (np.float32(ra) * sc)) ** 2 + (w / (np.float32(rb) * sc)) ** 2
    f = _smooth_field(rng, cv.axes, size * 0.6, spacing) * np.float32(0.08)
    block = inside_col & (pos < block_len) & (ell + f <= 1.0)
    lay = inside_col & (idx < n_blocks - 1) & (pos >= block_len) & (ell * np.float32(rng.uniform(0.95, 1.2)) + f <= 1.0)

    labels = np.zeros(shape, dtype=np.int16)
    kinds: dict[int, str] = {}
    groups: dict[int, int] = {}

    def add(mask, kind, group):
        mask = mask & (labels == 0)
        nz = np.nonzero(mask)
        if len(nz[0]) < 60 or any(np.ptp(i) < 1 for i in nz):   # too small, or flat along an axis
            return
        lab = len(kinds) + 1
        labels[mask] = lab
        kinds[lab] = kind
        groups[lab] = group

    plate_mode = rng.choice(["one", "each"]) if plate > 0 else None
    if plate_mode is not None:
        plates = block & ((pos < plate) | (pos >= block_len - plate))
        if plate_mode == "one":
            add(plates, "stack_plate", 2)
        else:
            for b in range(n_blocks):
                add(plates & (idx == b), "stack_plate", 2)
    for b in range(n_blocks):
        add(block & (idx == b), "stack_block", 0)
        add(lay & (idx == b), "stack_layer", 1)

    # canal behind the column and a process per block through it
    if rng.random() < 0.7:
        rc = max(rb * rng.uniform(0.25, 0.45), 1.5 * min_r)
        off = rb + rc + rng.uniform(0.1, 0.4) * rb
        canal = ((v / rc) ** 2 + ((w - np.float32(off)) / rc) ** 2 <= 1.0) & (u0 > -period) & (u0 < (n_blocks + 1) * period)
        add(canal, "stack_canal", 3)
        if rng.random() < 0.8:
            pr = max(block_len * rng.uniform(0.15, 0.3), min_r)
            plen = rb * rng.uniform(1.0, 2.2)
            one = rng.random() < 0.4
            procs = np.zeros(shape, dtype=bool)
            for b in range(n_blocks):
                centre_u = (b + 0.5 * block_len / period) * period
                du = u0 - np.float32(centre_u + rng.uniform(-0.2, 0.2) * block_len)
                tilt = np.float32(rng.uniform(-0.4, 0.4))
                m = ((np.abs(du - tilt * (w - np.float32(off))) <= pr) & (np.abs(v) <= pr * rng.uniform(0.6, 1.2))
                     & (w >= np.float32(off + rc * 0.9)) & (w <= np.float32(off + rc + plen)))
                if one:
                    procs |= m
                else:
                    add(m, "stack_process", 4)
            if one:
                add(procs, "stack_process", 4)

    n_obj = len(kinds)
    image, style, params = _render(rng, cv, labels, n_obj, fov, min_r, groups=groups)
    params.update(n_blocks=n_blocks, plate_mm=float(plate), layer_mm=float(layer), column_dir=d.tolist())
    return SyntheticVolume(image=image, labels=labels, spacing=spacing, kinds=kinds, style=style,
                           params=params)
