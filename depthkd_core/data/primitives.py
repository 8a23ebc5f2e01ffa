"""The primitives a procedural scene is made of, and the builder that collects them.

``Scene`` holds axis-aligned boxes, spheres and vertical cylinders with one class,
instance and ``Material`` each; ``SceneBuilder`` accumulates them (``scene`` lays out
the room, ``furnish`` the furniture) and freezes them into a ``Scene``.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np

from depthkd_core.data.styles import CLASS_IDS, SceneStyle, Weights

N_ROOM_FACES = 6  # parts 0..5: walls x=0, x=X, y=0, y=Y, then floor, ceiling


@dataclass(frozen=True)
class Material:
    """A solid procedural texture: ``kind`` mixes ``colour_a`` and ``colour_b``."""

    kind: str
    colour_a: tuple[float, float, float]
    colour_b: tuple[float, float, float]
    scale: float                          # cycles per metre
    axis: tuple[float, float, float]      # stripe normal / wood grain direction
    offset: tuple[float, float, float]    # pattern phase, metres
    seed: int
    emission: float = 0.0                 # light given off (windows, lamps), x albedo


@dataclass
class Scene:
    """Primitives in part order: 6 room faces, boxes, spheres, cylinders."""

    size: np.ndarray            # (3,) room extent
    box_lo: np.ndarray          # (K, 3)
    box_hi: np.ndarray          # (K, 3)
    spheres: np.ndarray         # (S, 4) centre xyz, radius
    cylinders: np.ndarray       # (C, 5) centre x, y, radius, z bottom, z top
    part_class: np.ndarray      # (P,) semantic class id
    part_instance: np.ndarray   # (P,) instance id, 1-based
    part_material: np.ndarray   # (P,) index into materials
    materials: list[Material]
    light: np.ndarray           # point: position (or (L, 3) positions); directional: unit
                                # vector to the light
    footprints: np.ndarray      # (F, 4) x0, y0, x1, y1 of everything on the floor


def choose(rng: np.random.Generator, weights: Weights) -> str:
    keys = [k for k, _ in weights]
    p = np.array([w for _, w in weights], dtype=np.float64)
    return keys[int(rng.choice(len(keys), p=p / p.sum()))]


def uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


class SceneBuilder:
    """Accumulates primitives and their labels, then freezes them into a ``Scene``."""

    def __init__(self, style: SceneStyle, rng: np.random.Generator) -> None:
        self.style, self.rng = style, rng
        self.boxes: list[tuple[np.ndarray, np.ndarray, int, int, int]] = []
        self.spheres: list[tuple[list[float], int, int, int]] = []
        self.cylinders: list[tuple[list[float], int, int, int]] = []
        self.materials: list[Material] = []
        self.surfaces: list[tuple[float, ...]] = []  # x0 y0 x1 y1 z, free height above
        self.instances = 0

    def colour(self, saturation: tuple[float, float], value: tuple[float, float]) -> tuple:
        hue, share = self.rng.uniform(), self.style.natural_colours
        if share and hue < share:          # wood, leather, terracotta: hue 0.03-0.13
            hue = 0.03 + 0.1 * hue / share
        elif share:
            hue = (hue - share) / (1 - share)
        rgb = colorsys.hsv_to_rgb(hue, uniform(self.rng, saturation),
                                  uniform(self.rng, value))
        return tuple(float(c) for c in rgb)

    def new_instance(self) -> int:
        self.instances += 1
        return N_ROOM_FACES + self.instances

    def material(self, textures: Weights, wall: bool = False, palette: tuple | None = None,
                 emission: float = 0.0) -> int:
        """A random material; ``palette`` (saturation, value, contrast) overrides the style's."""
        s = self.style
        sat, val, contrast = ((s.wall_saturation, s.wall_value, s.wall_contrast) if wall
                              else (s.saturation, s.value, s.contrast))
        if palette is not None:
            sat, val, contrast = palette
        kind = choose(self.rng, textures)
        a = self.colour(sat, val)
        if kind in ("checker", "stripes"):   # two palette colours
            b = self.colour(sat, val)
        else:                                # one colour, darker grain or blotches
            b = tuple(c * uniform(self.rng, contrast) for c in a)
        heading = self.rng.uniform(0, 2 * math.pi)
        axis = np.array([math.cos(heading), math.sin(heading), self.rng.uniform(-0.2, 0.2)])
        self.materials.append(Material(
            kind=kind, colour_a=a, colour_b=b, scale=uniform(self.rng, s.texture_scale),
            axis=tuple(float(x) for x in axis / np.linalg.norm(axis)),
            offset=tuple(float(x) for x in self.rng.uniform(0, 10, 3)),
            seed=int(self.rng.integers(2**31)), emission=emission))
        return len(self.materials) - 1

    def box(self, lo: list[float], hi: list[float], cls: str, inst: int, mat: int) -> None:
        self.boxes.append((np.asarray(lo, float), np.asarray(hi, float), CLASS_IDS[cls], inst, mat))

    def build(self, size: np.ndarray, room_materials: list[int], light: np.ndarray,
              footprints: list[np.ndarray]) -> Scene:
        room_class = [CLASS_IDS["wall"]] * 4 + [CLASS_IDS["floor"], CLASS_IDS["ceiling"]]
        labels = ([(c, i + 1, m) for i, (c, m) in enumerate(zip(room_class, room_materials))]
                  + [b[2:] for b in self.boxes] + [s[1:] for s in self.spheres]
                  + [c[1:] for c in self.cylinders])
        cls, inst, mat = (np.array(col, dtype=np.int32) for col in zip(*labels))
        return Scene(
            size=size,
            box_lo=np.array([b[0] for b in self.boxes]).reshape(-1, 3),
            box_hi=np.array([b[1] for b in self.boxes]).reshape(-1, 3),
            spheres=np.array([s[0] for s in self.spheres], dtype=float).reshape(-1, 4),
            cylinders=np.array([c[0] for c in self.cylinders], dtype=float).reshape(-1, 5),
            part_class=cls, part_instance=inst, part_material=mat, materials=self.materials,
            light=light, footprints=np.array(footprints, dtype=float).reshape(-1, 4))
