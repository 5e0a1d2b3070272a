"""ONNX export and ONNX Runtime training of the MLP; the one module that imports onnx and onnxruntime.

- :func:`inference_model`: the standard, self-contained inference graph (weights as initializers)
  that any ONNX program can load: ``input`` -> ``logits``, ``probabilities``, ``label``.
- :func:`train_step_model`: one SGD step as a plain ONNX graph generated from the architecture
  (forward, softmax cross-entropy, hand-written backward, update), so training needs only the
  ordinary ``onnxruntime`` wheel, never onnxruntime-training.
- :class:`OnnxBackend`: the training backend built on it, step for step the numpy reference
  (:mod:`.training`): same schedule, same maths in float32, same :class:`TrainResult`.
- :func:`compose_with_backbone` and :func:`run_backbone`: a frozen feature extractor in front of the
  federated head, as one exported graph or to embed local data before training.

Errors from onnx and onnxruntime are translated to :class:`BackendError` here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from fedmq import __version__
from fedmq.broker.architecture import MLPArchitecture

from . import training
from .backends import BackendError
from .training import TrainResult

log = logging.getLogger(__name__)

#: Operator set of the generated graphs (every op used is unchanged since opset 13-17).
OPSET = 17
#: IR version 8 is the one that goes with opset 17: loadable by onnxruntime >= 1.10 on older devices.
IR_VERSION = 8

LOGITS = "logits"
PROBABILITIES = "probabilities"
LABEL = "label"
LOSS_SUM = "loss_sum"
CORRECT = "correct"

_FLOAT = TensorProto.FLOAT
_INT64 = TensorProto.INT64


def _ort_exception_types() -> tuple[type[BaseException], ...]:
    """The exceptions onnxruntime's C++ core raises; they share no base class besides Exception."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail", "NotFound")
    found = tuple(t for t in (getattr(state, n, None) for n in names) if isinstance(t, type))
    return (*found, RuntimeError)


_ORT_ERRORS = _ort_exception_types()


# --------------------------------------------------------------------------------------------
# Graph generation


class _GraphBuilder:
    """Collects nodes and constant initializers; every value gets a readable, unique name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple[str, bytes], str] = {}

    def op(self, op_type: str, inputs: list[str], output: str, **attributes: Any) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def const(self, value: np.ndarray, name: str) -> str:
        key = (str(value.dtype), value.tobytes() + repr(value.shape).encode())
        if key not in self._constants:
            self.initializers.append(numpy_helper.from_array(value, name))
            self._constants[key] = name
        return self._constants[key]


def _forward(g: _GraphBuilder, arch: MLPArchitecture, x: str) -> tuple[list[str], str]:
    """Dense layers with ReLU between them; returns (the input of every layer, the logits)."""
    layer_inputs = [x]
    h = x
    last = arch.num_layers - 1
    for i in range(arch.num_layers):
        h = g.op("MatMul", [h, f"dense{i}.weight"], f"dense{i}/matmul")
        h = g.op("Add", [h, f"dense{i}.bias"], f"dense{i}/linear" if i < last else LOGITS)
        if i < last:
            h = g.op("Relu", [h], f"dense{i}/relu")
            layer_inputs.append(h)
    return layer_inputs, h


def _param_infos(arch: MLPArchitecture, suffix: str = "") -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(name + suffix, _FLOAT, list(shape))
            for name, shape in arch.param_shapes().items()]


def _model(graph: onnx.GraphProto, arch: MLPArchitecture, *, producer_version: str, kind: str) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="fedmq", producer_version=producer_version)
    helper.set_model_props(model, {
        "fedmq.version": __version__,
        "fedmq.graph": kind,
        "fedmq.architecture": f"mlp {'-'.join(str(w) for w in arch.widths)}",
    })
    return model


def _checked_params(params: Mapping[str, np.ndarray], arch: MLPArchitecture) -> dict[str, np.ndarray]:
    """Contiguous float32 copies of ``params`` in layer order; BackendError on a name or shape mismatch."""
    expected = arch.param_shapes()
    if set(params) != set(expected):
        missing, extra = sorted(set(expected) - set(params)), sorted(set(params) - set(expected))
        raise BackendError(f"parameters do not match the architecture: missing {missing}, unexpected {extra}")
    out: dict[str, np.ndarray] = {}
    for name, shape in expected.items():
        value = np.array(params[name], dtype=np.float32, order="C", copy=True)
        if value.shape != shape:
            raise BackendError(f"parameter {name} has shape {value.shape}; the architecture needs {shape}")
        out[name] = value
    return out


def inference_model(arch: MLPArchitecture, params: Mapping[str, np.ndarray], *, input_name: str = "input",
                    producer_version: str = __version__) -> onnx.ModelProto:
    """The standard inference graph with the weights inside, for any ONNX runtime.

    Input ``input_name``: float32 ``[N, inputs]``; outputs ``logits`` float32 ``[N, classes]``,
    ``probabilities`` (softmax of the logits) and ``label`` int64 ``[N]`` (argmax, first on ties).
    """
    weights = _checked_params(params, arch)
    return _inference_graph_model(arch, input_name=input_name, weights=weights, producer_version=producer_version)


def _inference_graph_model(arch: MLPArchitecture, *, input_name: str, weights: Mapping[str, np.ndarray] | None,
                           producer_version: str = __version__, full: bool = True) -> onnx.ModelProto:
    """Inference graph; with ``weights`` None the parameters are graph inputs (one session serves every round)."""
    if input_name in arch.param_shapes() or input_name in (LOGITS, PROBABILITIES, LABEL):
        raise BackendError(f"input name {input_name!r} clashes with a parameter or output name")
    g = _GraphBuilder()
    _, logits = _forward(g, arch, input_name)
    outputs = [helper.make_tensor_value_info(LOGITS, _FLOAT, ["N", arch.classes])]
    if full:
        g.op("Softmax", [logits], PROBABILITIES, axis=1)
        g.op("ArgMax", [logits], LABEL, axis=1, keepdims=0)
        outputs += [helper.make_tensor_value_info(PROBABILITIES, _FLOAT, ["N", arch.classes]),
                    helper.make_tensor_value_info(LABEL, _INT64, ["N"])]
    inputs = [helper.make_tensor_value_info(input_name, _FLOAT, ["N", arch.inputs])]
    if weights is None:
        inputs += _param_infos(arch)
        initializers = g.initializers
    else:
        initializers = [numpy_helper.from_array(v, k) for k, v in weights.items()] + g.initializers
    graph = helper.make_graph(
        g.nodes, "fedmq_mlp", inputs, outputs, initializer=initializers,
        doc_string=(f"fedmq MLP {'-'.join(str(w) for w in arch.widths)}: dense layers y = x @ W + b with ReLU "
                    "between them; probabilities = softmax(logits), label = argmax(logits)."),
    )
    return _model(graph, arch, producer_version=producer_version, kind="inference")


def train_step_model(arch: MLPArchitecture) -> onnx.ModelProto:
    """One minibatch SGD step of :func:`training.sgd_step` as an ONNX graph.

    Inputs: ``X`` float32 ``[B, inputs]``, ``Y`` int64 ``[B]``, ``lr`` float32 scalar and every
    parameter by name. Outputs: ``{name}.new`` for every parameter, ``loss_sum`` (float32 scalar,
    the summed cross-entropy of the batch before the update) and ``correct`` (int64 scalar, the
    predictions equal to ``Y`` before the update). Every gradient uses the old weights.
    """
    g = _GraphBuilder()
    layer_inputs, z = _forward(g, arch, "X")
    axis1 = g.const(np.array([1], dtype=np.int64), "const/axis1")
    axis0 = g.const(np.array([0], dtype=np.int64), "const/axis0")
    zero = g.const(np.array(0.0, dtype=np.float32), "const/zero")

    # Stable softmax cross-entropy, as training.softmax_cross_entropy.
    row_max = g.op("ReduceMax", [z], "loss/row_max", axes=[1], keepdims=1)
    shifted = g.op("Sub", [z, row_max], "loss/shifted")
    exp = g.op("Exp", [shifted], "loss/exp")
    total = g.op("ReduceSum", [exp, axis1], "loss/total", keepdims=1)
    probs = g.op("Div", [exp, total], "loss/probs")
    y_column = g.op("Unsqueeze", ["Y", axis1], "loss/y_column")
    picked = g.op("GatherElements", [shifted, y_column], "loss/picked", axis=1)
    per_example = g.op("Sub", [g.op("Log", [total], "loss/log_total"), picked], "loss/per_example")
    g.op("ReduceSum", [per_example], LOSS_SUM, keepdims=0)

    predicted = g.op("ArgMax", [z], "metrics/predicted", axis=1, keepdims=0)
    hits = g.op("Cast", [g.op("Equal", [predicted, "Y"], "metrics/equal")], "metrics/hits", to=_INT64)
    g.op("ReduceSum", [hits], CORRECT, keepdims=0)

    # grad = (softmax - onehot) / B
    depth = g.const(np.array(arch.classes, dtype=np.int64), "const/classes")
    off_on = g.const(np.array([0.0, 1.0], dtype=np.float32), "const/off_on")
    onehot = g.op("OneHot", ["Y", depth, off_on], "grad/onehot", axis=-1)
    batch = g.op("Cast", [g.op("Shape", ["Y"], "grad/batch_shape")], "grad/batch", to=_FLOAT)
    grad = g.op("Div", [g.op("Sub", [probs, onehot], "grad/residual"), batch], "grad/logits")

    for i in range(arch.num_layers - 1, -1, -1):
        w, b, a = f"dense{i}.weight", f"dense{i}.bias", layer_inputs[i]
        grad_w = g.op("MatMul", [g.op("Transpose", [a], f"dense{i}/input_t", perm=[1, 0]), grad], f"dense{i}/grad_w")
        grad_b = g.op("ReduceSum", [grad, axis0], f"dense{i}/grad_b", keepdims=0)
        if i > 0:
            back = g.op("MatMul", [grad, g.op("Transpose", [w], f"dense{i}/weight_t", perm=[1, 0])], f"dense{i}/grad_in")
            active = g.op("Greater", [a, zero], f"dense{i - 1}/active")
            grad = g.op("Where", [active, back, zero], f"dense{i - 1}/grad")
        g.op("Sub", [w, g.op("Mul", ["lr", grad_w], f"dense{i}/step_w")], f"{w}.new")
        g.op("Sub", [b, g.op("Mul", ["lr", grad_b], f"dense{i}/step_b")], f"{b}.new")

    inputs = [helper.make_tensor_value_info("X", _FLOAT, ["B", arch.inputs]),
              helper.make_tensor_value_info("Y", _INT64, ["B"]),
              helper.make_tensor_value_info("lr", _FLOAT, []),
              *_param_infos(arch)]
    outputs = [*_param_infos(arch, ".new"),
               helper.make_tensor_value_info(LOSS_SUM, _FLOAT, []),
               helper.make_tensor_value_info(CORRECT, _INT64, [])]
    graph = helper.make_graph(
        g.nodes, "fedmq_mlp_sgd_step", inputs, outputs, initializer=g.initializers,
        doc_string=("One SGD step of the fedmq MLP: forward, mean softmax cross-entropy, backward with the old "
                    "weights, then W.new = W - lr * dW and b.new = b - lr * db (float32)."),
    )
    return _model(graph, arch, producer_version=__version__, kind="train_step")


# --------------------------------------------------------------------------------------------
# Training and inference with onnxruntime


def session_options(*, threads: int = 1) -> ort.SessionOptions:
    """One intra-op thread (edge devices, and results that do not depend on thread timing), full graph optimisation."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def _session(model: onnx.ModelProto | bytes, *, threads: int = 1, what: str) -> ort.InferenceSession:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, sess_options=session_options(threads=threads),
                                    providers=["CPUExecutionProvider"])
    except _ORT_ERRORS as exc:
        raise BackendError(f"onnxruntime cannot load the {what}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class _TrainStep:
    session: ort.InferenceSession
    param_names: tuple[str, ...]
    output_names: tuple[str, ...]


class OnnxBackend:
    """Training and inference with the plain ``onnxruntime`` wheel (CPU), matching the numpy reference.

    One session per architecture, built on first use and kept; the weights are graph inputs and
    outputs, so the same session serves every round.
    """

    name = "onnx"

    def __init__(self, *, threads: int = 1) -> None:
        self._threads = threads
        self._train_steps: dict[MLPArchitecture, _TrainStep] = {}
        self._forwards: dict[MLPArchitecture, ort.InferenceSession] = {}

    def _train_step(self, arch: MLPArchitecture) -> _TrainStep:
        step = self._train_steps.get(arch)
        if step is None:
            names = tuple(arch.param_shapes())
            session = _session(train_step_model(arch), threads=self._threads, what="train-step graph")
            step = _TrainStep(session, names, (*(f"{n}.new" for n in names), LOSS_SUM, CORRECT))
            self._train_steps[arch] = step
        return step

    def train(self, params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray, y: np.ndarray, *,
              epochs: int, batch_size: int, lr: float, seed: int) -> TrainResult:
        """Minibatch SGD on a copy of ``params``: the schedule and maths of :func:`training.train`."""
        work = _checked_params(params, arch)
        x, y = _checked_data(arch, x, y)
        step = self._train_step(arch)
        run = step.session.run
        output_names = list(step.output_names)
        feeds: dict[str, Any] = dict(work)
        feeds["lr"] = np.array(lr, dtype=np.float32)
        names = step.param_names
        count = len(names)
        loss_sum, correct = 0.0, 0
        try:
            for _, batches in groupby(training.epoch_batches(len(x), batch_size, epochs, seed), key=lambda b: b[0]):
                order = [idx for _, idx in batches]
                starts = np.cumsum([0] + [len(idx) for idx in order])
                permutation = np.concatenate(order)
                x_epoch, y_epoch = x[permutation], y[permutation]
                loss_sum, correct = 0.0, 0
                for k in range(len(order)):
                    feeds["X"] = x_epoch[starts[k]:starts[k + 1]]
                    feeds["Y"] = y_epoch[starts[k]:starts[k + 1]]
                    out = run(output_names, feeds)
                    for j in range(count):
                        feeds[names[j]] = out[j]
                    loss_sum += float(out[count])
                    correct += int(out[count + 1])
        except _ORT_ERRORS as exc:
            raise BackendError(f"onnxruntime failed during training: {exc}") from exc
        n = max(len(x), 1)
        return TrainResult({k: feeds[k] for k in names}, loss_sum / n, correct / n, len(x))

    def logits(self, params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray) -> np.ndarray:
        """``x @ W + b`` through the layers, as :func:`training.logits`."""
        feeds: dict[str, Any] = _checked_params(params, arch)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != arch.inputs:
            raise BackendError(f"inputs have shape {x.shape}; the architecture needs (N, {arch.inputs})")
        session = self._forwards.get(arch)
        if session is None:
            model = _inference_graph_model(arch, input_name="input", weights=None, full=False)
            session = self._forwards[arch] = _session(model, threads=self._threads, what="inference graph")
        feeds["input"] = x
        try:
            (out,) = session.run([LOGITS], feeds)
        except _ORT_ERRORS as exc:
            raise BackendError(f"onnxruntime failed computing logits: {exc}") from exc
        return out


def _checked_data(arch: MLPArchitecture, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != arch.inputs:
        raise BackendError(f"inputs have shape {x.shape}; the architecture needs (N, {arch.inputs})")
    if y.shape != (len(x),):
        raise BackendError(f"labels have shape {y.shape}; expected ({len(x)},)")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= arch.classes):
        raise BackendError(f"labels must be in [0, {arch.classes}); got [{int(y.min())}, {int(y.max())}]")
    return x, y
