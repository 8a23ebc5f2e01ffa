"""Point clouds for people: a PLY file and a rendered oblique view (numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from depthkd_core.atomic import atomic_open


def _valid_points(points: np.ndarray, colors: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    pts = np.asarray(points, dtype=np.float32).reshape(-1, 3)
    keep = np.all(np.isfinite(pts), axis=1)
    if colors is None:
        return pts[keep], None
    cols = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if cols.shape[0] != pts.shape[0]:
        raise ValueError(f"{cols.shape[0]} colours given for {pts.shape[0]} points")
    return pts[keep], cols[keep]


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray | None = None) -> int:
    """Write the finite points (any shape (..., 3)) as binary little-endian PLY.

    ``colors`` are uint8 RGB of the same leading shape. Written to a temporary
    file and renamed, so a reader never sees half a cloud. Returns the point count.
    """
    pts, cols = _valid_points(points, colors)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    props = "property float x\nproperty float y\nproperty float z\n"
    if cols is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
        props += "property uchar red\nproperty uchar green\nproperty uchar blue\n"
    rows = np.empty(len(pts), dtype=fields)
    rows["x"], rows["y"], rows["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    if cols is not None:
        rows["red"], rows["green"], rows["blue"] = cols[:, 0], cols[:, 1], cols[:, 2]
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(pts)}\n"
              f"{props}end_header\n").encode("ascii")
    with atomic_open(path) as f:
        f.write(header)
        f.write(rows.tobytes())
    return len(pts)


def read_ply(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read a PLY written by ``write_ply``: (N, 3) float32 points and (N, 3) uint8 colours."""
    data = Path(path).read_bytes()
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply\n") or end < 0:
        raise ValueError(f"{path} is not a PLY file")
    header = data[:end].decode("ascii").splitlines()
    count = next(int(line.split()[2]) for line in header if line.startswith("element vertex"))
    has_color = any(line.endswith(" red") for line in header)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if has_color:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rows = np.frombuffer(data, dtype=fields, count=count, offset=end + len(b"end_header\n"))
    points = np.stack([rows["x"], rows["y"], rows["z"]], axis=1)
    colors = np.stack([rows["red"], rows["green"], rows["blue"]], axis=1) if has_color else None
    return points, colors


def _rotation(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    r_yaw = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    r_pitch = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)],
                        [0, np.sin(pitch), np.cos(pitch)]])
    return r_pitch @ r_yaw


def render_point_cloud(points: np.ndarray, colors: np.ndarray | None, width: int, height: int,
                       yaw_deg: float = -35.0, pitch_deg: float = -25.0,
                       point_size: int = 2) -> np.ndarray:
    """Render an optical-frame cloud (x right, y down, z forward) from a virtual camera
    orbiting the cloud's centre, so its 3-D shape is visible. HxWx3 uint8 RGB, black empty.

    A z-buffer without a loop: points are drawn far-to-near, and numpy fancy
    assignment keeps the last write per pixel, i.e. the nearest point.
    """
    pts, cols = _valid_points(points, colors)
    image = np.zeros((height, width, 3), dtype=np.uint8)
    if len(pts) == 0:
        return image
    if cols is None:
        cols = np.full((len(pts), 3), 220, dtype=np.uint8)
    centre = np.median(pts, axis=0)
    view = (pts - centre) @ _rotation(yaw_deg, pitch_deg).T
    extent = np.percentile(np.abs(view[:, :2]), 98, axis=0).max() + 1e-6
    distance = 2.2 * extent
    z = view[:, 2] + distance
    front = z > 1e-3
    view, z, cols = view[front], z[front], cols[front]
    focal = 0.5 * min(width, height) * distance / extent / 1.1
    u = np.round(focal * view[:, 0] / z + (width - 1) / 2).astype(np.int64)
    v = np.round(focal * view[:, 1] / z + (height - 1) / 2).astype(np.int64)
    order = np.argsort(-z, kind="stable")
    u, v, cols = u[order], v[order], cols[order]
    for du in range(point_size):
        for dv in range(point_size):
            uu, vv = u + du, v + dv
            inside = (uu >= 0) & (uu < width) & (vv >= 0) & (vv < height)
            image[vv[inside], uu[inside]] = cols[inside]
    return image
