"""Solid (3D) procedural textures evaluated at surface points, vectorised over points.

Solid textures need no uv mapping, so boxes, spheres and cylinders share them.
Each pattern maps points (M, 3) in metres to weights (M,) in [0, 1] that mix a
material's two colours.
"""

from __future__ import annotations

import numpy as np

from depthkd_core.data.primitives import Material

_PERIOD = 64  # lattice cells per axis; the noise repeats after this many cells
_SIDE = _PERIOD + 1
# Random lattice values, padded by one wrapped cell per axis so the 8 corners of
# a cell are the base index plus constant offsets (no per-corner wrapping).
_LATTICE = np.pad(np.random.default_rng(20240607).random((_PERIOD,) * 3, dtype=np.float32),
                  ((0, 1),) * 3, mode="wrap").ravel()
_OFFSETS = [dx * _SIDE**2 + dy * _SIDE + dz for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)]


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return a + (b - a) * t


def value_noise(points: np.ndarray, seed: int) -> np.ndarray:
    """Trilinear value noise with smoothstep weights, in [0, 1).

    Lattice values come from one fixed random table; ``seed`` shifts the lattice
    so materials get different, but repeatable, noise.
    """
    base = np.floor(points)
    frac = (points - base).astype(np.float32)
    w = frac * frac * (3 - 2 * frac)
    shift = np.array([seed, seed // _PERIOD, seed // _PERIOD**2], dtype=np.int32)
    cells = (base.astype(np.int32) + shift) & (_PERIOD - 1)
    index = cells @ np.array([_SIDE**2, _SIDE, 1], dtype=np.int32)
    v = [_LATTICE[index + offset] for offset in _OFFSETS]   # corners ordered x, y, z
    wx, wy, wz = w[:, 0], w[:, 1], w[:, 2]
    x00, x01 = _lerp(v[0], v[4], wx), _lerp(v[1], v[5], wx)
    x10, x11 = _lerp(v[2], v[6], wx), _lerp(v[3], v[7], wx)
    return _lerp(_lerp(x00, x10, wy), _lerp(x01, x11, wy), wz)


def fbm(points: np.ndarray, seed: int, octaves: int = 3) -> np.ndarray:
    """Fractal sum of value noise (octaves at doubling frequency, halving amplitude)."""
    total = np.zeros(len(points), dtype=np.float32)
    for k in range(octaves):
        total += 0.5**k * value_noise(points * 2.0**k, seed + k)
    return total / np.float32(2.0 - 0.5 ** (octaves - 1))


def pattern(material: Material, points: np.ndarray) -> np.ndarray:
    """Mixing weight of ``material.colour_b`` at each point (M, 3)."""
    q = points * material.scale + np.asarray(material.offset)
    axis = np.asarray(material.axis)
    kind = material.kind
    if kind == "flat":
        return np.zeros(len(points), dtype=np.float32)
    if kind == "checker":
        return (np.floor(q).astype(np.int64).sum(axis=1) % 2).astype(np.float32)
    if kind == "stripes":
        return ((q @ axis) % 1.0 < 0.5).astype(np.float32)
    if kind == "noise":
        return fbm(q, material.seed)
    if kind == "wood":
        # Growth rings: distance from the grain axis, warped by noise, then sharpened.
        radial = np.linalg.norm(q - np.outer(q @ axis, axis), axis=1)
        rings = (radial * 3.0 + 1.5 * fbm(q * 0.7, material.seed)) % 1.0
        return (rings**3).astype(np.float32)
    if kind == "planks":
        return _planks(q, axis, material.seed)
    if kind == "tiles":
        # Square tiles in the horizontal plane (floors) with dark grout lines.
        cell = q[:, :2] - np.floor(q[:, :2])
        grout = (np.minimum(cell, 1 - cell) < 0.025).any(axis=1)
        return np.where(grout, np.float32(1), 0.25 * fbm(q * 4, material.seed)).astype(np.float32)
    raise ValueError(f"unknown texture kind {kind!r}")


def _planks(q: np.ndarray, axis: np.ndarray, seed: int) -> np.ndarray:
    """Floor boards along the horizontal grain ``axis``: boards 1/scale wide and 4-8 times as
    long, staggered, each a little lighter or darker, with grain and dark seams."""
    along = np.array([axis[0], axis[1], 0.0]) / max(np.hypot(axis[0], axis[1]), 1e-9)
    u = q @ along                                      # along the boards
    v = q @ np.array([-along[1], along[0], 0.0])       # across the boards
    board = np.floor(v)
    shift = _LATTICE[(board.astype(np.int64) + seed) % _LATTICE.size]
    length = 6.0
    row = np.floor(u / length + shift)
    seam = (np.minimum(v - board, 1 - (v - board)) < 0.03) \
        | ((u / length + shift - row) * length < 0.05)
    tone = _LATTICE[((board * 7 + row * 13).astype(np.int64) + seed) % _LATTICE.size]
    grain = fbm(np.stack([u * 0.5, v * 8.0, q[:, 2]], axis=1), seed)
    t = 0.45 * tone + 0.35 * grain
    return np.where(seam, np.float32(1), t).astype(np.float32)


def albedo(materials: list[Material], material_ids: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Surface colour (M, 3) in [0, 1] of points (M, 3) carrying per-point material ids."""
    out = np.empty((len(points), 3), dtype=np.float32)
    order = np.argsort(material_ids, kind="stable")
    ids, starts = np.unique(material_ids[order], return_index=True)
    for m, start, stop in zip(ids, starts, list(starts[1:]) + [len(order)]):
        idx = order[start:stop]
        mat = materials[m]
        t = pattern(mat, points[idx])[:, None]
        out[idx] = (1 - t) * np.asarray(mat.colour_a) + t * np.asarray(mat.colour_b)
    return out
