"""Cheap global illumination cues for the indoor style: ambient occlusion and soft shadows.

Both are approximations chosen for speed (whole-image numpy, no per-pixel
Python): occlusion from distances to the room's planes and to furniture
footprints; shadows by testing a coarse grid of shadow rays against the
bounding boxes of all furniture and objects at once, then upsampling, which
also softens them like an extended lamp would.
"""

from __future__ import annotations

import cv2
import numpy as np

from depthkd_core.data.primitives import N_ROOM_FACES, Scene
from depthkd_core.data.styles import CLASS_IDS, SceneStyle

# Wall-mounted and ceiling items cast no useful shadow (and lamps would shadow their light).
_NO_SHADOW = [CLASS_IDS[c] for c in ("wall", "door", "window", "picture", "lamp")]
_MATTE = [CLASS_IDS[c] for c in ("wall", "ceiling", "sofa", "lamp", "window")]
_SHININESS = 24.0


def occlusion(scene: Scene, points: np.ndarray, part: np.ndarray,
               strength: float) -> np.ndarray:
    """Ambient occlusion factor (M, 1): darker towards room edges and corners, near the floor
    and walls (objects standing on or against them), and on the floor under furniture."""
    size = scene.size.astype(np.float32)
    nearest = np.full(len(points), np.inf, dtype=np.float32)
    for k in range(N_ROOM_FACES):   # distance to room plane k (a face ignores its own plane)
        axis = k // 2
        gap = np.abs(points[:, axis] if k % 2 == 0 else size[axis] - points[:, axis])
        nearest = np.minimum(nearest, np.where(part == k, np.float32(np.inf), gap))
    ao = 1 - strength * np.exp(-nearest / np.float32(0.3))
    floor = np.flatnonzero(part == 4)
    if len(floor) and len(scene.footprints):
        f = scene.footprints.astype(np.float32)[None]
        xy = points[floor, :2]
        dx = np.maximum(np.maximum(f[..., 0] - xy[:, :1], xy[:, :1] - f[..., 2]), 0)
        dy = np.maximum(np.maximum(f[..., 1] - xy[:, 1:], xy[:, 1:] - f[..., 3]), 0)
        near = np.hypot(dx, dy).min(axis=1)
        ao[floor] *= 1 - 0.8 * strength * np.exp(-near / np.float32(0.15))
    return ao[:, None].astype(np.float32)


def _casters(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Bounding boxes (lo, hi), (K, 3) each, of everything that casts a shadow."""
    lo = [scene.box_lo, scene.spheres[:, :3] - scene.spheres[:, 3:],
          np.stack([scene.cylinders[:, 0] - scene.cylinders[:, 2],
                    scene.cylinders[:, 1] - scene.cylinders[:, 2], scene.cylinders[:, 3]], 1)]
    hi = [scene.box_hi, scene.spheres[:, :3] + scene.spheres[:, 3:],
          np.stack([scene.cylinders[:, 0] + scene.cylinders[:, 2],
                    scene.cylinders[:, 1] + scene.cylinders[:, 2], scene.cylinders[:, 4]], 1)]
    lo, hi = np.concatenate(lo).astype(np.float32), np.concatenate(hi).astype(np.float32)
    # Handles, door gaps and legs are too thin for shadows traced on a coarse grid.
    big = np.sort(hi - lo, axis=1)[:, 1] >= 0.1
    keep = ~np.isin(scene.part_class[N_ROOM_FACES:], _NO_SHADOW) & big
    return lo[keep], hi[keep]


def shadow(scene: Scene, points: np.ndarray, normals: np.ndarray, light: np.ndarray,
           shape: tuple[int, int], step: int) -> np.ndarray:
    """Visibility (M, 1) in [0, 1] of ``light`` from every pixel's surface point.

    Shadow rays start on every ``step``-th pixel of each axis, 2 cm off the
    surface; the hit test is the slab test of all caster boxes at once.
    """
    lo, hi = _casters(scene)
    h, w = shape
    if len(lo) == 0:
        return np.ones((h * w, 1), np.float32)
    grid = (slice(step // 2, None, step), slice(step // 2, None, step))
    o = (points.reshape(h, w, 3)[grid] + 0.02 * normals.reshape(h, w, 3)[grid])
    gh, gw = o.shape[:2]
    o = o.reshape(-1, 3)
    d = light[None] - o
    near = np.zeros((len(o), len(lo)), np.float32)
    far = np.ones((len(o), len(lo)), np.float32)
    for a in range(3):
        inv = 1 / np.where(np.abs(d[:, a:a + 1]) < 1e-9, np.float32(1e-9), d[:, a:a + 1])
        t0 = (lo[None, :, a] - o[:, a:a + 1]) * inv
        t1 = (hi[None, :, a] - o[:, a:a + 1]) * inv
        near = np.maximum(near, np.minimum(t0, t1))
        far = np.minimum(far, np.maximum(t0, t1))
    lit = 1 - (near < far).any(axis=1).reshape(gh, gw).astype(np.float32)
    lit = cv2.GaussianBlur(lit, (3, 3), 0, borderType=cv2.BORDER_REPLICATE)
    lit = cv2.resize(lit, (w, h), interpolation=cv2.INTER_LINEAR)
    return lit.reshape(-1, 1)


def lamps(scene: Scene, style: SceneStyle, points: np.ndarray, normals: np.ndarray,
          view: np.ndarray, part: np.ndarray, shape: tuple[int, int]
          ) -> tuple[np.ndarray, np.ndarray | None]:
    """Diffuse (M, 1) and specular (M, 1, or None without ``style.gloss``) light of the
    ceiling lamps ``scene.light`` (L, 3), with falloff and (``style.shadows``) soft shadows.

    The lamps share the style's intensity (2 / (1 + L) each). Highlights are
    Blinn-Phong, on everything but walls, ceiling, sofas and glowing parts.
    """
    diffuse = np.zeros((len(points), 1), dtype=np.float32)
    specular = np.zeros_like(diffuse) if style.gloss else None
    for light in scene.light.astype(np.float32):
        to_light = light - points
        dist = np.sqrt(np.einsum("ij,ij->i", to_light, to_light))[:, None]
        to_light /= dist
        cos = np.einsum("ij,ij->i", normals, to_light)[:, None]
        lit = np.maximum(cos, 0) / (1 + 0.08 * dist**2)
        if style.shadows:
            lit *= shadow(scene, points, normals, light, shape, style.shadows)
        diffuse += lit
        if specular is not None:
            half = to_light + view
            half /= np.sqrt(np.einsum("ij,ij->i", half, half))[:, None] + 1e-9
            spec = np.maximum(np.einsum("ij,ij->i", normals, half), 0)[:, None] ** _SHININESS
            specular += spec * (lit > 0) * lit / np.maximum(cos, 1e-3)   # shadows, falloff
    share = np.float32(2 / (1 + len(scene.light)))
    if specular is not None:
        matte = np.isin(scene.part_class[part], _MATTE)[:, None]
        specular = np.where(matte, 0, specular * share * style.gloss).astype(np.float32)
    return diffuse * share, specular
