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
import threading
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
        # updates dropped unsent (restore) while a training thread may be between compensate and
        # update: kept apart so that update() cannot overwrite them, folded in by the next compensate
        self._returned: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def residual(self) -> dict[str, np.ndarray]:
        """A copy of what the next :meth:`compensate` adds (empty before the first :meth:`update`)."""
        with self._lock:
            return self._combined()

    def _combined(self) -> dict[str, np.ndarray]:
        if not self._returned:
            return {name: array.copy() for name, array in self._residual.items()}
        if not self._residual:
            return {name: array.copy() for name, array in self._returned.items()}
        return {name: array + self._returned[name] for name, array in self._residual.items()}

    def norm(self) -> float:
        """L2 norm of the whole residual."""
        return float(np.sqrt(sum(float(np.dot(r.reshape(-1), r.reshape(-1))) for r in self.residual.values())))

    def reset(self) -> None:
        """Forget the residual (e.g. when the model's architecture changes)."""
        with self._lock:
            self._residual, self._returned = {}, {}

    def compensate(self, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``delta + residual`` as float32; a residual that does not fit ``delta`` is discarded first."""
        delta32 = {name: np.asarray(value, dtype=np.float32) for name, value in delta.items()}
        with self._lock:
            self._discard_unless_matching({name: value.shape for name, value in delta32.items()})
            carried = self._combined()
            self._residual, self._returned = carried, {}
        if not carried:
            return {name: value.copy() for name, value in delta32.items()}
        return {name: value + carried[name] for name, value in delta32.items()}

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
        with self._lock:
            self._residual = residual

    def restore(self, decoded: Mapping[str, np.ndarray]) -> None:
        """Add back what an update sent (``decoded``) when that update is dropped unsent: after
        :meth:`update` the residual holds only what the codec left out, so without this the
        dropped update's content would be lost rather than delayed."""
        shapes = {name: np.shape(value) for name, value in decoded.items()}
        with self._lock:
            self._discard_unless_matching(shapes)
            if not self._returned:
                self._returned = {name: np.asarray(value, dtype=np.float32).copy() for name, value in decoded.items()}
            else:
                self._returned = {name: value + np.asarray(decoded[name], dtype=np.float32)
                                  for name, value in self._returned.items()}

    def save(self, path: Path | str) -> None:
        """Write the residual to ``path`` (npz) atomically: a crash leaves the old file or the new."""
        buffer = io.BytesIO()
        residual = self.residual  # what a restarted agent must still send: the returned part included
        # a list of names keeps arbitrary parameter names (dots, colons) out of the zip member names
        names = list(residual)
        np.savez(buffer, names=np.array(names, dtype=np.str_),
                 **{f"r{i}": residual[name] for i, name in enumerate(names)})
        write_atomic(Path(path), buffer.getbuffer())

    def load(self, path: Path | str, shapes: Mapping[str, tuple[int, ...]] | None = None) -> bool:
        """Replace the residual with the one saved at ``path``; return whether one was loaded.

        A missing file means a fresh start. An unreadable file, or (when ``shapes`` is given) a
        residual whose names or shapes differ from the current model, is discarded with a log line:
        losing a residual costs a little accuracy, applying a wrong one would corrupt the model.
        """
        self.reset()
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
        theirs = {name: tuple(shape) for name, shape in shapes.items()}
        for attr in ("_residual", "_returned"):
            held: dict[str, np.ndarray] = getattr(self, attr)
            mine = {name: array.shape for name, array in held.items()}
            if held and mine != theirs:
                log.warning("discarding error-feedback residual: its tensors %s do not match the model's %s",
                            mine, theirs)
                setattr(self, attr, {})
