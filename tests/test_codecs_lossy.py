"""Lossy delta codecs (broker/codecs.py: fp16, int8, int8-block, top-k) and error feedback
(edge_agent/error_feedback.py)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from fedmq.broker.codecs import CODECS, FLOAT16_MAX, Float16Codec, Int8Codec, TopKCodec, get_codec
from fedmq.broker.errors import Reason, RejectedMessage
from fedmq.broker.messages import UpdateMessage, decode_message
from fedmq.edge_agent.error_feedback import ErrorFeedback

# shapes include a scalar, an empty tensor and a tensor that is not a multiple of the int8 block
SHAPES = {"w": (3, 5), "b": (5,), "s": (), "e": (0, 4), "big": (600,)}


def shapes_for(name: str) -> dict[str, tuple[int, ...]]:
    # Float32Codec.encode (np.ascontiguousarray) turns a 0-d delta into shape (1,), which its own
    # decode then refuses; that codec is not this module's to change, so fp32 skips the scalar
    return {k: v for k, v in SHAPES.items() if k != "s"} if name == "fp32" else SHAPES


def delta(seed: int = 0, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


def rejected(call, reason: Reason) -> RejectedMessage:
    with pytest.raises(RejectedMessage) as info:
        call()
    assert info.value.reason is reason, info.value
    return info.value


def with_tensor(wire: dict[str, np.ndarray], name: str, value: np.ndarray | None) -> dict[str, np.ndarray]:
    out = dict(wire)
    if value is None:
        del out[name]
    else:
        out[name] = value
    return out


# -- registry ----------------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert sorted(CODECS) == ["fp16", "fp32", "int8", "int8-block", "topk-fp16", "topk-fp32"]
    for name, codec in CODECS.items():
        assert get_codec(name) is codec and codec.name == name
    assert isinstance(get_codec("int8-block"), Int8Codec) and get_codec("int8-block").block == 256
    assert get_codec("int8").block is None
    assert get_codec("topk-fp16").value_dtype == np.float16 and get_codec("topk-fp32").fraction == 0.02


@pytest.mark.parametrize("name", ["topk", "int4", "int8-block128", "topk-int8"])
def test_unknown_lossy_names(name: str) -> None:
    rejected(lambda: get_codec(name), Reason.CODEC)


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_round_trips_shapes_and_dtype(name: str) -> None:
    codec, shapes = get_codec(name), shapes_for(name)
    out = codec.decode(codec.encode(delta(0, shapes)), shapes)
    assert list(out) == list(shapes)
    for key, shape in shapes.items():
        assert out[key].shape == shape and out[key].dtype == np.float32


@pytest.mark.parametrize("name", sorted(CODECS))
def test_every_codec_passes_the_wire(name: str) -> None:
    codec, shapes = get_codec(name), shapes_for(name)
    wire = codec.encode(delta(0, shapes))
    update = UpdateMessage(device="dev-1", update_id="u1", base_version=1, num_examples=3, codec=name,
                           tensors=wire)
    again = decode_message(update.encode(), max_bytes=1 << 20, expect=UpdateMessage)
    # the receiver's read-only views decode exactly like the sender's arrays
    out, expected = codec.decode(again.tensors, shapes), codec.decode(wire, shapes)
    for key in shapes:
        np.testing.assert_array_equal(out[key], expected[key])


# -- fp16 --------------------------------------------------------------------------------------------


def test_fp16_within_float16_precision() -> None:
    d = delta(1)
    wire = Float16Codec().encode(d)
    assert all(v.dtype == np.float16 for v in wire.values())
    out = Float16Codec().decode(wire, SHAPES)
    for key in SHAPES:
        # round to nearest: relative error <= 2**-11 for normal numbers
        np.testing.assert_allclose(out[key], d[key], rtol=2**-11, atol=2**-24)


def test_fp16_clips_overflow_instead_of_inf() -> None:
    wire = Float16Codec().encode({"x": np.array([1e6, -1e9, 70000.0, 3.0], np.float32)})
    assert np.isfinite(wire["x"]).all()
    assert wire["x"].tolist() == [FLOAT16_MAX, -FLOAT16_MAX, FLOAT16_MAX, 3.0]


def test_fp16_rejections() -> None:
    codec = Float16Codec()
    good = codec.encode(delta())
    rejected(lambda: codec.decode(with_tensor(good, "b", None), SHAPES), Reason.TENSORS)
    rejected(lambda: codec.decode(with_tensor(good, "x", np.zeros(1, np.float16)), SHAPES), Reason.TENSORS)
    rejected(lambda: codec.decode(with_tensor(good, "b", np.zeros(5, np.float32)), SHAPES), Reason.DTYPE)
    rejected(lambda: codec.decode(with_tensor(good, "w", np.zeros((5, 3), np.float16)), SHAPES), Reason.SHAPE)
    rejected(lambda: codec.decode(with_tensor(good, "s", np.zeros(1, np.float16)), SHAPES), Reason.SHAPE)


# -- int8 --------------------------------------------------------------------------------------------


def test_int8_by_hand() -> None:
    x = np.array([1.27, -0.635, 0.0, 1.27], np.float32)
    wire = Int8Codec(rng=0).encode({"x": x})
    assert set(wire) == {"x:q", "x:scale"}
    assert wire["x:q"].dtype == np.int8 and wire["x:q"].shape == (4,)
    assert wire["x:scale"].dtype == np.float32 and wire["x:scale"].shape == (1,)
    assert wire["x:scale"][0] == pytest.approx(0.01)
    q = wire["x:q"].tolist()
    assert q[0] == q[3] == 127 and q[2] == 0 and q[1] in (-63, -64)  # -63.5 rounds either way


@pytest.mark.parametrize("block", [None, 256])
def test_int8_error_below_one_scale(block: int | None) -> None:
    codec = Int8Codec(block=block, rng=1)
    d = delta(2)
    d["big"][300:] *= 1000  # second block much larger: per-block scales keep the first block precise
    wire = codec.encode(d)
    out = codec.decode(wire, SHAPES)
    for key, shape in SHAPES.items():
        size = math.prod(shape)
        scale = wire[f"{key}:scale"]
        assert scale.shape == ((1,) if block is None else (-(-size // 256),))
        per_element = np.repeat(scale, block)[:size] if block else np.full(size, scale[0])
        err = np.abs(out[key] - d[key]).reshape(-1)
        assert (err <= per_element * (1 + 1e-5)).all()
        assert np.abs(wire[f"{key}:q"]).max(initial=0) <= 127


def test_int8_block_scales_are_per_block() -> None:
    x = np.concatenate([np.full(256, 0.5), np.full(256, -127.0), np.full(10, 2.54)]).astype(np.float32)
    wire = Int8Codec(block=256, rng=0).encode({"x": x})
    np.testing.assert_allclose(wire["x:scale"], [0.5 / 127, 1.0, 0.02], rtol=1e-6)
    # each block's peak maps to +-127 exactly, with no rounding noise
    assert (wire["x:q"][:256] == 127).all() and (wire["x:q"][256:512] == -127).all() and (wire["x:q"][512:] == 127).all()
    out = Int8Codec(block=256).decode(wire, {"x": (522,)})
    np.testing.assert_allclose(out["x"], x, rtol=1e-6)


@pytest.mark.parametrize("block", [None, 256])
def test_int8_zero_and_empty_are_safe(block: int | None) -> None:
    codec = Int8Codec(block=block, rng=0)
    shapes = {"z": (3, 300), "s": (), "e": (0,)}
    wire = codec.encode({name: np.zeros(shape, np.float32) for name, shape in shapes.items()})
    assert not any(v.any() for v in wire.values())
    assert wire["e:scale"].shape == ((1,) if block is None else (0,))
    out = codec.decode(wire, shapes)
    assert all(not v.any() and v.shape == shapes[k] for k, v in out.items())


@pytest.mark.parametrize("block", [None, 256])
def test_int8_stochastic_rounding_is_unbiased(block: int | None) -> None:
    # 0.3 scales sit between two levels: round-to-nearest would be biased by up to scale/2
    x = {"x": np.concatenate([[1.27], np.linspace(-1.0, 1.0, 299)]).astype(np.float32)}
    codec = Int8Codec(block=block, rng=np.random.default_rng(5))
    runs = 2000
    total = np.zeros(300)
    for _ in range(runs):
        total += codec.decode(codec.encode(x), {"x": (300,)})["x"]
    mean = total / runs
    # every scale here is at most 0.01; one element's rounding error has std <= scale/2, so the
    # mean of `runs` draws is within 5 of its standard deviations of x
    tolerance = 5 * (0.01 / 2) / math.sqrt(runs)
    assert np.abs(mean - x["x"]).max() < tolerance
    # round-to-nearest would not pass: its bias reaches almost scale/2 on some elements
    assert np.abs(np.round(x["x"] / 0.01) * 0.01 - x["x"]).max() > 5 * tolerance


def test_int8_seeded_is_reproducible() -> None:
    d = delta(3)
    first, second = Int8Codec(rng=7).encode(d), Int8Codec(rng=7).encode(d)
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_int8_refuses_non_finite_on_encode() -> None:
    with pytest.raises(ValueError):
        Int8Codec().encode({"x": np.array([1.0, np.nan], np.float32)})


@pytest.mark.parametrize("block", [None, 256])
def test_int8_rejections(block: int | None) -> None:
    codec = Int8Codec(block=block, rng=0)
    good = codec.encode(delta())
    bad_scale_count = np.ones(2 if block is None else 4, np.float32)

    def decode(name: str, value: np.ndarray | None):
        return lambda: codec.decode(with_tensor(good, name, value), SHAPES)

    rejected(decode("w:q", None), Reason.TENSORS)
    rejected(decode("w:scale", None), Reason.TENSORS)
    rejected(lambda: codec.decode({**good, "w": good["w:q"]}, SHAPES), Reason.TENSORS)
    rejected(decode("w:q", good["w:q"].astype(np.int16)), Reason.DTYPE)
    rejected(decode("w:q", good["w:q"].view(np.uint8)), Reason.DTYPE)
    rejected(decode("w:scale", good["w:scale"].astype(np.float16)), Reason.DTYPE)
    rejected(decode("w:q", good["w:q"].reshape(-1)), Reason.SHAPE)
    rejected(decode("s:q", np.zeros(1, np.int8)), Reason.SHAPE)
    rejected(decode("big:scale", bad_scale_count), Reason.SHAPE)
    rejected(decode("big:scale", np.ones((), np.float32)), Reason.SHAPE)
    n = good["big:scale"].shape[0]
    for bad in (-1.0, np.nan, np.inf, 1e37):
        error = rejected(decode("big:scale", np.full(n, bad, np.float32)), Reason.FIELD)
        assert "'big:scale'" in error.detail
    rejected(decode("b:q", np.array([-128, 0, 0, 0, 0], np.int8)), Reason.FIELD)


# -- top-k -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["fp32", "fp16"])
def test_topk_keeps_exactly_the_k_largest_magnitudes(values: str) -> None:
    codec = TopKCodec(values, fraction=0.1)
    d = delta(4)
    wire = codec.encode(d)
    out = codec.decode(wire, SHAPES)
    for key, shape in SHAPES.items():
        size = math.prod(shape)
        k = 0 if size == 0 else max(1, math.ceil(0.1 * size))
        indices = wire[f"{key}:indices"]
        assert indices.dtype == np.uint16 and indices.shape == (k,)  # small tensors: 2-byte indices
        assert (np.diff(indices.astype(np.int64)) > 0).all()
        assert wire[f"{key}:values"].dtype == codec.value_dtype
        flat = d[key].reshape(-1)
        expected = np.sort(np.argsort(-np.abs(flat), kind="stable")[:k])  # no ties in normal draws
        np.testing.assert_array_equal(indices, expected)
        kept = np.zeros(size, np.float32)
        kept[expected] = flat[expected].astype(codec.value_dtype)
        np.testing.assert_array_equal(out[key].reshape(-1), kept)


def test_topk_indices_are_uint32_beyond_65536_elements_and_both_decode() -> None:
    codec = TopKCodec("fp16", fraction=0.001)
    big = np.zeros(70_000, np.float32)
    big[[5, 65_536, 69_999]] = [3.0, -4.0, 5.0]
    wire = codec.encode({"big": big, "small": np.arange(10, dtype=np.float32)})
    assert wire["big:indices"].dtype == np.uint32 and wire["small:indices"].dtype == np.uint16
    out = codec.decode(wire, {"big": (70_000,), "small": (10,)})
    assert np.flatnonzero(out["big"]).tolist() == [5, 65_536, 69_999]   # indices past 65535 survive
    assert out["big"][[5, 65_536, 69_999]].tolist() == [3.0, -4.0, 5.0]
    assert out["small"].tolist() == [0] * 9 + [9]


def test_topk_by_hand() -> None:
    codec = TopKCodec("fp32", fraction=0.4)
    wire = codec.encode({"x": np.array([[0.1, -5.0, 0.2], [3.0, -0.3, 0.0]], np.float32)})
    assert wire["x:indices"].tolist() == [1, 3, 4]  # ceil(0.4 * 6) = 3: -5, 3, -0.3
    assert wire["x:values"].tolist() == [-5.0, 3.0, np.float32(-0.3)]
    out = codec.decode(wire, {"x": (2, 3)})["x"]
    assert out.tolist() == [[0, -5, 0], [3, np.float32(-0.3), 0]]


def test_topk_k_is_at_least_one_and_rounds_up() -> None:
    codec = TopKCodec()
    assert [codec.k(n) for n in (0, 1, 49, 50, 51, 100_000, 100_001)] == [0, 1, 1, 1, 2, 2000, 2001]
    assert TopKCodec(fraction=1).k(7) == 7
    for bad in (0, -0.1, 1.5, float("nan"), "0.1"):
        with pytest.raises(ValueError):
            TopKCodec(fraction=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TopKCodec("int8")


def test_topk_fp16_clips_values() -> None:
    wire = TopKCodec("fp16", fraction=1).encode({"x": np.array([1e6, -2.0], np.float32)})
    assert wire["x:values"].tolist() == [FLOAT16_MAX, -2.0]


def test_topk_decoder_accepts_any_count_up_to_size() -> None:
    codec = get_codec("topk-fp32")  # fraction 0.01 on the aggregator; the device sent everything
    wire = TopKCodec(fraction=1).encode(delta(5))
    out = codec.decode(wire, SHAPES)
    for key in SHAPES:
        np.testing.assert_array_equal(out[key], delta(5)[key])
    empty = {"x:indices": np.zeros(0, np.uint32), "x:values": np.zeros(0, np.float32)}
    assert not codec.decode(empty, {"x": (4,)})["x"].any()


@pytest.mark.parametrize("values", ["fp32", "fp16"])
def test_topk_rejections(values: str) -> None:
    codec = TopKCodec(values)
    vdt = codec.value_dtype
    shapes = {"x": (2, 5), "y": (3,)}
    good = {"x:indices": np.array([0, 3, 9], np.uint32), "x:values": np.array([1, 2, 3], vdt),
            "y:indices": np.array([1], np.uint32), "y:values": np.array([4], vdt)}
    assert codec.decode(good, shapes)["x"].reshape(-1).tolist() == [1, 0, 0, 2, 0, 0, 0, 0, 0, 3]

    def decode(name: str, value: np.ndarray | None):
        return lambda: codec.decode(with_tensor(good, name, value), shapes)

    rejected(decode("x:indices", None), Reason.TENSORS)
    rejected(decode("y:values", None), Reason.TENSORS)
    rejected(decode("z:values", np.zeros(1, vdt)), Reason.TENSORS)
    rejected(lambda: codec.decode({"x": np.zeros((2, 5), np.float32), "y:indices": good["y:indices"],
                                   "y:values": good["y:values"]}, shapes), Reason.TENSORS)
    rejected(decode("x:indices", np.array([0, 3, 9], np.int64)), Reason.DTYPE)
    rejected(decode("x:indices", np.array([0, 3, 9], np.int32)), Reason.DTYPE)
    other = np.float16 if vdt == np.float32 else np.float32
    rejected(decode("x:values", np.array([1, 2, 3], other)), Reason.DTYPE)
    rejected(decode("x:values", np.array([1, 2, 3], np.int8)), Reason.DTYPE)
    rejected(decode("x:indices", np.array([[0, 3, 9]], np.uint32)), Reason.SHAPE)
    rejected(decode("x:indices", np.arange(11, dtype=np.uint32)), Reason.SHAPE)  # more entries than elements
    rejected(decode("x:values", np.array([1, 2], vdt)), Reason.SHAPE)  # value count mismatch
    rejected(decode("x:values", np.array([1, 2, 3, 4], vdt)), Reason.SHAPE)
    rejected(decode("x:values", np.array([[1, 2, 3]], vdt)), Reason.SHAPE)
    for bad, what in (([0, 3, 10], "out of range"), ([0, 3, 2**32 - 1], "out of range"),
                      ([3, 0, 9], "not strictly increasing"), ([0, 3, 3], "not strictly increasing")):
        error = rejected(decode("x:indices", np.array(bad, np.uint32)), Reason.FIELD)
        assert what in error.detail and "'x:indices'" in error.detail


# -- wire sizes ------------------------------------------------------------------------------------

BIG = {"dense0.weight": (250, 400), "dense0.bias": (400,)}  # 100,400 parameters


def update_bytes(name: str, codec=None) -> int:
    codec = codec or get_codec(name)
    tensors = codec.encode(delta(6, BIG))
    return len(UpdateMessage(device="dev-1", update_id="u1", base_version=1, num_examples=10, codec=name,
                             tensors=tensors).encode())


def test_wire_size_ratios() -> None:
    fp32 = update_bytes("fp32")
    assert fp32 > 4 * 100_400
    ratios = {name: fp32 / update_bytes(name) for name in CODECS}
    assert ratios["fp16"] >= 1.95
    assert ratios["int8"] >= 3.9
    assert ratios["int8-block"] >= 3.9
    assert ratios["topk-fp32"] >= 20
    assert ratios["topk-fp16"] >= 20


# -- error feedback ----------------------------------------------------------------------------------


def ef_run(steps: int, feedback: ErrorFeedback | None, codec: TopKCodec, shapes):
    """Sum of true and of decoded deltas when each true delta is a fixed direction plus noise."""
    rng = np.random.default_rng(8)
    drift = {name: rng.normal(size=shape).astype(np.float32) * 0.1 for name, shape in shapes.items()}
    true_sum = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    sent_sum = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    norms = []
    for _ in range(steps):
        d = {name: drift[name] + rng.normal(size=shape).astype(np.float32) * 0.05 for name, shape in shapes.items()}
        compensated = feedback.compensate(d) if feedback else d
        decoded = codec.decode(codec.encode(compensated), shapes)
        if feedback:
            feedback.update(compensated, decoded)
            norms.append(feedback.norm())
        for name in shapes:
            true_sum[name] += d[name]
            sent_sum[name] += decoded[name]
    gap = math.sqrt(sum(float(((true_sum[n] - sent_sum[n]) ** 2).sum()) for n in shapes))
    total = math.sqrt(sum(float((true_sum[n] ** 2).sum()) for n in shapes))
    return gap / total, norms


def test_error_feedback_sum_of_sent_deltas_tracks_the_true_sum() -> None:
    shapes = {"w": (20, 25), "b": (25,)}
    codec = TopKCodec("fp32", fraction=0.05)
    feedback = ErrorFeedback()
    gap_short, _ = ef_run(20, ErrorFeedback(), codec, shapes)
    gap_long, norms = ef_run(300, feedback, codec, shapes)
    gap_without, _ = ef_run(300, None, codec, shapes)
    assert gap_long < gap_short / 3, (gap_long, gap_short)
    assert gap_long < 0.1
    assert gap_without > 0.5, "top-k alone loses most of the drift"
    # the residual stops growing: the last 100 steps stay within the range of the middle ones
    assert max(norms[-100:]) < 1.5 * max(norms[100:200])


def test_error_feedback_identity_codec_has_no_residual() -> None:
    feedback, shapes = ErrorFeedback(), shapes_for("fp32")
    compensated = feedback.compensate(delta(9, shapes))
    feedback.update(compensated, get_codec("fp32").decode(get_codec("fp32").encode(compensated), shapes))
    assert feedback.norm() == 0.0


def test_error_feedback_compensate_adds_residual() -> None:
    feedback = ErrorFeedback()
    feedback.update({"x": np.array([1.0, 2.0], np.float32)}, {"x": np.array([1.0, 0.0], np.float32)})
    out = feedback.compensate({"x": np.array([0.5, 0.5])})
    assert out["x"].dtype == np.float32 and out["x"].tolist() == [0.5, 2.5]
    assert feedback.residual["x"].tolist() == [0.0, 2.0]
    with pytest.raises(ValueError):
        feedback.update({"x": np.zeros(2)}, {"y": np.zeros(2)})


def test_error_feedback_save_load_round_trip(tmp_path) -> None:
    path = tmp_path / "residual.npz"
    feedback = ErrorFeedback()
    codec = TopKCodec(fraction=0.1)
    compensated = feedback.compensate(delta(10))
    feedback.update(compensated, codec.decode(codec.encode(compensated), SHAPES))
    feedback.save(path)
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was renamed away"
    restored = ErrorFeedback()
    assert restored.load(path, SHAPES)
    assert list(restored.residual) == list(SHAPES)
    for key in SHAPES:
        np.testing.assert_array_equal(restored.residual[key], feedback.residual[key])
        assert restored.residual[key].dtype == np.float32
    assert restored.norm() == pytest.approx(feedback.norm()) and feedback.norm() > 0


def test_error_feedback_missing_or_corrupt_file_starts_fresh(tmp_path, caplog) -> None:
    feedback = ErrorFeedback()
    assert not feedback.load(tmp_path / "none.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="fedmq.edge_agent.error_feedback"):
        assert not feedback.load(bad)
    assert "unreadable" in caplog.text and feedback.residual == {}


def test_error_feedback_discards_a_residual_for_another_model(tmp_path, caplog) -> None:
    path = tmp_path / "residual.npz"
    feedback = ErrorFeedback()
    feedback.update({"w": np.ones((2, 3), np.float32)}, {"w": np.zeros((2, 3), np.float32)})
    feedback.save(path)
    with caplog.at_level(logging.WARNING, logger="fedmq.edge_agent.error_feedback"):
        assert not ErrorFeedback().load(path, {"w": (3, 2)})
        assert not ErrorFeedback().load(path, {"w": (2, 3), "b": (3,)})
    assert caplog.text.count("discarding error-feedback residual") == 2
    # without shapes it loads, then compensating a delta of another model discards it
    loaded = ErrorFeedback()
    assert loaded.load(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmq.edge_agent.error_feedback"):
        out = loaded.compensate({"v": np.ones(4, np.float32)})
    assert out["v"].tolist() == [1, 1, 1, 1] and loaded.residual == {}
    assert "do not match" in caplog.text


@pytest.mark.parametrize("codec", ["fp16", "int8", "int8-block", "topk-fp32", "topk-fp16"])
def test_agent_update_in_a_lossy_codec_is_accepted_and_aggregated(tmp_path, codec: str) -> None:
    """The task's codec flows from the model to the agent's update and back through the aggregator."""
    from fedmq.aggregator.config import AggregatorConfig
    from fedmq.aggregator.daemon import Aggregator
    from fedmq.aggregator.rounds import RoundPolicy
    from fedmq.broker.architecture import MLPArchitecture
    from fedmq.broker.messages import Task
    from fedmq.edge_agent.agent import Agent
    from fedmq.edge_agent.config import AgentConfig

    arch = MLPArchitecture(6, (5,), 3)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((40, 6)).astype(np.float32), y=rng.integers(0, 3, 40))
    agg = Aggregator(AggregatorConfig(fleet="f1", state_dir=tmp_path / "agg", arch=arch, policy=RoundPolicy(1, 1),
                                      task=Task(epochs=1, batch_size=8, codec=codec)))
    agent = Agent(AgentConfig(device_id="d1", fleet="f1", state_dir=tmp_path / "dev", data=tmp_path / "data.npz",
                              backend="numpy"))
    model = agent.install(agg.model_payload)
    update, payload = agent.train_once(model)
    assert update.codec == codec
    receipt = agg.ingest("d1", payload)
    assert receipt.status == "accepted", receipt.detail
    before = {k: np.array(v) for k, v in agg.model.params.items()}
    agg.close_round()
    assert any(not np.array_equal(agg.model.params[k], before[k]) for k in before)


def test_agent_keeps_the_top_k_residual_across_updates_and_restarts(tmp_path) -> None:
    from fedmq.broker.architecture import MLPArchitecture
    from fedmq.broker.messages import ModelMessage, Task, UpdateMessage, decode_message
    from fedmq.edge_agent.agent import Agent
    from fedmq.edge_agent.config import AgentConfig

    arch = MLPArchitecture(6, (5,), 3)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.standard_normal((40, 6)).astype(np.float32), y=rng.integers(0, 3, 40))
    config = AgentConfig(device_id="d1", fleet="f1", state_dir=tmp_path / "dev", data=tmp_path / "data.npz",
                         backend="numpy")
    agent = Agent(config)
    model = agent.install(ModelMessage("f1", 1, 0, arch, Task(epochs=1, batch_size=8, codec="topk-fp32"),
                                       arch.init_params(0), 1.0).encode())
    update, payload = agent.train_once(model)
    sent = decode_message(payload, max_bytes=1 << 20, expect=UpdateMessage)
    assert sum(v.size for k, v in sent.tensors.items() if k.endswith(":values")) < arch.num_params() / 10
    residual = agent.error_feedback.residual
    assert agent.error_feedback.norm() > 0, "what top-k left out is kept"
    restarted = Agent(config)
    for name, value in residual.items():
        np.testing.assert_array_equal(restarted.error_feedback.residual[name], value)
