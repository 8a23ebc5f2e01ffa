"""Procedural indoor scenes: a box room with furniture built from primitives.

World frame: z up, the room spans ``[0, size]`` on each axis (floor at z = 0).
Primitives are axis-aligned boxes, spheres and vertical cylinders; a piece of
furniture is several primitives sharing one instance id and class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from depthkd_core.data.furnish import (add_chairs, add_clutter, add_fronts, add_furniture, add_lamps,
                                      add_wall_items, wall_side)
from depthkd_core.data.primitives import Scene, SceneBuilder, choose, uniform
from depthkd_core.data.styles import CLASS_IDS, SceneStyle
from depthkd_core.geometry import Intrinsics

_GAP = 0.15       # free space kept between pieces of furniture, metres


@dataclass(frozen=True)
class CameraPose:
    """Camera centre in the world; yaw about +z from +x; pitch > 0 looks down; roll turns
    the image clockwise about the optical axis (radians)."""

    position: tuple[float, float, float]
    yaw: float
    pitch: float
    roll: float = 0.0

    def rotation(self) -> np.ndarray:
        """Camera-to-world rotation; columns are the camera's x (right), y (down), z (forward)."""
        cy, sy = math.cos(self.yaw), math.sin(self.yaw)
        cp, sp = math.cos(self.pitch), math.sin(self.pitch)
        forward = np.array([cy * cp, sy * cp, -sp])
        right = np.array([sy, -cy, 0.0])
        down = np.cross(forward, right)
        if self.roll:
            cr, sr = math.cos(self.roll), math.sin(self.roll)
            right, down = cr * right + sr * down, cr * down - sr * right
        return np.stack([right, down, forward], axis=1)


_SIZES: dict[str, tuple[tuple[float, float], ...]] = {   # metres, before style scaling
    "table": ((0.8, 1.6), (0.6, 1.0), (0.7, 0.78)),          # width (x), depth (y), height
    "shelf": ((0.8, 1.6), (0.3, 0.45), (1.6, 2.1)),
    "bed": ((1.4, 1.8), (1.9, 2.1), (0.45, 0.55)),
    "cabinet": ((0.4, 1.2), (0.4, 0.7), (0.5, 1.3)),
    "sphere": ((0.24, 0.7),),                                 # diameter
    "cylinder": ((0.24, 0.6), (0.3, 1.2)),                    # diameter, height
    "chair": ((0.42, 0.52), (0.42, 0.52), (0.8, 0.95)),       # height: top of the back
    "sofa": ((1.5, 2.4), (0.8, 0.95), (0.75, 0.9)),
    "desk": ((1.0, 1.6), (0.55, 0.8), (0.72, 0.76)),
    "wardrobe": ((0.8, 1.6), (0.5, 0.65), (1.8, 2.2)),
    "counter": ((1.2, 3.0), (0.55, 0.65), (0.86, 0.92)),
}
_SNAP = ("shelf", "bed", "cabinet", "sofa", "desk", "wardrobe", "counter")


def _furniture_size(kind: str, rng: np.random.Generator, scale: float) -> tuple[float, ...]:
    """Width (x), depth (y), height in metres, before a random 90 degree turn."""
    d = [rng.uniform(*bounds) * scale for bounds in _SIZES[kind]]
    if kind == "sphere":
        return d[0], d[0], d[0]
    if kind == "cylinder":
        return d[0], d[0], d[1]
    return tuple(d)


def _place(rng: np.random.Generator, size: np.ndarray, w: float, d: float, snap: bool,
           taken: list[np.ndarray]) -> np.ndarray | None:
    """A free floor rectangle (x0, y0, x1, y1) of w x d, against a wall if ``snap``."""
    if w > size[0] - 0.1 or d > size[1] - 0.1:
        return None
    for _ in range(40):
        x0, y0 = rng.uniform(0.05, size[0] - w - 0.05), rng.uniform(0.05, size[1] - d - 0.05)
        if snap:
            wall = rng.integers(4)
            x0 = [0.02, size[0] - w - 0.02, x0, x0][wall]
            y0 = [y0, y0, 0.02, size[1] - d - 0.02][wall]
        rect = np.array([x0, y0, x0 + w, y0 + d])
        if not taken:
            return rect
        t = np.array(taken)
        overlap = ((rect[0] < t[:, 2] + _GAP) & (t[:, 0] < rect[2] + _GAP)
                   & (rect[1] < t[:, 3] + _GAP) & (t[:, 1] < rect[3] + _GAP))
        if not overlap.any():
            return rect
    return None


def _add_furniture(b: SceneBuilder, kind: str, r: np.ndarray, h: float, room: np.ndarray,
                   inst: int) -> None:
    """Primitives of one piece of furniture on footprint ``r`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = r
    mat = b.material(b.style.object_textures)
    if kind == "sphere":
        b.spheres.append(([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (x1 - x0) / 2],
                          CLASS_IDS[kind], inst, mat))
    elif kind == "cylinder":
        b.cylinders.append(([(x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, 0.0, h],
                            CLASS_IDS[kind], inst, mat))
    elif kind == "cabinet":
        b.box([x0, y0, 0], [x1, y1, h], kind, inst, mat)
        b.surfaces.append((x0, y0, x1, y1, h, 0.6))
        if b.style.furniture_fronts:

            add_fronts(b, r, wall_side(r, room) ^ 1, 0.03, h - 0.03, inst, handle=h - 0.1)
    elif kind == "table":
        leg, top = 0.06, 0.04
        b.box([x0, y0, h - top], [x1, y1, h], kind, inst, mat)
        b.surfaces.append((x0, y0, x1, y1, h, 0.6))
        for lx, ly in ((x0, y0), (x1 - leg, y0), (x0, y1 - leg), (x1 - leg, y1 - leg)):
            b.box([lx, ly, 0], [lx + leg, ly + leg, h - top], kind, inst, mat)
    elif kind == "shelf":
        _add_shelf(b, r, min(h, room[2] - 0.2), room, inst, mat)
    elif kind == "bed":
        _add_bed(b, r, h, room, inst, mat)
    else:

        add_furniture(b, kind, r, h, room, inst, mat)


def _add_shelf(b: SceneBuilder, r: np.ndarray, h: float, room: np.ndarray, inst: int,
               mat: int) -> None:
    """Back panel on the long side nearer a wall, two side panels and 3-5 boards."""
    x0, y0, x1, y1 = r
    t = 0.03
    if (x1 - x0) >= (y1 - y0):
        by = y0 if y0 < room[1] - y1 else y1 - t
        b.box([x0, by, 0], [x1, by + t, h], "shelf", inst, mat)
        for sx in (x0, x1 - t):
            b.box([sx, y0, 0], [sx + t, y1, h], "shelf", inst, mat)
    else:
        bx = x0 if x0 < room[0] - x1 else x1 - t
        b.box([bx, y0, 0], [bx + t, y1, h], "shelf", inst, mat)
        for sy in (y0, y1 - t):
            b.box([x0, sy, 0], [x1, sy + t, h], "shelf", inst, mat)
    boards = np.linspace(0.05, h - t, int(b.rng.integers(3, 6)))
    for z in boards:
        b.box([x0, y0, z], [x1, y1, z + t], "shelf", inst, mat)
        b.surfaces.append((x0 + t, y0 + t, x1 - t, y1 - t, z + t, boards[1] - boards[0] - 2 * t))


def _add_bed(b: SceneBuilder, r: np.ndarray, h: float, room: np.ndarray, inst: int,
             mat: int) -> None:
    """Frame, mattress, headboard at the short end nearer a wall, and a pillow."""
    x0, y0, x1, y1 = r
    sheet = b.material(b.style.object_textures)
    b.box([x0, y0, 0], [x1, y1, 0.55 * h], "bed", inst, mat)
    b.box([x0 + 0.03, y0 + 0.03, 0.55 * h], [x1 - 0.03, y1 - 0.03, h], "bed", inst, sheet)
    board, top, ph = 0.08, 2.0 * h, 0.12
    if (x1 - x0) > (y1 - y0):   # long along x: headboard on an x end
        end = x0 if x0 < room[0] - x1 else x1 - board
        b.box([end, y0, 0], [end + board, y1, top], "bed", inst, mat)
        px = end + board + 0.05 if end == x0 else end - 0.45
        b.box([px, y0 + 0.2, h], [px + 0.4, y1 - 0.2, h + ph], "bed", inst, sheet)
    else:
        end = y0 if y0 < room[1] - y1 else y1 - board
        b.box([x0, end, 0], [x1, end + board, top], "bed", inst, mat)
        py = end + board + 0.05 if end == y0 else end - 0.45
        b.box([x0 + 0.2, py, h], [x1 - 0.2, py + 0.4, h + ph], "bed", inst, sheet)


def make_scene(style: SceneStyle, rng: np.random.Generator) -> Scene:
    """A random room of ``style``: walls, floor, ceiling, furniture and one light."""
    size = np.array([uniform(rng, style.room_size), uniform(rng, style.room_size),
                     uniform(rng, style.room_height)])
    b = SceneBuilder(style, rng)
    wall = b.material(style.wall_textures, wall=True)
    room_materials = [wall] * 4 + [b.material(style.floor_textures),
                                   b.material((("flat", 1.0),), wall=True)]
    taken: list[np.ndarray] = []
    kept: list[np.ndarray] = []   # reserved floor (in front of doors) is not furniture
    if style.wall_items[1] > 0:

        kept = add_wall_items(b, size, taken)
    for _ in range(int(rng.integers(style.n_objects[0], style.n_objects[1] + 1))):
        kind = choose(rng, style.furniture)
        w, d, h = _furniture_size(kind, rng, uniform(rng, style.size_scale))
        if rng.uniform() < 0.5:
            w, d = d, w
        rect = _place(rng, size, w, d, kind in _SNAP, taken)
        if rect is not None:
            _add_furniture(b, kind, rect, h, size, inst=b.new_instance())
            taken.append(rect)
            if kind in ("table", "desk") and style.chairs_at_tables:

                add_chairs(b, rect, size, taken)
    taken = [r for r in taken if not any(r is k for k in kept)]
    if style.lights != (1, 1) or style.clutter[1] > 0:

        add_clutter(b, size, taken)
        light = add_lamps(b, size)
        return b.build(size, room_materials, light, taken)
    if style.light == "point":
        light = np.array([size[0] * rng.uniform(0.3, 0.7), size[1] * rng.uniform(0.3, 0.7),
                          size[2] - 0.15])
    else:
        az, el = rng.uniform(0, 2 * math.pi), rng.uniform(math.radians(35), math.radians(70))
        light = np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
    return b.build(size, room_materials, light, taken)


def clearance(scene: Scene, xy: np.ndarray) -> np.ndarray:
    """Horizontal distance from each point (N, 2) to the nearest wall or furniture footprint."""
    walls = np.minimum(xy, scene.size[:2] - xy).min(axis=1)
    if len(scene.footprints) == 0:
        return walls
    f = scene.footprints[None]
    dx = np.maximum(np.maximum(f[..., 0] - xy[:, :1], xy[:, :1] - f[..., 2]), 0)
    dy = np.maximum(np.maximum(f[..., 1] - xy[:, 1:], xy[:, 1:] - f[..., 3]), 0)
    return np.minimum(walls, np.hypot(dx, dy).min(axis=1))


def _near_wall_view(scene: Scene, rng: np.random.Generator,
                    margin: float) -> tuple[float, ...] | None:
    """Camera 0.3-1.2 m in front of a free stretch of wall (``margin`` from furniture),
    target across the room (None if no such spot was found)."""
    size = scene.size
    xy = rng.uniform(0, 1, (256, 2)) * size[:2]
    wall = rng.integers(4, size=256)
    inset = rng.uniform(0.3, 1.2, 256)
    xy[:, 0] = np.where(wall == 0, inset, np.where(wall == 1, size[0] - inset, xy[:, 0]))
    xy[:, 1] = np.where(wall == 2, inset, np.where(wall == 3, size[1] - inset, xy[:, 1]))
    free = np.where(clearance(scene, xy) >= margin, inset, -1)   # clear of furniture
    if free.max() < 0:
        return None
    x, y = xy[int(np.argmax(free))]
    far = rng.uniform(0.45, 0.95, 2) * size[:2]                # in the far half of the room
    tx = far[0] if x < size[0] / 2 else size[0] - far[0]
    ty = far[1] if y < size[1] / 2 else size[1] - far[1]
    return float(x), float(y), float(tx), float(ty)


def sample_pose(scene: Scene, rng: np.random.Generator, margin: float | None = None,
                style: SceneStyle | None = None) -> CameraPose:
    """A camera at least ``margin`` (default: the style's ``camera_margin``, else 0.6 m)
    from walls and furniture (or as far as the room allows),
    1.1-1.6 m high, aimed (with 15 and 5 degree jitter) at a point 0.3-1.0 m above the
    floor inside a piece of furniture (or, one time in ten, anywhere in the room);
    pitch is kept within 5 degrees up to 30 down, so the view stays roughly level.

    A ``style`` may change the height and pitch ranges, roll the camera, and place a
    share of the views near a wall looking across the room (``camera_near_wall``)."""
    height, (lo, hi) = (1.1, 1.6), (-5.0, 30.0)
    if style is not None:
        height, (lo, hi) = style.camera_height, style.camera_pitch
    if margin is None:
        margin = 0.6 if style is None else style.camera_margin
    near_wall = style is not None and style.camera_near_wall > 0 \
        and rng.uniform() < style.camera_near_wall
    view = _near_wall_view(scene, rng, max(0.25, margin - 0.35)) if near_wall else None
    if view is not None:
        x, y, tx, ty = view
        z = uniform(rng, height)
    else:
        xy = rng.uniform(0, 1, (256, 2)) * scene.size[:2]
        free = clearance(scene, xy)
        ok = np.flatnonzero(free >= margin)
        x, y = xy[ok[0]] if len(ok) else xy[np.argmax(free)]
        z = uniform(rng, height)
        tx, ty = rng.uniform(0, 1, 2) * scene.size[:2]
        if len(scene.footprints) and rng.uniform() < 0.9:
            f = scene.footprints[rng.integers(len(scene.footprints))]
            tx, ty = rng.uniform(f[0], f[2]), rng.uniform(f[1], f[3])
    yaw = math.atan2(ty - y, tx - x) + rng.normal(0, math.radians(15))
    down = math.atan2(z - rng.uniform(0.3, 1.0), math.hypot(tx - x, ty - y))
    pitch = np.clip(down + rng.normal(0, math.radians(5)), math.radians(lo), math.radians(hi))
    roll = 0.0
    if style is not None and style.camera_roll > 0:
        roll = float(np.clip(rng.normal(0, style.camera_roll), -3 * style.camera_roll,
                             3 * style.camera_roll))
    return CameraPose(position=(float(x), float(y), z), yaw=float(yaw), pitch=float(pitch),
                      roll=math.radians(roll))


def sample_intrinsics(style: SceneStyle, rng: np.random.Generator, width: int,
                      height: int) -> Intrinsics:
    """Square pixels, principal point at the image centre, fx = style.focal * width."""
    f = uniform(rng, style.focal) * width
    return Intrinsics(fx=f, fy=f, cx=(width - 1) / 2, cy=(height - 1) / 2, width=width,
                      height=height)
