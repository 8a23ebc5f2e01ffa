"""Scene styles (domains) of the procedural simulator, and its fixed class ids.

``target`` stands in for a real indoor camera (muted palettes, wood and noise
textures, soft point light, sensor noise and blur); ``sim`` is a clearly
different synthetic domain (saturated palettes, flat/checker/stripe textures,
more boxes and balls of varied size, a harsh directional light, a clean image).
``indoor`` is the transfer set for real indoor teachers (NYU-trained): rooms,
furniture, clutter, lamps and a consumer camera after real indoor scenes; its
extra fields (defaults keep ``target`` and ``sim`` frame for frame) are read by
scene.py, furnish.py, shading.py and camera_effects.py. See docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthkd_core.data.camera_effects import CameraEffects

# Semantic class ids written to semantic/*.png; the index is the id.
CLASS_NAMES: tuple[str, ...] = (
    "wall", "floor", "ceiling", "table", "shelf", "bed", "cabinet", "sphere", "cylinder",
    "chair", "sofa", "object", "door", "window", "picture", "lamp",
)
CLASS_IDS: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

TEXTURES = ("flat", "checker", "stripes", "noise", "wood", "planks", "tiles")
FURNITURE = ("table", "shelf", "bed", "cabinet", "sphere", "cylinder",
             "chair", "sofa", "desk", "wardrobe", "counter")

Weights = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class SceneStyle:
    """Everything that makes one domain look like itself; ranges are (low, high)."""

    name: str
    saturation: tuple[float, float]        # HSV saturation of object colours
    value: tuple[float, float]             # HSV value of object colours
    wall_saturation: tuple[float, float]
    wall_value: tuple[float, float]
    contrast: tuple[float, float]          # value ratio of a texture's second colour
    wall_contrast: tuple[float, float]
    object_textures: Weights
    floor_textures: Weights
    wall_textures: Weights
    texture_scale: tuple[float, float]     # pattern frequency, cycles per metre
    furniture: Weights                     # relative frequency of each furniture kind
    n_objects: tuple[int, int]
    size_scale: tuple[float, float]        # multiplies every furniture dimension
    room_size: tuple[float, float]         # floor side lengths, metres
    room_height: tuple[float, float]
    light: str                             # "point" (ceiling lamp) or "directional"
    ambient: float
    light_intensity: float
    light_colour: tuple[float, float, float]
    noise_std: float                       # sensor noise, in [0, 1] intensity units
    blur: bool                             # 3x3 binomial optical blur
    vignetting: float                      # brightness loss at the image corners
    focal: tuple[float, float]             # fx / width
    # Added for the indoor style; the defaults reproduce target and sim exactly.
    natural_colours: float = 0.0           # share of colours with warm wood-like hues
    camera_height: tuple[float, float] = (1.1, 1.6)    # metres above the floor
    camera_pitch: tuple[float, float] = (-5.0, 30.0)   # clip, degrees (> 0 looks down)
    camera_roll: float = 0.0               # std of the camera roll, degrees (hand-held)
    camera_margin: float = 0.6             # least distance to walls and furniture, metres
    camera_near_wall: float = 0.0          # share of views from near a wall, across the room
    lights: tuple[int, int] = (1, 1)       # number of ceiling point lights
    occlusion: float = 0.0                 # ambient occlusion in room corners / under furniture
    gloss: float = 0.0                     # strength of the lamps' highlights (Blinn-Phong)
    shadows: int = 0                       # soft shadows of the ceiling lights, traced every
                                           # n-th pixel (0: none)
    clutter: tuple[int, int] = (0, 0)      # small objects on furniture tops and the floor
    chairs_at_tables: float = 0.0          # chance of 1-4 chairs pulled up to a table or desk
    furniture_fronts: bool = False         # cabinet doors with gaps and handles
    wall_items: tuple[int, int] = (0, 0)   # doors, windows and pictures on the walls
    effects: CameraEffects | None = None   # camera pipeline; None: noise_std/blur/vignetting

    def __post_init__(self) -> None:
        for name, weights, known in (("object_textures", self.object_textures, TEXTURES),
                                     ("floor_textures", self.floor_textures, TEXTURES),
                                     ("wall_textures", self.wall_textures, TEXTURES),
                                     ("furniture", self.furniture, FURNITURE)):
            unknown = [key for key, _ in weights if key not in known]
            if unknown:
                raise ValueError(f"style {self.name}: unknown {name} {unknown}; known: {known}")
        if self.effects is not None and (self.noise_std or self.blur or self.vignetting):
            raise ValueError(f"style {self.name}: with effects, set noise_std=0, blur=False "
                             "and vignetting=0 (the effects hold the camera)")
        if self.light not in ("point", "directional"):
            raise ValueError(f"style {self.name}: light must be point or directional, "
                             f"got {self.light!r}")


STYLES: dict[str, SceneStyle] = {
    "target": SceneStyle(
        name="target",
        saturation=(0.08, 0.4), value=(0.35, 0.8),
        wall_saturation=(0.02, 0.12), wall_value=(0.7, 0.9),
        contrast=(0.6, 0.85), wall_contrast=(0.85, 0.95),
        object_textures=(("wood", 0.45), ("noise", 0.45), ("flat", 0.1)),
        floor_textures=(("wood", 0.6), ("noise", 0.4)),
        wall_textures=(("noise", 0.7), ("flat", 0.3)),
        texture_scale=(2.0, 6.0),
        furniture=(("table", 0.3), ("shelf", 0.2), ("bed", 0.2), ("cabinet", 0.2),
                   ("sphere", 0.05), ("cylinder", 0.05)),
        n_objects=(3, 6), size_scale=(0.9, 1.1),
        room_size=(3.5, 6.0), room_height=(2.5, 2.9),
        light="point", ambient=0.45, light_intensity=0.8, light_colour=(1.0, 0.92, 0.8),
        noise_std=2.0 / 255, blur=True, vignetting=0.2,
        focal=(0.85, 0.85),
    ),
    "sim": SceneStyle(
        name="sim",
        saturation=(0.75, 1.0), value=(0.75, 1.0),
        wall_saturation=(0.5, 0.9), wall_value=(0.6, 1.0),
        contrast=(0.3, 0.6), wall_contrast=(0.3, 0.6),
        object_textures=(("flat", 0.4), ("checker", 0.4), ("stripes", 0.2)),
        floor_textures=(("checker", 0.7), ("flat", 0.3)),
        wall_textures=(("flat", 0.5), ("stripes", 0.3), ("checker", 0.2)),
        texture_scale=(1.0, 4.0),
        furniture=(("cabinet", 0.35), ("sphere", 0.25), ("cylinder", 0.2), ("table", 0.1),
                   ("shelf", 0.05), ("bed", 0.05)),
        n_objects=(4, 9), size_scale=(0.6, 1.5),
        room_size=(4.0, 8.0), room_height=(2.6, 3.4),
        light="directional", ambient=0.25, light_intensity=1.1, light_colour=(1.0, 1.0, 1.0),
        noise_std=0.0, blur=False, vignetting=0.0,
        focal=(0.8, 1.0),
    ),
    "indoor": SceneStyle(
        name="indoor",
        saturation=(0.05, 0.45), value=(0.25, 0.85),
        wall_saturation=(0.0, 0.15), wall_value=(0.6, 0.95),
        contrast=(0.6, 0.9), wall_contrast=(0.88, 0.97),
        object_textures=(("wood", 0.4), ("noise", 0.4), ("flat", 0.15), ("stripes", 0.05)),
        floor_textures=(("planks", 0.4), ("tiles", 0.15), ("noise", 0.45)),
        wall_textures=(("noise", 0.7), ("flat", 0.3)),
        texture_scale=(2.0, 6.0),
        furniture=(("table", 0.13), ("desk", 0.1), ("chair", 0.2), ("shelf", 0.1),
                   ("bed", 0.08), ("cabinet", 0.12), ("sofa", 0.09), ("wardrobe", 0.08),
                   ("counter", 0.07)),
        n_objects=(4, 10), size_scale=(0.9, 1.1),
        room_size=(3.0, 6.0), room_height=(2.4, 2.9),
        light="point", ambient=0.4, light_intensity=0.9, light_colour=(1.0, 0.93, 0.82),
        noise_std=0.0, blur=False, vignetting=0.0,
        focal=(0.84, 0.94),
        natural_colours=0.6,
        camera_height=(1.3, 1.7), camera_pitch=(-5.0, 25.0), camera_roll=3.0, camera_margin=1.2,
        camera_near_wall=0.3, chairs_at_tables=0.3, furniture_fronts=True, lights=(1, 3),
        occlusion=0.6, shadows=4, gloss=0.3, clutter=(10, 40), wall_items=(2, 6),
        effects=CameraEffects(
            auto_exposure=(0.35, 0.5), exposure=(-0.3, 0.3), white_balance=(-0.06, 0.1),
            tint=(-0.03, 0.03),
            vignetting=(0.1, 0.35), gamma=(0.9, 1.1), highlight_knee=0.8,
            blur_sigma=(0.0, 0.4), motion_blur=(2.0, 5.0), motion_probability=0.1,
            read_noise=(0.004, 0.012), shot_noise=(0.0005, 0.003), chroma_noise=0.3,
            jpeg_quality=(70, 95)),
    ),
}


def get_style(style: str | SceneStyle) -> SceneStyle:
    """A style by name (or a ``SceneStyle`` passed through)."""
    if isinstance(style, SceneStyle):
        return style
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; known: {', '.join(STYLES)}")
    return STYLES[style]
