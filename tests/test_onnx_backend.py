"""The ONNX backend against the numpy reference: graphs that pass the full ONNX check, training
step for step equal to :mod:`training`, an exported model any program can load, and a frozen
backbone composed in front of the head."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits

from fedmq.broker.architecture import MLPArchitecture
from fedmq.edge_agent import training
from fedmq.edge_agent.backends import BackendError
from fedmq.edge_agent.onnx_backend import (
    OPSET,
    OnnxBackend,
    compose_with_backbone,
    inference_model,
    run_backbone,
    train_step_model,
)

ARCHS = [
    MLPArchitecture(64, (32,), 10),
    MLPArchitecture(64, (64, 32), 10),
    MLPArchitecture(5, (), 3),
    MLPArchitecture(784, (256, 128), 10),
]
DIGITS_ARCH = MLPArchitecture(64, (64, 32), 10)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return (data.data / 16).astype(np.float32), data.target.astype(np.int64)


@pytest.fixture(scope="module")
def backend() -> OnnxBackend:
    return OnnxBackend()


def default_opset(model: onnx.ModelProto) -> int:
    return max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def assert_same_training(a: training.TrainResult, b: training.TrainResult, *, elementwise: bool = True) -> None:
    """Same weights to 1e-5 relative, same metrics.

    Two correct float32 implementations sum in different orders, so a pre-activation within ~1e-6
    of zero can take the other side of the ReLU in one of them; after a few hundred steps one such
    event leaves the trajectories ~1e-5 apart (seen: 2e-5 on one bias vector after 3 epochs on
    digits). Long runs are therefore compared by the relative norm of the whole parameter vector,
    and per tensor at 1e-4.
    """
    assert set(a.params) == set(b.params)
    for name in a.params:
        assert a.params[name].dtype == np.float32 == b.params[name].dtype
        if elementwise:
            np.testing.assert_allclose(b.params[name], a.params[name], rtol=1e-5, atol=1e-6, err_msg=name)
        else:
            assert np.linalg.norm(b.params[name] - a.params[name]) <= 1e-4 * np.linalg.norm(a.params[name]), name
    flat_a = np.concatenate([a.params[k].ravel() for k in a.params])
    flat_b = np.concatenate([b.params[k].ravel() for k in a.params])
    assert np.linalg.norm(flat_b - flat_a) <= 1e-5 * np.linalg.norm(flat_a)
    assert b.loss == pytest.approx(a.loss, rel=1e-5)
    assert b.accuracy == a.accuracy
    assert b.num_examples == a.num_examples


# ---------------------------------------------------------------------------------------------
# Graphs


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(map(str, a.widths)))
def test_generated_graphs_pass_the_full_onnx_check(arch: MLPArchitecture) -> None:
    models = [inference_model(arch, arch.init_params(0)), train_step_model(arch), train_step_model(arch, metrics=False)]
    for model in models:
        onnx.checker.check_model(model, full_check=True)
        assert default_opset(model) >= OPSET >= 17
        assert model.graph.doc_string and model.producer_name == "fedmq"
        assert {p.key for p in model.metadata_props} >= {"fedmq.version", "fedmq.architecture"}

    inference, step, step_without_metrics = models
    assert [i.name for i in inference.graph.input] == ["input"]
    assert [o.name for o in inference.graph.output] == ["logits", "probabilities", "label"]
    assert {t.name for t in inference.graph.initializer} >= set(arch.param_shapes())
    params = list(arch.param_shapes())
    assert [i.name for i in step.graph.input] == ["X", "Y", "lr", *params]
    assert [o.name for o in step.graph.output] == [f"{p}.new" for p in params] + ["loss_sum", "correct"]
    assert [o.name for o in step_without_metrics.graph.output] == [f"{p}.new" for p in params]
    batch_dim = step.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value"), "the batch size is dynamic"


def test_one_graph_step_is_one_numpy_sgd_step() -> None:
    """A single run of the step graph: same new weights, batch loss sum and correct count as sgd_step."""
    arch = MLPArchitecture(5, (4, 3), 3)
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((7, 5)).astype(np.float32), rng.integers(0, 3, 7)
    params = arch.init_params(4)
    session = onnxruntime.InferenceSession(train_step_model(arch).SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"X": x, "Y": y, "lr": np.array(0.3, dtype=np.float32), **params})
    expected = {k: v.copy() for k, v in params.items()}
    loss_sum, correct = training.sgd_step(expected, arch, x, y, 0.3)
    for (name, value), new in zip(expected.items(), outputs, strict=False):
        np.testing.assert_allclose(new, value, rtol=1e-6, atol=1e-7, err_msg=name)
    assert float(outputs[-2]) == pytest.approx(loss_sum, rel=1e-6)
    assert int(outputs[-1]) == correct


# ---------------------------------------------------------------------------------------------
# Training against the numpy reference


@pytest.mark.parametrize("epochs", [1, 3])
def test_training_on_digits_matches_numpy(backend: OnnxBackend, digits: tuple[np.ndarray, np.ndarray], epochs: int) -> None:
    x, y = digits[0][:1437], digits[1][:1437]  # 1437 = 89 batches of 16 and one of 13
    params = DIGITS_ARCH.init_params(7)
    original = {k: v.copy() for k, v in params.items()}
    kwargs = dict(epochs=epochs, batch_size=16, lr=0.1, seed=11)
    expected = training.train(params, DIGITS_ARCH, x, y, **kwargs)
    result = backend.train(params, DIGITS_ARCH, x, y, **kwargs)
    assert_same_training(expected, result, elementwise=epochs == 1)
    assert 0.0 < result.loss < 2.0 and result.accuracy > 0.5
    for name in params:
        np.testing.assert_array_equal(params[name], original[name])
    again = backend.train(params, DIGITS_ARCH, x, y, **kwargs)
    assert all(np.array_equal(again.params[k], result.params[k]) for k in params), "one thread: bit-for-bit repeatable"


@pytest.mark.parametrize(("arch", "n", "batch_size"), [
    (MLPArchitecture(5, (), 3), 23, 5),          # no hidden layer, a short last batch
    (MLPArchitecture(64, (32,), 10), 100, 16),
    (MLPArchitecture(5, (4, 3), 3), 9, 32),       # one batch smaller than batch_size
])
def test_training_matches_numpy_for_other_shapes(backend: OnnxBackend, arch: MLPArchitecture, n: int, batch_size: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.standard_normal((n, arch.inputs)).astype(np.float32)
    y = rng.integers(0, arch.classes, n)
    params = arch.init_params(1)
    for epochs in (1, 3):
        kwargs = dict(epochs=epochs, batch_size=batch_size, lr=0.05, seed=3)
        assert_same_training(training.train(params, arch, x, y, **kwargs), backend.train(params, arch, x, y, **kwargs))


def test_no_epochs_or_no_data_return_the_weights_unchanged(backend: OnnxBackend) -> None:
    arch = MLPArchitecture(5, (4,), 3)
    params = arch.init_params(0)
    x, y = np.zeros((0, 5), np.float32), np.zeros(0, np.int64)
    for args in ((x, y, 2), (np.ones((4, 5), np.float32), np.array([0, 1, 2, 0]), 0)):
        result = backend.train(params, arch, args[0], args[1], epochs=args[2], batch_size=4, lr=0.1, seed=0)
        expected = training.train(params, arch, args[0], args[1], epochs=args[2], batch_size=4, lr=0.1, seed=0)
        assert (result.loss, result.accuracy, result.num_examples) == (expected.loss, expected.accuracy, expected.num_examples)
        for name in params:
            np.testing.assert_array_equal(result.params[name], params[name])


def test_bad_inputs_raise_backend_errors(backend: OnnxBackend) -> None:
    arch = MLPArchitecture(5, (4,), 3)
    params = arch.init_params(0)
    x = np.ones((4, 5), np.float32)
    with pytest.raises(BackendError, match=r"labels must be in \[0, 3\)"):
        backend.train(params, arch, x, np.array([0, 1, 3, 0]), epochs=1, batch_size=2, lr=0.1, seed=0)
    with pytest.raises(BackendError, match="missing"):
        backend.train({"dense0.weight": params["dense0.weight"]}, arch, x, np.zeros(4, np.int64), epochs=1, batch_size=2, lr=0.1, seed=0)
    with pytest.raises(BackendError, match="shape"):
        backend.logits(params, arch, np.ones((4, 6), np.float32))
    with pytest.raises(BackendError, match="dense1.bias has shape"):
        inference_model(arch, {**params, "dense1.bias": np.zeros(4, np.float32)})


# ---------------------------------------------------------------------------------------------
# Inference and export


def test_logits_and_predictions_match_numpy_on_digits(backend: OnnxBackend, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = digits
    params = training.train(DIGITS_ARCH.init_params(0), DIGITS_ARCH, x[:1000], y[:1000],
                            epochs=2, batch_size=16, lr=0.1, seed=0).params
    expected = training.logits(params, DIGITS_ARCH, x)
    got = backend.logits(params, DIGITS_ARCH, x)
    assert got.shape == (len(x), 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(axis=1), expected.argmax(axis=1))
    assert (got.argmax(axis=1) == y).mean() > 0.8
    assert backend.logits(params, DIGITS_ARCH, x[:0]).shape == (0, 10)


def test_exported_model_runs_in_a_plain_onnxruntime_session(digits: tuple[np.ndarray, np.ndarray]) -> None:
    x = digits[0][:300]
    params = DIGITS_ARCH.init_params(5)
    data = inference_model(DIGITS_ARCH, params).SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])  # as another program would
    logits, probabilities, label = session.run(["logits", "probabilities", "label"], {"input": x})
    expected = training.logits(params, DIGITS_ARCH, x)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probabilities, softmax(expected), rtol=1e-5, atol=1e-6)
    assert label.dtype == np.int64
    np.testing.assert_array_equal(label, expected.argmax(axis=1))


# ---------------------------------------------------------------------------------------------
# Backbone + head

FEATURES = 16


def backbone_model(opset: int, ir_version: int, *, extra_output: bool = False, flat: bool = False) -> tuple[onnx.ModelProto, dict]:
    """A StandardScaler-like (x - mean) / scale, then a fixed projection 64 -> 16 and ReLU."""
    rng = np.random.default_rng(opset)
    weights = {
        "mean": rng.random(64, dtype=np.float32) * 0.5,
        "scale": rng.random(64, dtype=np.float32) + 0.5,
        "projection": (rng.standard_normal((64, FEATURES)) * 0.2).astype(np.float32),
    }
    nodes = [
        helper.make_node("Sub", ["pixels", "mean"], ["centred"]),
        helper.make_node("Div", ["centred", "scale"], ["scaled"]),
        helper.make_node("MatMul", ["scaled", "projection"], ["projected"]),
        helper.make_node("Relu", ["projected"], ["embedding"]),
    ]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", FEATURES])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", 64]))
    if flat:  # a 1-D output: not an embedding
        nodes.append(helper.make_node("ReduceSum", ["embedding"], ["total"], keepdims=0))
        outputs = [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])]
    graph = helper.make_graph(nodes, "backbone", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 64])],
                              outputs, initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    return model, weights


def backbone_numpy(weights: dict, x: np.ndarray) -> np.ndarray:
    return np.maximum(((x - weights["mean"]) / weights["scale"]) @ weights["projection"], 0.0)


@pytest.mark.parametrize(("opset", "ir_version"), [(17, 8), (13, 7), (19, 9)], ids=["same", "older", "newer"])
def test_composed_model_is_head_of_backbone(digits: tuple[np.ndarray, np.ndarray], opset: int, ir_version: int) -> None:
    x = digits[0][:200]
    head_arch = MLPArchitecture(FEATURES, (8,), 10)
    head_params = head_arch.init_params(3)
    backbone, weights = backbone_model(opset, ir_version)
    composed = compose_with_backbone(backbone, inference_model(head_arch, head_params))
    onnx.checker.check_model(composed, full_check=True)
    assert default_opset(composed) == max(opset, OPSET)
    assert len([o for o in composed.opset_import if o.domain == ""]) == 1
    assert [i.name for i in composed.graph.input] == ["pixels"]
    assert [o.name for o in composed.graph.output] == ["logits", "probabilities", "label"]

    session = onnxruntime.InferenceSession(composed.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, probabilities, label = session.run(None, {"pixels": x})
    embedded = backbone_numpy(weights, x)
    expected = training.logits(head_params, head_arch, embedded)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(probabilities, softmax(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(label, expected.argmax(axis=1))

    features = run_backbone(backbone.SerializeToString(), x)
    assert features.shape == (200, FEATURES) and features.dtype == np.float32
    np.testing.assert_allclose(features, embedded, rtol=1e-5, atol=1e-5)


def test_compose_rejects_mismatched_backbones() -> None:
    head = inference_model(MLPArchitecture(8, (), 3), MLPArchitecture(8, (), 3).init_params(0))
    with pytest.raises(BackendError, match="16 features but the head takes 8"):
        compose_with_backbone(backbone_model(17, 8)[0], head)
    with pytest.raises(BackendError, match="exactly one"):
        compose_with_backbone(backbone_model(17, 8, extra_output=True)[0], head)


def test_run_backbone_errors() -> None:
    x = np.ones((3, 64), np.float32)
    with pytest.raises(BackendError, match="exactly one input and one output"):
        run_backbone(backbone_model(17, 8, extra_output=True)[0].SerializeToString(), x)
    with pytest.raises(BackendError, match="expected 2-D"):
        run_backbone(backbone_model(17, 8, flat=True)[0].SerializeToString(), x)
    with pytest.raises(BackendError, match="cannot load the backbone"):
        run_backbone(b"not an onnx model", x)
    with pytest.raises(BackendError, match="failed on inputs of shape"):
        run_backbone(backbone_model(17, 8)[0].SerializeToString(), np.ones((3, 10), np.float32))
