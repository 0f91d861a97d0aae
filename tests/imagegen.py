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
