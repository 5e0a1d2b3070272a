"""Delta codecs (broker/codecs.py) and model architectures (broker/architecture.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmq.broker.architecture import MAX_LAYERS, MAX_WIDTH, MLPArchitecture
from fedmq.broker.codecs import CODECS, Float32Codec, check_names, get_codec
from fedmq.broker.errors import Reason, RejectedMessage

SHAPES = {"w": (2, 3), "b": (3,)}


def wire(**overrides) -> dict[str, np.ndarray]:
    tensors = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([0.5, -1.0, 2.0], np.float32)}
    tensors.update(overrides)
    return {k: v for k, v in tensors.items() if v is not None}


def rejected(call, reason: Reason) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        call()
    assert info.value.reason is reason, info.value
    return info.value


# -- fp32 --------------------------------------------------------------------------------------------


def test_fp32_is_registered_under_its_name() -> None:
    codec = get_codec("fp32")
    assert isinstance(codec, Float32Codec)
    assert codec.name == "fp32"
    assert CODECS["fp32"] is codec


def test_fp32_encode_casts_to_contiguous_float32() -> None:
    delta = {"w": np.array([[0.1, 2.0], [3.0, -4.5]], dtype=np.float64).T, "b": np.array([1, 2], dtype=np.int64)}
    out = Float32Codec().encode(delta)
    assert list(out) == ["w", "b"]
    assert out["w"].dtype == np.float32 and out["w"].flags.c_contiguous
    assert out["w"].tolist() == [[np.float32(0.1), 3.0], [2.0, -4.5]]
    assert out["b"].dtype == np.float32 and out["b"].tolist() == [1.0, 2.0]


def test_fp32_decode_returns_the_tensors_unchanged() -> None:
    tensors = wire()
    out = Float32Codec().decode(tensors, SHAPES)
    assert set(out) == {"w", "b"}
    assert out["w"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert out["b"].tolist() == [0.5, -1.0, 2.0]
    assert np.shares_memory(out["w"], tensors["w"]), "fp32 is the identity: no copy"


def test_fp32_encode_then_decode_round_trip() -> None:
    delta = {"w": np.full((2, 3), 0.25), "b": np.array([1.0, 2.0, 3.0])}
    codec = get_codec("fp32")
    out = codec.decode(codec.encode(delta), SHAPES)
    np.testing.assert_array_equal(out["w"], np.full((2, 3), 0.25, np.float32))
    np.testing.assert_array_equal(out["b"], np.array([1.0, 2.0, 3.0], np.float32))


def test_fp32_decode_accepts_shapes_given_as_lists() -> None:
    out = Float32Codec().decode(wire(), {"w": [2, 3], "b": [3]})  # type: ignore[dict-item]
    assert out["w"].shape == (2, 3)


@pytest.mark.parametrize(
    ("tensors", "missing", "unexpected"),
    [
        (wire(b=None), ["b"], []),
        (wire(extra=np.zeros(1, np.float32)), [], ["extra"]),
        (wire(b=None, bias=np.zeros(3, np.float32)), ["b"], ["bias"]),
        ({}, ["b", "w"], []),
    ],
    ids=["missing", "unexpected", "renamed", "empty"],
)
def test_fp32_wrong_names(tensors: dict, missing: list[str], unexpected: list[str]) -> None:
    error = rejected(lambda: Float32Codec().decode(tensors, SHAPES), Reason.TENSORS)
    assert f"missing {missing}" in error.detail
    assert f"unexpected {unexpected}" in error.detail


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, np.uint8])
def test_fp32_wrong_dtype(dtype) -> None:
    error = rejected(lambda: Float32Codec().decode(wire(b=np.zeros(3, dtype)), SHAPES), Reason.DTYPE)
    assert "'b'" in error.detail


@pytest.mark.parametrize("shape", [(3, 2), (6,), (2, 3, 1), (1, 2, 3), ()], ids=str)
def test_fp32_wrong_shape(shape: tuple[int, ...]) -> None:
    error = rejected(lambda: Float32Codec().decode(wire(w=np.zeros(shape, np.float32)), SHAPES), Reason.SHAPE)
    assert "'w'" in error.detail


def test_check_names_accepts_same_names_in_any_order() -> None:
    check_names({"b": np.zeros(1), "a": np.zeros(1)}, {"a": (1,), "b": (1,)})
    rejected(lambda: check_names({"a": np.zeros(1)}, {"a": (1,), "b": (1,)}), Reason.TENSORS)


@pytest.mark.parametrize("name", ["FP32", "", "topk", None, 32, ["fp32"]])
def test_unknown_codec(name) -> None:
    error = rejected(lambda: get_codec(name), Reason.CODEC)
    assert "fp32" in error.detail, "the detail lists the known codecs"


# -- MLPArchitecture ---------------------------------------------------------------------------------


def test_param_shapes_by_hand() -> None:
    arch = MLPArchitecture(64, (32,), 10)
    shapes = arch.param_shapes()
    assert list(shapes.items()) == [
        ("dense0.weight", (64, 32)),
        ("dense0.bias", (32,)),
        ("dense1.weight", (32, 10)),
        ("dense1.bias", (10,)),
    ]
    assert arch.widths == (64, 32, 10)
    assert arch.num_layers == 2


def test_num_params_by_hand() -> None:
    # 64*32 + 32 + 32*10 + 10
    assert MLPArchitecture(64, (32,), 10).num_params() == 2048 + 32 + 320 + 10 == 2410
    # 4*2 + 2 (no hidden layer: logistic regression)
    assert MLPArchitecture(4, (), 2).num_params() == 10
    # 3*5 + 5 + 5*4 + 4 + 4*2 + 2
    assert MLPArchitecture(3, (5, 4), 2).num_params() == 54


def test_no_hidden_layer_is_one_dense_layer() -> None:
    assert MLPArchitecture(4, (), 3).param_shapes() == {"dense0.weight": (4, 3), "dense0.bias": (3,)}


def test_init_params_float32_shapes_and_zero_biases() -> None:
    arch = MLPArchitecture(64, (32,), 10)
    params = arch.init_params(seed=1)
    assert {k: v.shape for k, v in params.items()} == arch.param_shapes()
    assert all(v.dtype == np.float32 for v in params.values())
    assert not params["dense0.bias"].any() and not params["dense1.bias"].any()
    assert params["dense0.weight"].any() and params["dense1.weight"].any()


def test_init_params_he_scale() -> None:
    # He initialisation: std = sqrt(2 / fan_in); 2048 and 320 draws estimate it within a few percent.
    params = MLPArchitecture(64, (32,), 10).init_params(seed=3)
    assert float(params["dense0.weight"].std()) == pytest.approx(math.sqrt(2 / 64), rel=0.1)
    assert float(params["dense1.weight"].std()) == pytest.approx(math.sqrt(2 / 32), rel=0.2)
    assert abs(float(params["dense0.weight"].mean())) < 0.03


def test_init_params_deterministic_per_seed_and_different_across_seeds() -> None:
    arch = MLPArchitecture(8, (4,), 3)
    first, again, other = arch.init_params(7), arch.init_params(7), arch.init_params(8)
    for name in arch.param_shapes():
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["dense0.weight"], other["dense0.weight"])
    assert not np.array_equal(first["dense1.weight"], other["dense1.weight"])


@pytest.mark.parametrize(
    ("inputs", "hidden", "classes"),
    [
        (0, (4,), 2),
        (-1, (4,), 2),
        (True, (4,), 2),
        (2.0, (4,), 2),
        ("8", (4,), 2),
        (MAX_WIDTH + 1, (4,), 2),
        (8, (0,), 2),
        (8, (4, -2), 2),
        (8, (True,), 2),
        (8, (4.0,), 2),
        (8, (MAX_WIDTH + 1,), 2),
        (8, (4,), 1),
        (8, (4,), 0),
        (8, (4,), MAX_WIDTH + 1),
        (8, (4,) * (MAX_LAYERS + 1), 2),
    ],
    ids=str,
)
def test_invalid_widths(inputs, hidden, classes) -> None:
    with pytest.raises(ValueError):
        MLPArchitecture(inputs, hidden, classes)


def test_width_and_depth_limits_are_inclusive() -> None:
    assert MLPArchitecture(MAX_WIDTH, (MAX_WIDTH,), MAX_WIDTH).widths == (65536, 65536, 65536)
    assert MLPArchitecture(2, (3,) * MAX_LAYERS, 2).num_layers == 33


def test_wire_round_trip() -> None:
    arch = MLPArchitecture(64, (32, 16), 10)
    assert arch.to_wire() == {"type": "mlp", "inputs": 64, "hidden": [32, 16], "classes": 10}
    assert MLPArchitecture.from_wire(arch.to_wire()) == arch


@pytest.mark.parametrize(
    "value",
    [
        None,
        [64, [32], 10],
        "mlp",
        {"type": "cnn", "inputs": 64, "hidden": [32], "classes": 10},
        {"inputs": 64, "hidden": [32], "classes": 10},
        {"type": "mlp", "hidden": [32], "classes": 10},
        {"type": "mlp", "inputs": 64, "classes": 10},
        {"type": "mlp", "inputs": 64, "hidden": [32], "classes": 10, "activation": "relu"},
        {"type": "mlp", "inputs": 64, "hidden": 32, "classes": 10},
        {"type": "mlp", "inputs": 64, "hidden": (32,), "classes": 10},
        {"type": "mlp", "inputs": 64, "hidden": "32", "classes": 10},
        {"type": "mlp", "inputs": "64", "hidden": [32], "classes": 10},
        {"type": "mlp", "inputs": 64.0, "hidden": [32], "classes": 10},
        {"type": "mlp", "inputs": True, "hidden": [32], "classes": 10},
        {"type": "mlp", "inputs": 64, "hidden": [0], "classes": 10},
        {"type": "mlp", "inputs": 64, "hidden": [None], "classes": 10},
        {"type": "mlp", "inputs": 64, "hidden": [32], "classes": 1},
        {"type": "mlp", "inputs": 64, "hidden": [4] * (MAX_LAYERS + 1), "classes": 10},
    ],
)
def test_from_wire_rejections(value) -> None:
    rejected(lambda: MLPArchitecture.from_wire(value), Reason.FIELD)
