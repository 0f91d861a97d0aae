"""Small generated image folders for the data tests."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


def make_tree(root, per_class=(5, 4, 3), seed=0) -> list[tuple[str, int]]:
    """ImageNet-style tree with JPEGs and PNGs of several sizes and aspect ratios, a grayscale and a
    CMYK JPEG, upper-case extensions, a non-image file and a nested folder; returns (path, label)
    in torchvision ImageFolder order (13 images by default: an odd number)."""
    rng = np.random.default_rng(seed)
    for c, count in enumerate(per_class):
        cdir = os.path.join(root, f"class_{c:02d}")
        os.makedirs(cdir, exist_ok=True)
        for k in range(count):
            h, w = int(rng.integers(24, 90)), int(rng.integers(24, 90))
            pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            kind = (c + k) % 4
            if kind == 0:
                name, img, fmt = f"img{k}.jpg", Image.fromarray(pixels), "JPEG"
            elif kind == 1:
                name, img, fmt = f"img{k}.PNG", Image.fromarray(pixels), "PNG"
            elif kind == 2:
                name, img, fmt = f"img{k}.JPEG", Image.fromarray(pixels[..., 0], mode="L"), "JPEG"
            else:
                name, img, fmt = f"img{k}.jpeg", Image.fromarray(pixels).convert("CMYK"), "JPEG"
            img.save(os.path.join(cdir, name), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        with open(os.path.join(cdir, "notes.txt"), "w") as f:
            f.write("not an image")
    nested = os.path.join(root, "class_00", "more")
    os.makedirs(nested, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(os.path.join(nested, "deep.jpg"))
    from torchvision.datasets import ImageFolder

    tv = ImageFolder(root, is_valid_file=lambda p: p.lower().endswith((".jpg", ".jpeg", ".png")))
    return [(p, y) for p, y in tv.samples]


def corrupt(path, how: str) -> None:
    """Damage an image file: ``truncated`` (half of it), ``garbage`` (not an image), ``empty`` or ``deleted``."""
    raw = open(path, "rb").read()
    if how == "truncated":
        open(path, "wb").write(raw[: len(raw) // 2])
    elif how == "garbage":
        open(path, "wb").write(b"definitely not an image " * 20)
    elif how == "empty":
        open(path, "wb").close()
    elif how == "deleted":
        os.remove(path)
    else:
        raise ValueError(f"how must be truncated, garbage, empty or deleted, got {how!r}")


def write_png16(path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (PIL writes 16-bit grey only): ``pixels`` uint16, H x W (grey) or H x W x 2/3/4 (grey+alpha,
    RGB, RGBA)."""
    import struct
    import zlib

    colour = {1: 0, 2: 4, 3: 2, 4: 6}[1 if pixels.ndim == 2 else pixels.shape[2]]
    h, w = pixels.shape[:2]
    rows = b"".join(b"\0" + pixels[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))
