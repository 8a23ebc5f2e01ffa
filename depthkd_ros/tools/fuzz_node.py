"""`depthkd fuzz-node`: a real depth_node fed a seeded mix of malformed messages.

Placeholder: filled in below.
"""

from __future__ import annotations

import struct
import zlib


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def png_bomb(width: int, height: int) -> bytes:
    """A valid all-black RGB PNG of ``width`` x ``height``, compressed about 1000:1
    (16000 x 16000: 768 MB decoded from 746 KB), built row block by row block so
    making it never holds the decoded image."""
    row = bytes(1 + 3 * width)  # filter byte 0 + black pixels
    rows_per_block = max(1, (1 << 22) // len(row))
    compressor = zlib.compressobj(9)
    parts = []
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b""))
