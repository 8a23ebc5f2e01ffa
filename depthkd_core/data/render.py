"""Ray casting and shading of a ``Scene`` for all pixels at once.

Each pixel's ray direction has camera-frame z = 1, so the ray parameter at the
hit is the z-depth along the optical axis (what depth cameras report), not the
ray length. Primitives are tested only inside their projected screen window.
"""

from __future__ import annotations

import cv2
import numpy as np

from depthkd_core.data.camera_effects import apply_camera
from depthkd_core.data.frame import Frame
from depthkd_core.data.primitives import N_ROOM_FACES, Scene
from depthkd_core.data.scene import CameraPose
from depthkd_core.data.shading import lamps, occlusion
from depthkd_core.data.styles import SceneStyle
from depthkd_core.data.textures import albedo
from depthkd_core.geometry import Intrinsics

_ROOM_NORMALS = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                         dtype=np.float32)
_BOX_NORMALS = np.concatenate([-np.eye(3), np.eye(3)]).astype(np.float32)  # lo faces, hi faces
_TINY = np.float32(1e-12)


def camera_rays(K: Intrinsics, pose: CameraPose) -> np.ndarray:
    """World directions (H, W, 3) of pixel rays, scaled so their camera z is 1."""
    u = (np.arange(K.width, dtype=np.float64) - K.cx) / K.fx
    v = (np.arange(K.height, dtype=np.float64) - K.cy) / K.fy
    cam = np.stack(np.broadcast_arrays(u[None, :], v[:, None], 1.0), axis=-1)
    return (cam @ pose.rotation().T).astype(np.float32)


class _Caster:
    """Keeps the nearest hit (t, part) per pixel while primitives are tested.

    Rays are held as three (H, W) planes: element-wise maxima of planes are much
    faster in numpy than reductions over a trailing axis of length 3.
    """

    def __init__(self, origin: np.ndarray, rays: np.ndarray, pose: CameraPose,
                 K: Intrinsics) -> None:
        self.o = [float(x) for x in origin]
        self.d = [np.ascontiguousarray(rays[..., a]) for a in range(3)]
        self.inv = [1.0 / np.where(np.abs(d) < _TINY, _TINY, d) for d in self.d]
        self.R, self.K = pose.rotation(), K
        self.t = np.full(rays.shape[:2], np.inf, dtype=np.float32)
        self.part = np.zeros(rays.shape[:2], dtype=np.int32)

    def window(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice] | None:
        """Pixel rectangle covering the projection of box [lo, hi] (None if not in view)."""
        corners = np.stack(np.meshgrid(*zip(lo, hi), indexing="ij"), -1).reshape(-1, 3)
        cam = (corners - self.o) @ self.R
        K = self.K
        if np.all(cam[:, 2] <= 0):
            return None
        if np.any(cam[:, 2] <= 1e-6):
            return slice(0, K.height), slice(0, K.width)
        u = K.fx * cam[:, 0] / cam[:, 2] + K.cx
        v = K.fy * cam[:, 1] / cam[:, 2] + K.cy
        u0, u1 = max(0, int(np.floor(u.min()))), min(K.width, int(np.ceil(u.max())) + 1)
        v0, v1 = max(0, int(np.floor(v.min()))), min(K.height, int(np.ceil(v.max())) + 1)
        if u0 >= u1 or v0 >= v1:
            return None
        return slice(v0, v1), slice(u0, u1)

    def keep(self, win: tuple[slice, slice], t: np.ndarray, part: int) -> None:
        best, ids = self.t[win], self.part[win]   # views: writes land in self.t/self.part
        closer = t < best
        best[closer] = t[closer]
        ids[closer] = part

    def room(self, size: np.ndarray) -> None:
        """Exit point of the room box: the nearest of the three far faces."""
        for axis in range(3):
            d = self.d[axis]
            t = (np.where(d > 0, np.float32(size[axis]), np.float32(0)) - self.o[axis]) \
                * self.inv[axis]
            closer = t < self.t
            self.t = np.where(closer, t, self.t)
            self.part = np.where(closer, 2 * axis + (d > 0), self.part).astype(np.int32)

    def box(self, lo: np.ndarray, hi: np.ndarray, part: int) -> None:
        """Slab test (Kay and Kajiya 1986)."""
        win = self.window(lo, hi)
        if win is None:
            return
        near = far = None
        for axis in range(3):
            inv = self.inv[axis][win]
            t0 = (float(lo[axis]) - self.o[axis]) * inv
            t1 = (float(hi[axis]) - self.o[axis]) * inv
            enter, leave = np.minimum(t0, t1), np.maximum(t0, t1)
            near = enter if near is None else np.maximum(near, enter)
            far = leave if far is None else np.minimum(far, leave)
        self.keep(win, np.where((near <= far) & (near > 0), near, np.inf), part)

    def sphere(self, centre: np.ndarray, radius: float, part: int) -> None:
        win = self.window(centre - radius, centre + radius)
        if win is None:
            return
        dx, dy, dz = (d[win] for d in self.d)
        ox, oy, oz = (self.o[a] - float(centre[a]) for a in range(3))
        a = dx * dx + dy * dy + dz * dz
        b = dx * ox + dy * oy + dz * oz
        disc = b * b - a * (ox * ox + oy * oy + oz * oz - radius * radius)
        with np.errstate(invalid="ignore"):
            t = (-b - np.sqrt(disc)) / a
        self.keep(win, np.where((disc >= 0) & (t > 0), t, np.inf), part)

    def cylinder(self, cyl: np.ndarray, part: int) -> None:
        """Vertical cylinder: side wall and top cap (the bottom rests on the floor)."""
        x, y, r, z0, z1 = (float(v) for v in cyl)
        win = self.window(np.array([x - r, y - r, z0]), np.array([x + r, y + r, z1]))
        if win is None:
            return
        dx, dy, dz = (d[win] for d in self.d)
        ox, oy = self.o[0] - x, self.o[1] - y
        a = dx * dx + dy * dy
        b = dx * ox + dy * oy
        disc = b * b - a * (ox * ox + oy * oy - r * r)
        with np.errstate(invalid="ignore", divide="ignore"):
            side = (-b - np.sqrt(disc)) / a
        z = self.o[2] + side * dz
        side = np.where((disc >= 0) & (side > 0) & (z >= z0) & (z <= z1), side, np.inf)
        cap = (z1 - self.o[2]) * self.inv[2][win]
        cx, cy = ox + cap * dx, oy + cap * dy
        cap = np.where((cap > 0) & (cx * cx + cy * cy <= r * r), cap, np.inf)
        self.keep(win, np.minimum(side, cap), part)


def intersect(scene: Scene, pose: CameraPose, K: Intrinsics) -> tuple[np.ndarray, ...]:
    """Per pixel: z-depth (H, W) float32, part index (H, W) and world rays (H, W, 3)."""
    rays = camera_rays(K, pose)
    caster = _Caster(np.asarray(pose.position, dtype=np.float64), rays, pose, K)
    caster.room(scene.size)
    part = N_ROOM_FACES
    for lo, hi in zip(scene.box_lo, scene.box_hi):
        caster.box(lo, hi, part)
        part += 1
    for sphere in scene.spheres:
        caster.sphere(sphere[:3], float(sphere[3]), part)
        part += 1
    for cyl in scene.cylinders:
        caster.cylinder(cyl, part)
        part += 1
    return caster.t, caster.part, rays


def surface_normals(scene: Scene, points: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Unit normals (M, 3) at hit points (M, 3) of parts (M,)."""
    normals = np.zeros_like(points)
    room = part < N_ROOM_FACES
    normals[room] = _ROOM_NORMALS[part[room]]
    n_box, n_sph = len(scene.box_lo), len(scene.spheres)
    k = part - N_ROOM_FACES
    box = ~room & (k < n_box)
    if box.any():
        p, i = points[box], k[box]
        gaps = np.abs(np.concatenate([p - scene.box_lo[i], p - scene.box_hi[i]], axis=1))
        normals[box] = _BOX_NORMALS[np.argmin(gaps, axis=1)]
    sph = (k >= n_box) & (k < n_box + n_sph)
    if sph.any():
        s = scene.spheres[k[sph] - n_box]
        normals[sph] = (points[sph] - s[:, :3]) / s[:, 3:]
    cyl = k >= n_box + n_sph
    if cyl.any():
        c = scene.cylinders[k[cyl] - n_box - n_sph]
        p = points[cyl]
        radial = np.stack([p[:, 0] - c[:, 0], p[:, 1] - c[:, 1], np.zeros(len(p))], axis=1)
        radial /= np.linalg.norm(radial, axis=1, keepdims=True) + 1e-9
        on_top = np.abs(p[:, 2] - c[:, 4]) < 1e-3
        normals[cyl] = np.where(on_top[:, None], np.array([0, 0, 1.0]), radial)
    return normals


def _lighting(scene: Scene, style: SceneStyle, points: np.ndarray,
              normals: np.ndarray) -> np.ndarray:
    """Ambient + Lambertian light (M, 3); the point light falls off with distance."""
    if style.light == "point":
        to_light = scene.light.astype(np.float32) - points
        dist = np.linalg.norm(to_light, axis=1, keepdims=True)
        lambert = np.sum(normals * to_light / dist, axis=1, keepdims=True)
        lambert = np.maximum(lambert, 0) / (1 + 0.08 * dist**2)
    else:
        lambert = np.maximum(normals @ scene.light.astype(np.float32), 0)[:, None]
    return style.ambient + style.light_intensity * lambert * np.asarray(style.light_colour)


def _sensor(image: np.ndarray, style: SceneStyle, rng: np.random.Generator) -> np.ndarray:
    """Vignetting, optical blur and noise of the style's camera; returns uint8."""
    h, w = image.shape[:2]
    if style.vignetting:
        yy, xx = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32),
                             np.linspace(-1, 1, w, dtype=np.float32), indexing="ij")
        image = image * (1 - style.vignetting * (xx**2 + yy**2) / 2)[..., None]
    if style.blur:  # OpenCV's fixed 3-tap kernel for sigma 0 is the binomial [1, 2, 1] / 4
        image = cv2.GaussianBlur(image, (3, 3), 0, borderType=cv2.BORDER_REPLICATE)
    if style.noise_std:
        image = image + style.noise_std * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def render_view(scene: Scene, pose: CameraPose, K: Intrinsics, style: SceneStyle,
                rng: np.random.Generator, name: str = "") -> Frame:
    """RGB, z-depth, semantic and instance maps of ``scene`` seen from ``pose``."""
    depth, part, rays = intersect(scene, pose, K)
    flat_part = part.reshape(-1)
    origin = np.asarray(pose.position, dtype=np.float32)
    points = origin + depth.reshape(-1, 1) * rays.reshape(-1, 3)
    normals = surface_normals(scene, points, flat_part)
    # Textures are sampled 1 mm behind the surface so a face lying on a checker
    # cell boundary (e.g. the floor at z = 0) does not flicker between cells.
    colour = albedo(scene.materials, scene.part_material[flat_part], points - 1e-3 * normals)
    highlight = None
    if scene.light.ndim == 2:   # ceiling lamps: shadows, highlights
        view = -rays.reshape(-1, 3) / np.linalg.norm(rays.reshape(-1, 3), axis=1, keepdims=True)
        diffuse, highlight = lamps(scene, style, points, normals, view, flat_part,
                                   (K.height, K.width))
        light = style.ambient + style.light_intensity * diffuse * np.asarray(style.light_colour)
    else:
        light = _lighting(scene, style, points, normals)
    if style.occlusion:
        light = light * occlusion(scene, points, flat_part, style.occlusion)
    emission = np.array([m.emission for m in scene.materials], dtype=np.float32)
    glow = emission[scene.part_material[flat_part]][:, None]
    colour = colour * (light + glow) if glow.any() else colour * light
    if highlight is not None:
        colour = colour + highlight * np.asarray(style.light_colour, dtype=np.float32)
    image = colour.reshape(K.height, K.width, 3)
    rgb = (_sensor(image, style, rng) if style.effects is None
           else apply_camera(image, style.effects, rng))
    return Frame(rgb=rgb, depth=depth, intrinsics=K, semantic=scene.part_class[part],
                 instance=scene.part_instance[part], name=name)
