"""scikit-learn's bundled handwritten digits (1797 real 8x8 scans, 10 classes) as small RGB images: the
demo's real-data task (scripts/demo_digits.py) and the cache-dtype benchmark's."""
from __future__ import annotations

import numpy as np


def digit_images(size: int = 32) -> tuple[list[np.ndarray], np.ndarray]:
    """Every scan as a size x size RGB uint8 image (bilinear upscale of its 0..16 grey levels), and the labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [np.asarray(Image.fromarray(np.round(scan * 255 / 16).astype(np.uint8))
                         .resize((size, size), Image.Resampling.BILINEAR).convert("RGB")) for scan in digits.images]
    return images, digits.target.astype(np.int64)
