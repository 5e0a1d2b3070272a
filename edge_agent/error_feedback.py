"""Error feedback for lossy delta codecs: what a codec dropped this round is sent in a later one.

On the device, each round::

    compensated = feedback.compensate(delta)
    wire = codec.encode(compensated)
    feedback.update(compensated, codec.decode(wire, shapes))

The residual (``compensated - decoded``) is added to the next delta, so the sum of what the
aggregator receives tracks the sum of the true deltas up to one bounded residual, even with
top-k keeping 1% of the entries. The residual is device state: :meth:`ErrorFeedback.save` and
:meth:`ErrorFeedback.load` keep it across agent restarts. Pure numpy apart from those two.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedmq.broker.files import write_atomic

log = logging.getLogger(__name__)


class ErrorFeedback:
    """The residual of a lossy codec, per parameter name (float32, the parameter's shape)."""

    def __init__(self) -> None:
        self._residual: dict[str, np.ndarray] = {}

    @property
    def residual(self) -> dict[str, np.ndarray]:
        """A copy of the current residual (empty before the first :meth:`update`)."""
        return {name: array.copy() for name, array in self._residual.items()}

    def norm(self) -> float:
        """L2 norm of the whole residual."""
        return float(np.sqrt(sum(float(np.dot(r.reshape(-1), r.reshape(-1))) for r in self._residual.values())))

    def reset(self) -> None:
        """Forget the residual (e.g. when the model's architecture changes)."""
        self._residual = {}

    def compensate(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``delta + residual`` as float32; a residual that does not fit ``delta`` is discarded first."""
        delta32 = {name: np.asarray(value, dtype=np.float32) for name, value in delta.items()}
        self._discard_unless_matching({name: value.shape for name, value in delta32.items()})
        if not self._residual:
            return {name: value.copy() for name, value in delta32.items()}
        return {name: value + self._residual[name] for name, value in delta32.items()}

    def update(self, compensated: Mapping[str, np.ndarray], decoded: Mapping[str, np.ndarray]) -> None:
        """Keep ``compensated - decoded``: what the codec lost this round."""
        if compensated.keys() != decoded.keys():
            raise ValueError(f"compensated and decoded deltas name different tensors: "
                             f"{sorted(compensated)} vs {sorted(decoded)}")
        residual: dict[str, np.ndarray] = {}
        for name, value in compensated.items():
            value = np.asarray(value, dtype=np.float32)
            sent = np.asarray(decoded[name], dtype=np.float32)
            if value.shape != sent.shape:
                raise ValueError(f"tensor {name!r}: compensated shape {value.shape}, decoded {sent.shape}")
            residual[name] = value - sent
        self._residual = residual

    def save(self, path: Path | str) -> None:
        """Write the residual to ``path`` (npz) atomically: a crash leaves the old file or the new."""
        buffer = io.BytesIO()
        # a list of names keeps arbitrary parameter names (dots, colons) out of the zip member names
        names = list(self._residual)
        np.savez(buffer, names=np.array(names, dtype=np.str_),
                 **{f"r{i}": self._residual[name] for i, name in enumerate(names)})
        write_atomic(Path(path), buffer.getbuffer())

    def load(self, path: Path | str, shapes: Mapping[str, tuple[int, ...]] | None = None) -> bool:
        """Replace the residual with the one saved at ``path``; return whether one was loaded.

        A missing file means a fresh start. An unreadable file, or (when ``shapes`` is given) a
        residual whose names or shapes differ from the current model, is discarded with a log line:
        losing a residual costs a little accuracy, applying a wrong one would corrupt the model.
        """
        self._residual = {}
        path = Path(path)
        if not path.exists():
            return False
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(n) for n in data["names"]]
                residual = {name: np.asarray(data[f"r{i}"], dtype=np.float32) for i, name in enumerate(names)}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            log.warning("discarding unreadable error-feedback residual %s: %s", path, exc)
            return False
        if len(residual) != len(names):
            log.warning("discarding error-feedback residual %s: a tensor name appears twice", path)
            return False
        self._residual = residual
        if shapes is not None:
            self._discard_unless_matching(shapes)
        return bool(self._residual)

    def _discard_unless_matching(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if not self._residual:
            return
        mine = {name: array.shape for name, array in self._residual.items()}
        theirs = {name: tuple(shape) for name, shape in shapes.items()}
        if mine != theirs:
            log.warning("discarding error-feedback residual: its tensors %s do not match the model's %s",
                        mine, theirs)
            self._residual = {}
