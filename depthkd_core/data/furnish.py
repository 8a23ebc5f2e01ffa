"""Furnishing of the ``indoor`` style: more furniture kinds, wall items, clutter and lamps.

Real rooms (NYU Depth v2) are full: chairs, sofas, desks, wardrobes, kitchen
counters, doors, windows and pictures, and many small objects on every
surface. Their known sizes are what lets a monocular network judge metric
depth, so every item here has a real-world size range (metres).
"""

from __future__ import annotations

import numpy as np

from depthkd_core.data.primitives import SceneBuilder, uniform
from depthkd_core.data.styles import CLASS_IDS

WOOD = (("wood", 0.6), ("noise", 0.3), ("flat", 0.1))
FABRIC = (("noise", 0.6), ("flat", 0.25), ("stripes", 0.1), ("checker", 0.05))
OBJECTS = (("flat", 0.45), ("noise", 0.35), ("stripes", 0.2))
BOOKS = (("stripes", 1.0),)
COLOURFUL = ((0.15, 0.85), (0.15, 0.95), (0.55, 0.9))   # saturation, value, contrast
DARK = ((0.0, 0.1), (0.03, 0.15), (0.7, 0.95))          # screens, frames, handles
BRIGHT = ((0.0, 0.15), (0.85, 1.0), (0.9, 1.0))         # window light, lamp panels


def wall_side(r: np.ndarray, room: np.ndarray) -> int:
    """Side of footprint ``r`` nearest a wall: 0 x-low, 1 x-high, 2 y-low, 3 y-high."""
    x0, y0, x1, y1 = r
    return int(np.argmin([x0, room[0] - x1, y0, room[1] - y1]))


def _panel(r: np.ndarray, side: int, t: float, z0: float, z1: float) -> tuple[list, list]:
    """Box of thickness ``t`` along ``side`` of footprint ``r``, from z0 to z1."""
    x0, y0, x1, y1 = r
    return ([[x0, y0, z0], [x0 + t, y1, z1]], [[x1 - t, y0, z0], [x1, y1, z1]],
            [[x0, y0, z0], [x1, y0 + t, z1]], [[x0, y1 - t, z0], [x1, y1, z1]])[side]


def _legs(b: SceneBuilder, r: np.ndarray, top: float, leg: float, cls: str, inst: int,
          mat: int) -> None:
    x0, y0, x1, y1 = r
    for lx, ly in ((x0, y0), (x1 - leg, y0), (x0, y1 - leg), (x1 - leg, y1 - leg)):
        b.box([lx, ly, 0], [lx + leg, ly + leg, top], cls, inst, mat)


def add_furniture(b: SceneBuilder, kind: str, r: np.ndarray, h: float, room: np.ndarray,
                  inst: int, mat: int) -> None:
    """Primitives of a chair, sofa, desk, wardrobe or kitchen counter on footprint ``r``."""
    x0, y0, x1, y1 = r
    side = wall_side(r, room)
    if kind == "chair":
        seat = uniform(b.rng, (0.42, 0.48))
        _legs(b, r, seat - 0.04, 0.035, "chair", inst, mat)
        b.box([x0, y0, seat - 0.04], [x1, y1, seat], "chair", inst, mat)
        lo, hi = _panel(r, int(b.rng.integers(4)), 0.04, seat, h)
        b.box(lo, hi, "chair", inst, mat)
    elif kind == "sofa":
        fabric = b.material(FABRIC)
        seat = uniform(b.rng, (0.4, 0.46))
        b.box([x0, y0, 0], [x1, y1, seat], "sofa", inst, fabric)
        b.box(*_panel(r, side, 0.22, seat, h), "sofa", inst, fabric)
        arms = (2, 3) if side < 2 else (0, 1)
        for arm in arms:
            b.box(*_panel(r, arm, 0.16, seat, seat + 0.2), "sofa", inst, fabric)
    elif kind == "desk":
        top = 0.03
        b.box([x0, y0, h - top], [x1, y1, h], "table", inst, mat)
        _legs(b, r, h - top, 0.05, "table", inst, mat)
        drawers = np.array([x0, y0, x0 + 0.42, y1]) if (x1 - x0) > (y1 - y0) \
            else np.array([x0, y0, x1, y0 + 0.42])
        b.box([drawers[0], drawers[1], 0.05], [drawers[2], drawers[3], h - top], "table",
              inst, mat)
        b.surfaces.append((x0, y0, x1, y1, h, 0.6))
    elif kind == "wardrobe":
        b.box([x0, y0, 0], [x1, y1, h], "cabinet", inst, mat)
        add_fronts(b, r, side ^ 1, 0.02, h - 0.02, inst, handle=1.05)
        b.surfaces.append((x0, y0, x1, y1, h, min(0.4, room[2] - h - 0.05)))
    else:   # counter: base cabinets, a stone top, wall cabinets above
        stone = b.material((("noise", 0.7), ("flat", 0.3)), palette=((0.0, 0.15), (0.2, 0.95),
                                                                      (0.7, 0.95)))
        b.box([x0, y0, 0.1], [x1, y1, h - 0.04], "cabinet", inst, mat)
        depth = (x1 - x0) if side < 2 else (y1 - y0)
        b.box(*_panel(r, side, depth - 0.06, 0.0, 0.1), "cabinet", inst,
              b.material(OBJECTS, palette=DARK))
        add_fronts(b, r, side ^ 1, 0.12, h - 0.06, inst, handle=h - 0.14)
        b.box([x0 - 0.02, y0 - 0.02, h - 0.04], [x1 + 0.02, y1 + 0.02, h], "cabinet", inst, stone)
        b.surfaces.append((x0, y0, x1, y1, h, 0.45))
        if room[2] > 2.3 and b.rng.uniform() < 0.7:
            top = min(2.2, room[2] - 0.05)
            upper = _panel(r, side, 0.35, 1.45, top)
            b.box(*upper, "cabinet", inst, mat)
            face = np.array([upper[0][0], upper[0][1], upper[1][0], upper[1][1]])
            add_fronts(b, face, side ^ 1, 1.47, top - 0.02, inst, handle=1.52)


def _on_face(r: np.ndarray, face: int, u0: float, u1: float, z0: float, z1: float,
             out: float) -> tuple[list, list]:
    """A box standing ``out`` proud of side ``face`` of footprint ``r``, spanning u0..u1
    along that side (y for faces 0/1, x for faces 2/3) and z0..z1."""
    x0, y0, x1, y1 = r
    return ([[x0 - out, u0, z0], [x0, u1, z1]], [[x1, u0, z0], [x1 + out, u1, z1]],
            [[u0, y0 - out, z0], [u1, y0, z1]], [[u0, y1, z0], [u1, y1 + out, z1]])[face]


def add_fronts(b: SceneBuilder, r: np.ndarray, face: int, z0: float, z1: float, inst: int,
               handle: float) -> None:
    """Doors about 0.5 m wide on side ``face``: dark gaps between them and a handle each,
    its centre at height ``handle`` (handles are ~12 cm: a cue to real size)."""
    if not b.style.furniture_fronts:
        return
    lo, hi = (r[1], r[3]) if face < 2 else (r[0], r[2])
    n = max(1, round((hi - lo) / 0.5))
    edges = np.linspace(lo, hi, n + 1)
    gap = b.material((("flat", 1.0),), palette=DARK)
    metal = b.material((("flat", 1.0),), palette=((0.0, 0.1), (0.15, 0.9), (0.9, 1.0)))
    for k in range(n):
        if k:
            b.box(*_on_face(r, face, edges[k] - 0.005, edges[k] + 0.005, z0, z1, 0.004),
                  "cabinet", inst, gap)
        u = edges[k + 1] - 0.08 if k % 2 == 0 else edges[k] + 0.06
        hz = float(np.clip(handle, z0 + 0.08, z1 - 0.08))
        b.box(*_on_face(r, face, u, u + 0.02, hz - 0.06, hz + 0.06, 0.03), "cabinet", inst,
              metal)


def add_chairs(b: SceneBuilder, table: np.ndarray, room: np.ndarray,
               taken: list[np.ndarray]) -> None:
    """With the style's chance, 1-4 chairs at the long sides of ``table``, backs outward
    (chair side 0 lies below the table's low edge, so its back is that footprint's low side)."""
    rng = b.rng
    if rng.uniform() >= b.style.chairs_at_tables:
        return
    x0, y0, x1, y1 = table
    along_x = (x1 - x0) >= (y1 - y0)
    others = [r for r in taken if r is not table]
    for _ in range(int(rng.integers(1, 5))):
        w, h = uniform(rng, (0.42, 0.5)), uniform(rng, (0.8, 0.95))
        gap, side = uniform(rng, (-0.1, 0.15)), int(rng.integers(2))
        if along_x:
            cx = uniform(rng, (x0, max(x0, x1 - w)))
            cy = y0 - gap - w if side == 0 else y1 + gap
            rect, back = np.array([cx, cy, cx + w, cy + w]), 2 + side
        else:
            cy = uniform(rng, (y0, max(y0, y1 - w)))
            cx = x0 - gap - w if side == 0 else x1 + gap
            rect, back = np.array([cx, cy, cx + w, cy + w]), side
        if rect[0] < 0.03 or rect[1] < 0.03 or rect[2] > room[0] - 0.03 \
                or rect[3] > room[1] - 0.03 or not _fits(rect, others):
            continue
        inst, mat = b.new_instance(), b.material(b.style.object_textures)
        seat = uniform(rng, (0.42, 0.48))
        _legs(b, rect, seat - 0.04, 0.035, "chair", inst, mat)
        b.box([rect[0], rect[1], seat - 0.04], [rect[2], rect[3], seat], "chair", inst, mat)
        b.box(*_panel(rect, back, 0.04, seat, h), "chair", inst, mat)
        others.append(rect)
        taken.append(rect)


def _wall_box(size: np.ndarray, wall: int, u0: float, u1: float, z0: float, z1: float,
              out: float) -> tuple[list, list]:
    """A box on ``wall`` (0 x=0, 1 x=X, 2 y=0, 3 y=Y) spanning u0..u1 along it, ``out`` deep."""
    X, Y = size[0], size[1]
    return ([[0, u0, z0], [out, u1, z1]], [[X - out, u0, z0], [X, u1, z1]],
            [[u0, 0, z0], [u1, out, z1]], [[u0, Y - out, z0], [u1, Y, z1]])[wall]


def add_wall_items(b: SceneBuilder, size: np.ndarray, taken: list[np.ndarray]) -> list[np.ndarray]:
    """Baseboards, then doors, windows and pictures; returns the floor kept free in front of
    doors (also appended to ``taken`` so furniture avoids it)."""
    rng, style = b.rng, b.style
    board = b.material((("flat", 1.0),), palette=((0.0, 0.1), (0.5, 0.95), (0.9, 1.0)))
    for wall in range(4):
        length = size[1] if wall < 2 else size[0]
        b.box(*_wall_box(size, wall, 0, length, 0, 0.08, 0.012), "wall", b.new_instance(),
              board)
    kept: list[np.ndarray] = []
    spans: list[tuple[int, float, float]] = []
    for _ in range(int(rng.integers(style.wall_items[0], style.wall_items[1] + 1))):
        kind = ("door", "window", "picture")[int(rng.choice(3, p=[0.3, 0.25, 0.45]))]
        wall = int(rng.integers(4))
        length = size[1] if wall < 2 else size[0]
        if kind == "door":
            w, z0, z1, out = uniform(rng, (0.8, 0.95)), 0.0, uniform(rng, (2.0, 2.1)), 0.04
            mat = b.material(WOOD)
        elif kind == "window":
            w, z0 = uniform(rng, (0.8, 1.8)), uniform(rng, (0.75, 1.0))
            z1, out = min(z0 + uniform(rng, (1.0, 1.5)), size[2] - 0.2), 0.02
            mat = b.material((("noise", 0.5), ("flat", 0.5)), palette=BRIGHT,
                             emission=uniform(rng, (0.6, 1.6)))
        else:
            w = uniform(rng, (0.3, 1.0))
            mid, tall = uniform(rng, (1.3, 1.8)), uniform(rng, (0.25, 0.8))
            z0, z1, out = mid - tall / 2, mid + tall / 2, 0.025
            mat = b.material(OBJECTS, palette=COLOURFUL)
        if w > length - 0.4:
            continue
        u0 = uniform(rng, (0.2, length - w - 0.2))
        if any(s == wall and u0 < e + 0.15 and s0 < u0 + w + 0.15 for s, s0, e in spans):
            continue
        spans.append((wall, u0, u0 + w))
        inst = b.new_instance()
        b.box(*_wall_box(size, wall, u0, u0 + w, z0, z1, out), kind, inst, mat)
        if kind != "picture":   # a frame (door casing, window sill) in a second material
            frame = b.material((("flat", 1.0),), palette=((0.0, 0.1), (0.6, 0.95), (0.9, 1.0)))
            if z0 > 0:   # window sill
                b.box(*_wall_box(size, wall, u0 - 0.06, u0 + w + 0.06, z0 - 0.04, z0, 0.12),
                      kind, inst, frame)
            b.box(*_wall_box(size, wall, u0 - 0.06, u0 + w + 0.06, z1, z1 + 0.06, out + 0.01),
                  kind, inst, frame)
        if kind == "door":
            lo, hi = _wall_box(size, wall, u0, u0 + w, 0, 1, 0.9)
            kept.append(np.array([lo[0], lo[1], hi[0], hi[1]]))
            taken.append(kept[-1])
    return kept


def _fits(rect: np.ndarray, placed: list[np.ndarray]) -> bool:
    if not placed:
        return True
    t = np.array(placed)
    return not np.any((rect[0] < t[:, 2] + 0.02) & (t[:, 0] < rect[2] + 0.02)
                      & (rect[1] < t[:, 3] + 0.02) & (t[:, 1] < rect[3] + 0.02))


def _book_row(b: SceneBuilder, s: tuple[float, ...]) -> None:
    """Books along a shelf board: 2-4 runs of spines (stripes across the board)."""
    x0, y0, x1, y1, z, free = s
    along_x = (x1 - x0) >= (y1 - y0)
    length, depth = (x1 - x0, y1 - y0) if along_x else (y1 - y0, x1 - x0)
    u = (x0 if along_x else y0) + uniform(b.rng, (0.0, 0.15))
    end = (x1 if along_x else y1)
    for _ in range(int(b.rng.integers(2, 5))):
        run = uniform(b.rng, (0.1, 0.5))
        if u + run > end or free < 0.14:
            break
        top = z + uniform(b.rng, (0.13, min(0.32, free - 0.01)))
        d = min(depth, uniform(b.rng, (0.14, 0.24)))
        v0 = (y0 if along_x else x0) + (depth - d) / 2
        lo, hi = (([u, v0, z], [u + run, v0 + d, top]) if along_x
                  else ([v0, u, z], [v0 + d, u + run, top]))
        b.box(lo, hi, "object", b.new_instance(), b.material(BOOKS, palette=COLOURFUL))
        u += run + uniform(b.rng, (0.0, 0.3))


def _item(b: SceneBuilder, on_floor: bool) -> tuple[str, float, float, float]:
    """Kind and size (w, d, h) of one household object."""
    rng = b.rng
    if on_floor:
        kind = ("box", "bin", "ball")[int(rng.choice(3, p=[0.6, 0.3, 0.1]))]
        if kind == "box":
            return (kind, uniform(rng, (0.2, 0.6)), uniform(rng, (0.2, 0.5)),
                    uniform(rng, (0.1, 0.6)))
        if kind == "bin":
            r = uniform(rng, (0.1, 0.2))
            return kind, 2 * r, 2 * r, uniform(rng, (0.25, 0.5))
        r = uniform(rng, (0.08, 0.15))
        return kind, 2 * r, 2 * r, 2 * r
    kind = ("box", "bottle", "ball", "screen")[int(rng.choice(4, p=[0.45, 0.35, 0.1, 0.1]))]
    if kind == "box":   # books, boxes, appliances
        return (kind, uniform(rng, (0.1, 0.45)), uniform(rng, (0.1, 0.35)),
                uniform(rng, (0.03, 0.3)))
    if kind == "bottle":   # bottles, cups, vases, lamps
        r = uniform(rng, (0.03, 0.09))
        return kind, 2 * r, 2 * r, uniform(rng, (0.08, 0.4))
    if kind == "ball":   # fruit, balls
        r = uniform(rng, (0.04, 0.12))
        return kind, 2 * r, 2 * r, 2 * r
    return kind, uniform(rng, (0.4, 0.75)), 0.06, uniform(rng, (0.28, 0.48))   # a screen


def add_clutter(b: SceneBuilder, size: np.ndarray, furniture: list[np.ndarray]) -> None:
    """Books on shelves, then small objects on furniture tops and on the floor."""
    rng, style = b.rng, b.style
    tops = []
    for s in b.surfaces:
        if s[5] < 0.3 and rng.uniform() < 0.85:   # a shelf board
            _book_row(b, s)
        else:
            tops.append(s)
    floor = (0.05, 0.05, size[0] - 0.05, size[1] - 0.05, 0.0, size[2])
    surfaces = tops + [floor]
    area = np.array([(s[2] - s[0]) * (s[3] - s[1]) for s in tops] + [0.0])
    area[-1] = 0.5 * area[:-1].sum() + 1.0   # about a third of the objects on the floor
    placed: list[list[np.ndarray]] = [[] for _ in surfaces]
    for _ in range(int(rng.integers(style.clutter[0], style.clutter[1] + 1))):
        k = int(rng.choice(len(surfaces), p=area / area.sum()))
        x0, y0, x1, y1, z, free = surfaces[k]
        kind, w, d, h = _item(b, k == len(tops))
        if rng.uniform() < 0.5:
            w, d = d, w
        if w > x1 - x0 or d > y1 - y0 or h > free:
            continue
        px, py = uniform(rng, (x0, x1 - w)), uniform(rng, (y0, y1 - d))
        rect = np.array([px, py, px + w, py + d])
        if not _fits(rect, placed[k] + (furniture if k == len(tops) else [])):
            continue
        placed[k].append(rect)
        palette = DARK if kind == "screen" else COLOURFUL
        mat, inst = b.material(OBJECTS, palette=palette), b.new_instance()
        cx, cy = px + w / 2, py + d / 2
        if kind in ("bottle", "bin"):
            b.cylinders.append(([cx, cy, w / 2, z, z + h], CLASS_IDS["object"], inst, mat))
        elif kind == "ball":
            b.spheres.append(([cx, cy, z + w / 2, w / 2], CLASS_IDS["object"], inst, mat))
        else:
            b.box([px, py, z], [px + w, py + d, z + h], "object", inst, mat)


def add_lamps(b: SceneBuilder, size: np.ndarray) -> np.ndarray:
    """Ceiling lights: (L, 3) positions, each under a glowing ceiling panel."""
    rng, style = b.rng, b.style
    n = int(rng.integers(style.lights[0], style.lights[1] + 1))
    lights = []
    for _ in range(n):
        x, y = rng.uniform(0.2, 0.8) * size[0], rng.uniform(0.2, 0.8) * size[1]
        half = uniform(rng, (0.12, 0.3))
        top = size[2]
        b.box([x - half, y - half, top - 0.05], [x + half, y + half, top], "lamp",
              b.new_instance(), b.material((("flat", 1.0),), palette=BRIGHT, emission=1.5))
        lights.append([x, y, top - 0.25])
    return np.array(lights, dtype=float).reshape(-1, 3)


__all__ = ["add_clutter", "add_furniture", "add_lamps", "add_wall_items"]
