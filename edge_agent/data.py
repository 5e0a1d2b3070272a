"""Local data sources. The data never leaves the device: only weight deltas do."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedmq.broker.errors import FedmqError


class DataError(FedmqError, ValueError):
    """The local data set cannot be used; the message says what is wrong and how to fix it."""


def load_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``x`` (examples x features, numeric) and ``y`` (integer labels) from an ``.npz`` file."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"x", "y"} - set(data.files)
            if missing:
                raise DataError(f"{path}: missing arrays {sorted(missing)}; save with np.savez(path, x=..., y=...)")
            x, y = data["x"], data["y"]
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found (set 'data' in the agent config)") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    return check_dataset(x, y, str(path))


def check_dataset(x: np.ndarray, y: np.ndarray, source: str = "data") -> tuple[np.ndarray, np.ndarray]:
    """Return (x as float32, y as int64) after checking shapes, dtypes and values."""
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{source}: x must be 2-D and y 1-D of the same length, got {x.shape} and {y.shape}")
    if len(x) == 0:
        raise DataError(f"{source}: no examples")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: x must be numeric and y integer labels, got {x.dtype} and {y.dtype}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise DataError(f"{source}: x contains NaN or infinity")
    if y.min() < 0:
        raise DataError(f"{source}: labels must be non-negative class indices")
    return x, y.astype(np.int64, copy=False)
