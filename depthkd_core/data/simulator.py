"""Procedural RGB-D simulator: frames, camera sequences, and datasets on disk.

numpy + OpenCV only (no torch), so ``depthkd simulate`` starts fast. The
dataset layout written here is documented in docs/data.md ("Dataset layout")
and read back by ``readers.SimFolder``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from depthkd_core.data.frame import (Frame, intrinsics_to_dict, write_depth_png, write_png,
                                     write_rgb)
from depthkd_core.data.render import render_view
from depthkd_core.data.scene import CameraPose, make_scene, sample_intrinsics, sample_pose
from depthkd_core.data.styles import CLASS_NAMES, STYLES, SceneStyle, get_style

__all__ = ["CLASS_NAMES", "DEPTH_SCALE", "STYLES", "SceneStyle", "frame_seed", "render_frame",
           "render_sequence", "write_dataset"]

DEPTH_SCALE = 1000.0  # depth PNG units per metre (millimetres)
LAYOUT_VERSION = 1


def _check_size(height: int, width: int) -> None:
    if height < 8 or width < 8:
        raise ValueError(f"image size must be at least 8x8, got {width}x{height}")


def render_frame(style: str | SceneStyle, seed: int, height: int = 240,
                 width: int = 320) -> Frame:
    """One random room, camera and image of ``style``; identical for identical arguments."""
    _check_size(height, width)
    style = get_style(style)
    rng = np.random.default_rng(seed)
    scene = make_scene(style, rng)
    K = sample_intrinsics(style, rng, width, height)
    pose = sample_pose(scene, rng, style=style)
    return render_view(scene, pose, K, style, rng, name=f"{style.name}_{seed}")


def render_sequence(style: str | SceneStyle, seed: int, n: int, height: int = 240,
                    width: int = 320) -> list[Frame]:
    """``n`` frames of one room from a smoothly moving camera.

    The camera travels a quarter circle of radius 0.3 m while turning 30-60 degrees
    and nodding gently: about 0.5 m and 45 degrees over the whole sequence.
    """
    _check_size(height, width)
    if n < 1:
        raise ValueError(f"a sequence needs n >= 1 frames, got {n}")
    style = get_style(style)
    rng = np.random.default_rng(seed)
    scene = make_scene(style, rng)
    K = sample_intrinsics(style, rng, width, height)
    radius = 0.3
    start = sample_pose(scene, rng, margin=style.camera_margin + 2 * radius, style=style)
    phase = rng.uniform(0, 2 * math.pi)
    turn = rng.choice([-1.0, 1.0]) * rng.uniform(math.radians(30), math.radians(60))
    frames = []
    for i, s in enumerate(np.linspace(0.0, 1.0, n)):
        angle = phase + s * math.pi / 2
        x = start.position[0] + radius * (math.cos(angle) - math.cos(phase))
        y = start.position[1] + radius * (math.sin(angle) - math.sin(phase))
        pose = CameraPose(position=(x, y, start.position[2]), yaw=start.yaw + s * turn,
                          pitch=start.pitch + math.radians(3) * math.sin(2 * math.pi * s),
                          roll=start.roll)
        noise_rng = np.random.default_rng([seed, i])
        frames.append(render_view(scene, pose, K, style, noise_rng,
                                  name=f"{style.name}_{seed}_{i:06d}"))
    return frames


def frame_seed(seed: int, index: int) -> int:
    """The ``render_frame`` seed of frame ``index`` in ``write_dataset(..., seed=seed)``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _init_worker() -> None:
    # The pool already fills the cores; OpenCV's own threads would only contend.
    cv2.setNumThreads(1)


def _write_frame(task: tuple[Path, str, int, int, int, int]) -> dict[str, float]:
    """Render and store one frame; returns its intrinsics as a dict."""
    out, style, seed, index, height, width = task
    return _store_frame(out, index, render_frame(style, frame_seed(seed, index), height, width))


def _store_frame(out: Path, index: int, frame: Frame) -> dict[str, float]:
    stem = f"{index:06d}.png"
    write_rgb(out / "rgb" / stem, frame.rgb)
    write_depth_png(out / "depth" / stem, frame.depth, DEPTH_SCALE)
    write_png(out / "semantic" / stem, frame.semantic.astype(np.uint8))
    write_png(out / "instance" / stem, frame.instance.astype(np.uint16))
    return intrinsics_to_dict(frame.intrinsics)


def write_dataset(out_dir: str | Path, style: str, n: int, height: int = 240, width: int = 320,
                  seed: int = 0, workers: int = 2, sequence: bool = False) -> Path:
    """Render ``n`` frames into ``out_dir`` (layout in docs/data.md); returns the folder.

    Frame i equals ``render_frame(style, frame_seed(seed, i), height, width)``, or with
    ``sequence`` frame i of ``render_sequence(style, seed, n, height, width)`` (a clip).
    ``style`` may join several with "+" ("target+indoor"): frame i is then in style
    ``i % k``, a transfer set that spans k looks (not for a sequence).
    """
    _check_size(height, width)
    styles = [get_style(name) for name in style.split("+")] if isinstance(style, str) else [get_style(style)]
    style_obj = styles[0]
    if sequence and len(styles) > 1:
        raise ValueError(f"a sequence is one clip in one style, got {style!r}")
    if n < 1:
        raise ValueError(f"a dataset needs n >= 1 frames, got {n}")
    out = Path(out_dir)
    for sub in ("rgb", "depth", "semantic", "instance"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    joined = "+".join(st.name for st in styles)
    tasks = [(out, styles[i % len(styles)].name, seed, i, height, width) for i in range(n)]
    progress = dict(total=n, desc=f"simulate {joined}", unit="frame")
    if sequence:
        frames = render_sequence(style_obj, seed, n, height, width)
        cams = [_store_frame(out, i, f) for i, f in enumerate(tqdm(frames, **progress))]
    elif workers > 1 and n >= 4 * workers:
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker) as pool:
            cams = list(tqdm(pool.imap(_write_frame, tasks, chunksize=8), **progress))
    else:
        cams = [_write_frame(task) for task in tqdm(tasks, **progress)]
    if all(c == cams[0] for c in cams):
        intrinsics: dict = cams[0]
    else:
        intrinsics = {"frames": {f"{i:06d}": c for i, c in enumerate(cams)}}
    (out / "intrinsics.json").write_text(json.dumps(intrinsics, indent=1))
    meta = {"format": "depthkd-sim", "version": LAYOUT_VERSION, "style": joined,
            "n": n, "seed": seed, "sequence": sequence, "height": height, "width": width,
            "depth_scale": DEPTH_SCALE,
            "classes": {str(i): name for i, name in enumerate(CLASS_NAMES)},
            "intrinsics": "per_dataset" if "frames" not in intrinsics else "per_frame"}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--style", required=True,
                        help=f"{', '.join(sorted(STYLES))}, or several joined by + "
                             "(frame i in the (i mod k)-th)")
    parser.add_argument("--n", type=int, required=True, help="number of frames")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="rendering processes")
    parser.add_argument("--sequence", action="store_true",
                        help="one room seen from a smoothly moving camera (a clip)")


def run_cli(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = write_dataset(args.out, args.style, args.n, args.height, args.width, args.seed,
                        args.workers, args.sequence)
    seconds = time.perf_counter() - start
    # the simulator's speed, the figure to watch when a style gains effects
    print(f"wrote {args.n} {args.style} frames to {out} in {seconds:.1f} s "
          f"({args.n / seconds:.1f} frames/s, {args.workers} worker(s))")
    return 0
