"""What DaliLoader and TorchLoader share: the preprocessing constants both apply the same way."""

from __future__ import annotations

import math

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_resize(image_size: int) -> int:
    """The shorter side an eval image is resized to before the centre crop of ``image_size``."""
    return math.floor(image_size / 0.875 + 0.5)
