"""Local training of the sequential MLP in numpy: the reference every other backend is checked
against. Pure functions, no I/O.

Forward: ``h_{i+1} = relu(h_i @ W_i + b_i)`` for hidden layers, logits ``= h_L @ W_L + b_L``,
loss = mean softmax cross-entropy. Minibatch SGD with a fresh permutation per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.broker.architecture import MLPArchitecture


@dataclass(frozen=True, slots=True)
class TrainResult:
    params: dict[str, np.ndarray]
    loss: float          # mean training loss over the last epoch
    accuracy: float      # training accuracy over the last epoch (on the fly)
    num_examples: int


def epoch_batches(num_examples: int, batch_size: int, epochs: int, seed: int) -> Iterator[tuple[int, np.ndarray]]:
    """(epoch, indices) for every minibatch: the shared schedule all backends follow."""
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(num_examples)
        for start in range(0, num_examples, batch_size):
            yield epoch, order[start:start + batch_size]


def logits(params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray) -> np.ndarray:
    h = np.asarray(x, dtype=np.float32)
    last = arch.num_layers - 1
    for i in range(arch.num_layers):
        h = h @ params[f"dense{i}.weight"] + params[f"dense{i}.bias"]
        if i < last:
            h = np.maximum(h, 0.0)
    return h


def softmax_cross_entropy(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-example loss and softmax probabilities, numerically stable."""
    shifted = z - z.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    probs = exp / total
    loss = np.log(total[:, 0]) - shifted[np.arange(len(y)), y]
    return loss, probs


def evaluate(params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, mean loss) of the model on ``x``, ``y``."""
    z = logits(params, arch, x)
    loss, _ = softmax_cross_entropy(z, y)
    return float((z.argmax(axis=1) == y).mean()), float(loss.mean())


def predict(params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray) -> np.ndarray:
    return logits(params, arch, x).argmax(axis=1)


def sgd_step(params: dict[str, np.ndarray], arch: MLPArchitecture, xb: np.ndarray, yb: np.ndarray, lr: float) -> tuple[float, int]:
    """One SGD step in place on ``params``; returns (sum of losses, correct predictions) of the batch."""
    activations = [xb]
    h = xb
    last = arch.num_layers - 1
    for i in range(arch.num_layers):
        h = h @ params[f"dense{i}.weight"] + params[f"dense{i}.bias"]
        if i < last:
            h = np.maximum(h, 0.0)
            activations.append(h)
    loss, probs = softmax_cross_entropy(h, yb)
    correct = int((h.argmax(axis=1) == yb).sum())
    grad = probs
    grad[np.arange(len(yb)), yb] -= 1.0
    grad /= np.float32(len(yb))
    for i in range(last, -1, -1):
        w = params[f"dense{i}.weight"]
        grad_w = activations[i].T @ grad
        grad_b = grad.sum(axis=0)
        if i > 0:
            grad = (grad @ w.T) * (activations[i] > 0)
        w -= np.float32(lr) * grad_w
        params[f"dense{i}.bias"] -= np.float32(lr) * grad_b
    return float(loss.sum()), correct


def train(params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray, y: np.ndarray, *,
          epochs: int, batch_size: int, lr: float, seed: int) -> TrainResult:
    """Train a copy of ``params`` on (``x``, ``y``) and return it with the last epoch's metrics."""
    work = {k: np.array(v, dtype=np.float32, copy=True) for k, v in params.items()}
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    loss_sum = 0.0
    correct = 0
    current_epoch = 0
    for epoch, idx in epoch_batches(len(x), batch_size, epochs, seed):
        if epoch != current_epoch:
            current_epoch, loss_sum, correct = epoch, 0.0, 0
        batch_loss, batch_correct = sgd_step(work, arch, x[idx], y[idx], lr)
        loss_sum += batch_loss
        correct += batch_correct
    n = max(len(x), 1)
    return TrainResult(work, loss_sum / n, correct / n, len(x))
