"""Real calibration data for the digits example, generated on the fly (`--calib digits.npz`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deploy.examples.digits_cnn import INPUT_NAME, load_digits_split


def export_calibration_npz(path: str | Path, n: int = 128, seed: int = 0) -> Path:
    """Write the first n held-out images (key "image", float32 N x 1 x 32 x 32) and
    their "labels" (int64) to an .npz; held-out so calibration never sees training data."""
    _, _, test_x, test_y = load_digits_split(seed)
    if not 0 < n <= len(test_x):
        raise ValueError(f"n must be in 1..{len(test_x)}, got {n}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path,
        **{INPUT_NAME: test_x[:n].numpy().astype(np.float32),
           "labels": test_y[:n].numpy().astype(np.int64)},
    )
    return path


def held_out_images(n: int = 256, seed: int = 0):
    """`--calib deploy.examples.digits_data:held_out_images`: the first n held-out images, one per sample."""
    _, _, test_x, _ = load_digits_split(seed)
    return [test_x[i:i + 1] for i in range(min(n, len(test_x)))]
