"""A consumer camera's image pipeline applied to a rendered (linear-ish) RGB image.

The renderer produces a clean float image in [0, 1]; a real camera (Kinect,
phone, webcam) exposes it, tints it with its white balance, loses light at the
corners, blurs it (optics, focus, a little hand motion), adds photon and read
noise, and stores it as JPEG. ``CameraEffects`` holds the *ranges* of each
effect; ``apply_camera`` draws one value per range from the frame's generator,
so a frame's effects are fixed by its seed and differ between seeds.
Everything is whole-image numpy/OpenCV work (no per-pixel Python).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

Range = tuple[float, float]


@dataclass(frozen=True)
class CameraEffects:
    """Ranges (low, high) of a camera's effects; each frame draws one value of each."""

    auto_exposure: Range = (0.0, 0.0)     # mean brightness auto-exposure aims at (0: off)
    exposure: Range = (0.0, 0.0)          # exposure error on top, stops (2**ev gain)
    white_balance: Range = (0.0, 0.0)     # warm (>0) / cool (<0) shift: R x (1+t), B x (1-t)
    tint: Range = (0.0, 0.0)              # green (<0) / magenta (>0) shift: G x (1-t)
    vignetting: Range = (0.0, 0.0)        # brightness loss at the image corners
    gamma: Range = (1.0, 1.0)             # tone curve exponent on top of the render (1 = none)
    highlight_knee: float = 1.0           # values above it roll off softly towards 1
    blur_sigma: Range = (0.0, 0.0)        # Gaussian optical blur, pixels (at 320 px width)
    motion_blur: Range = (0.0, 0.0)       # length of a straight motion streak, pixels
    motion_probability: float = 0.0       # share of frames with a motion streak
    read_noise: Range = (0.0, 0.0)        # signal-independent noise std, [0, 1] units
    shot_noise: Range = (0.0, 0.0)        # photon noise: std = sqrt(shot * value)
    chroma_noise: float = 0.0             # share of the noise that differs between channels
    jpeg_quality: tuple[int, int] = (100, 100)  # JPEG round trip; 100 on both ends = none

    def __post_init__(self) -> None:
        for name in ("auto_exposure", "exposure", "white_balance", "tint", "vignetting", "gamma",
                     "blur_sigma", "motion_blur", "read_noise", "shot_noise", "jpeg_quality"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"camera effect {name}: low {lo} > high {hi}")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError(f"jpeg_quality must lie in [1, 100], got {self.jpeg_quality}")
        if min(self.blur_sigma[0], self.motion_blur[0], self.read_noise[0], self.shot_noise[0],
               self.vignetting[0]) < 0 or self.gamma[0] <= 0:
            raise ValueError("blur, noise and vignetting must be >= 0 and gamma > 0")


def _draw(rng: np.random.Generator, bounds: Range) -> float:
    # Always consume one number, so a frame's later draws do not depend on which
    # ranges happen to be empty.
    u = float(rng.uniform())
    return bounds[0] + u * (bounds[1] - bounds[0])


def _vignette(h: int, w: int, strength: float) -> np.ndarray:
    """cos^4-like falloff: 1 at the centre, 1 - strength at the corners."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32),
                         np.linspace(-1, 1, w, dtype=np.float32), indexing="ij")
    r2 = (xx * xx + yy * yy) / 2
    return (1 - strength * r2 * (0.6 + 0.4 * r2))[..., None]


def _motion_kernel(length: float, angle: float) -> np.ndarray:
    size = int(math.ceil(length)) | 1
    kernel = np.zeros((size, size), np.float32)
    c = size // 2
    dx, dy = math.cos(angle) * (length - 1) / 2, math.sin(angle) * (length - 1) / 2
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1,
             cv2.LINE_AA)
    return kernel / kernel.sum()


def _highlights(image: np.ndarray, knee: float) -> np.ndarray:
    """Identity below ``knee``, then an exponential shoulder that approaches 1."""
    if knee >= 1:
        return image
    span = 1 - knee
    over = np.maximum(image - knee, 0)
    return np.where(image > knee, knee + span * (1 - np.exp(-over / span)), image)


def apply_camera(image: np.ndarray, fx: CameraEffects, rng: np.random.Generator) -> np.ndarray:
    """Float RGB (H, W, 3) in about [0, 1] -> uint8 RGB through the camera ``fx``.

    Order: auto-exposure (gain 0.5-4 towards a mean brightness), exposure error and
    white balance (on the sensor's light), vignetting,
    optical and motion blur, tone curve, photon + read noise, 8-bit
    quantisation, JPEG. Exactly 13 uniforms and one normal field are drawn from
    ``rng`` (plus a second field when there is chroma noise).
    """
    h, w = image.shape[:2]
    aim = _draw(rng, fx.auto_exposure)
    ev, warm, tint = _draw(rng, fx.exposure), _draw(rng, fx.white_balance), _draw(rng, fx.tint)
    vig, gamma = _draw(rng, fx.vignetting), _draw(rng, fx.gamma)
    sigma = _draw(rng, fx.blur_sigma) * w / 320
    streak = _draw(rng, fx.motion_blur) * w / 320
    streak_angle = float(rng.uniform(0, math.pi))
    moving = float(rng.uniform()) < fx.motion_probability
    quality = round(_draw(rng, fx.jpeg_quality))
    read, shot = _draw(rng, fx.read_noise), _draw(rng, fx.shot_noise)
    gain = 2**ev
    if aim > 0:
        mean = float(image.mean())
        gain *= float(np.clip(aim / max(mean, 1e-3), 0.5, 4.0))
    gains = np.array([gain * (1 + warm), gain * (1 - tint), gain * (1 - warm)], np.float32)
    image = image.astype(np.float32) * gains
    if vig > 0:
        image = image * _vignette(h, w, vig)
    if sigma > 0.05:
        image = cv2.GaussianBlur(image, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    if moving and streak >= 1.5:
        image = cv2.filter2D(image, -1, _motion_kernel(streak, streak_angle),
                             borderType=cv2.BORDER_REPLICATE)
    image = _highlights(np.maximum(image, 0), fx.highlight_knee)
    if gamma != 1:
        image = np.power(np.clip(image, 0, None), np.float32(gamma))
    if read > 0 or shot > 0:
        std = np.sqrt(read * read + shot * np.clip(image, 0, 1)).astype(np.float32)
        luma = rng.standard_normal((h, w, 1), dtype=np.float32)
        if fx.chroma_noise > 0:
            chroma = rng.standard_normal((h, w, 3), dtype=np.float32)
            noise = (1 - fx.chroma_noise) * luma + fx.chroma_noise * chroma
        else:
            noise = luma
        image = image + std * noise
    out = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    if quality < 100:
        ok, data = cv2.imencode(".jpg", out[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError("JPEG encoding failed")
        out = np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])
    return out
