"""The Wasm backend: the shipped kernel, its reproducible build, agreement with the numpy
reference, and the sandbox (fuel, memory cap, no imports) against hostile hand-written modules."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import wasmtime
from sklearn.datasets import load_digits

from fedmq.broker.architecture import MLPArchitecture
from fedmq.edge_agent import training, wasm_backend
from fedmq.edge_agent.backends import BackendError
from fedmq.edge_agent.wasm import build
from fedmq.edge_agent.wasm_backend import KERNEL_PATH, SandboxReason, WasmBackend, WasmSandboxError

DIGITS = load_digits()
DIGITS_X = (DIGITS.data / 16.0).astype(np.float32)
DIGITS_Y = DIGITS.target.astype(np.int64)


def dataset(arch: MLPArchitecture, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if arch.inputs == 64:
        return DIGITS_X[:n], DIGITS_Y[:n]
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, arch.inputs)).astype(np.float32), rng.integers(0, arch.classes, n)


def assert_same_training(got: training.TrainResult, want: training.TrainResult) -> None:
    assert got.params.keys() == want.params.keys()
    for name, value in want.params.items():
        assert got.params[name].dtype == np.float32
        np.testing.assert_allclose(got.params[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    assert got.loss == pytest.approx(want.loss, rel=1e-5)
    assert got.accuracy == want.accuracy
    assert got.num_examples == want.num_examples


def write_wat(path: Path, text: str) -> Path:
    path.write_bytes(wasmtime.wat2wasm(text))
    return path


def kernel_exports(train_body: str = "(i32.const 0)", logits_body: str = "(i32.const 0)", memory_pages: int = 2) -> str:
    """A module with the kernel's exports; each function takes its argument block's offset."""
    return f"""
      (memory (export "memory") {memory_pages})
      (func (export "train_epoch") (param $args i32) (result i32) {train_body})
      (func (export "logits") (param $args i32) (result i32) {logits_body})
    """


SMALL = MLPArchitecture(5, (), 3)


def assert_trains_correctly(backend: WasmBackend) -> None:
    x, y = dataset(SMALL, 23, seed=4)
    params = SMALL.init_params(1)
    want = training.train(params, SMALL, x, y, epochs=2, batch_size=4, lr=0.1, seed=3)
    assert_same_training(backend.train(params, SMALL, x, y, epochs=2, batch_size=4, lr=0.1, seed=3), want)


# ---- the shipped module -----------------------------------------------------------------------------

def test_shipped_kernel_has_no_imports_and_the_kernel_exports() -> None:
    module = wasmtime.Module.from_file(wasmtime.Engine(), KERNEL_PATH)
    assert [(imp.module, imp.name) for imp in module.imports] == []
    exports = {exp.name: exp.type for exp in module.exports}
    assert isinstance(exports["memory"], wasmtime.MemoryType)
    for name in ("train_epoch", "logits"):
        assert isinstance(exports[name], wasmtime.FuncType)
        assert [str(t) for t in exports[name].params] == ["i32"]
        assert [str(t) for t in exports[name].results] == ["i32"]
    assert KERNEL_PATH.stat().st_size < 64 * 1024


def test_shipped_kernel_is_a_fresh_build_of_its_source(tmp_path: Path) -> None:
    if importlib.util.find_spec("ziglang") is None:
        pytest.fail(f"ziglang is not installed, so kernel.wasm cannot be rebuilt and checked: "
                    f"pip install ziglang=={build.ZIGLANG_VERSION} (it is in the test dependencies)")
    fresh = tmp_path / "kernel.wasm"
    build.build(fresh)
    assert fresh.read_bytes() == KERNEL_PATH.read_bytes(), (
        f"kernel.wasm is not the build of kernel.c with ziglang {build.toolchain_version()} "
        f"(shipped with {build.ZIGLANG_VERSION}): run python -m fedmq.edge_agent.wasm.build")


def test_the_compiled_module_is_shared_by_backends() -> None:
    assert WasmBackend()._module is WasmBackend()._module


# ---- agreement with numpy -----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [MLPArchitecture(64, (32,), 10), MLPArchitecture(64, (64, 32), 10),
                                  MLPArchitecture(5, (), 3), MLPArchitecture(7, (13, 5), 3)], ids=str)
@pytest.mark.parametrize("epochs", [1, 3])
def test_training_matches_numpy(arch: MLPArchitecture, epochs: int) -> None:
    """Same initial weights, batches and lr; 203 examples leave a short last batch of 11."""
    x, y = dataset(arch, 203)
    params = arch.init_params(7)
    original = {k: v.copy() for k, v in params.items()}
    want = training.train(params, arch, x, y, epochs=epochs, batch_size=16, lr=0.1, seed=11)
    got = WasmBackend().train(params, arch, x, y, epochs=epochs, batch_size=16, lr=0.1, seed=11)
    assert_same_training(got, want)
    for name, value in original.items():
        np.testing.assert_array_equal(params[name], value)


@pytest.mark.parametrize("batch_size", [1, 3, 64, 500])
def test_training_matches_numpy_for_any_batch_size(batch_size: int) -> None:
    arch = MLPArchitecture(64, (9,), 10)
    x, y = dataset(arch, 130)
    params = arch.init_params(2)
    want = training.train(params, arch, x, y, epochs=2, batch_size=batch_size, lr=0.05, seed=1)
    assert_same_training(WasmBackend().train(params, arch, x, y, epochs=2, batch_size=batch_size, lr=0.05, seed=1), want)


def test_predictions_match_numpy_on_digits() -> None:
    arch = MLPArchitecture(64, (64, 32), 10)
    trained = training.train(arch.init_params(0), arch, DIGITS_X[:1437], DIGITS_Y[:1437], epochs=3, batch_size=16,
                             lr=0.1, seed=0).params
    want = training.logits(trained, arch, DIGITS_X)
    got = WasmBackend().logits(trained, arch, DIGITS_X)
    assert got.shape == (1797, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got.argmax(axis=1), training.predict(trained, arch, DIGITS_X))
    assert (got.argmax(axis=1) == DIGITS_Y).mean() > 0.9


def test_empty_inputs_follow_numpy() -> None:
    arch = MLPArchitecture(5, (4,), 3)
    params = arch.init_params(0)
    empty = np.zeros((0, 5), dtype=np.float32)
    assert WasmBackend().logits(params, arch, empty).shape == (0, 3)
    result = WasmBackend().train(params, arch, empty, np.zeros(0, dtype=np.int64), epochs=2, batch_size=4, lr=0.1, seed=0)
    assert (result.loss, result.accuracy, result.num_examples) == (0.0, 0.0, 0)
    x, y = dataset(arch, 10)
    result = WasmBackend().train(params, arch, x, y, epochs=0, batch_size=4, lr=0.1, seed=0)
    for name, value in params.items():
        np.testing.assert_array_equal(result.params[name], value)


def test_bad_inputs_are_refused_with_a_reason() -> None:
    arch = MLPArchitecture(5, (4,), 3)
    x, y = dataset(arch, 10)
    backend = WasmBackend()
    with pytest.raises(BackendError, match="labels"):
        backend.train(arch.init_params(0), arch, x, np.full(10, 3), epochs=1, batch_size=4, lr=0.1, seed=0)
    with pytest.raises(BackendError, match="shape"):
        backend.train(arch.init_params(0), arch, x[:, :4], y, epochs=1, batch_size=4, lr=0.1, seed=0)
    with pytest.raises(BackendError, match="dense0.weight"):
        backend.logits(MLPArchitecture(5, (6,), 3).init_params(0), arch, x)


# ---- the sandbox ---------------------------------------------------------------------------------

def test_an_endless_loop_runs_out_of_fuel(tmp_path: Path) -> None:
    looping = write_wat(tmp_path / "loop.wasm", f"(module {kernel_exports(train_body='(loop $forever (br $forever)) (i32.const 0)')})")
    backend = WasmBackend(module_path=looping)
    x, y = dataset(SMALL, 23)
    start = time.monotonic()
    with pytest.raises(WasmSandboxError, match="ran out of fuel") as caught:
        backend.train(SMALL.init_params(0), SMALL, x, y, epochs=1, batch_size=4, lr=0.1, seed=0)
    assert time.monotonic() - start < 2.0
    assert caught.value.reason is SandboxReason.OUT_OF_FUEL
    assert_trains_correctly(WasmBackend())


@pytest.mark.parametrize("arch, n, batch_size", [
    (MLPArchitecture(2, (4096,), 2), 12, 1),          # the tightest budget measured
    (MLPArchitecture(784, (256, 128), 10), 9, 1),
    (MLPArchitecture(7, (7, 7), 3), 60, 3),
    (MLPArchitecture(64, (64, 32), 10), 100, 16),
], ids=str)
def test_the_fuel_budget_leaves_the_kernel_a_wide_margin(arch: MLPArchitecture, n: int, batch_size: int, monkeypatch) -> None:
    """The kernel still finishes with a third of its budget: honest work never runs out of fuel."""
    budget = wasm_backend._fuel_budget
    monkeypatch.setattr(wasm_backend, "_fuel_budget", lambda *args, **kwargs: budget(*args, **kwargs) // 3)
    x, y = dataset(arch, n)
    params = arch.init_params(0)
    want = training.train(params, arch, x, y, epochs=1, batch_size=batch_size, lr=0.01, seed=0)
    assert_same_training(WasmBackend().train(params, arch, x, y, epochs=1, batch_size=batch_size, lr=0.01, seed=0), want)
    np.testing.assert_allclose(WasmBackend().logits(params, arch, x), training.logits(params, arch, x), rtol=1e-5, atol=1e-5)


def test_the_kernel_itself_is_stopped_by_a_small_fuel_budget_and_recovers() -> None:
    backend = WasmBackend(fuel_per_call=200_000)
    arch = MLPArchitecture(64, (64, 32), 10)
    with pytest.raises(WasmSandboxError, match=r"out of fuel in train_epoch \(budget 200000\)"):
        backend.train(arch.init_params(0), arch, DIGITS_X[:500], DIGITS_Y[:500], epochs=1, batch_size=16, lr=0.1, seed=0)
    assert_trains_correctly(backend)


def test_growing_memory_past_the_cap_fails_cleanly(tmp_path: Path) -> None:
    cap = 4 << 20
    # grow by 8 MiB; if growth fails (-1), touch the page it would have added: out of bounds
    grower = write_wat(tmp_path / "grow.wasm", "(module " + kernel_exports(train_body=f"""
        (if (i32.eq (memory.grow (i32.const 128)) (i32.const -1))
          (then (i32.store (i32.const {cap + 4096}) (i32.const 1))))
        (i32.const 0)""") + ")")
    backend = WasmBackend(module_path=grower, memory_cap_bytes=cap)
    x, y = dataset(SMALL, 23)
    with pytest.raises(WasmSandboxError, match="memory_out_of_bounds") as caught:
        backend.train(SMALL.init_params(0), SMALL, x, y, epochs=1, batch_size=4, lr=0.1, seed=0)
    assert caught.value.reason is SandboxReason.TRAP
    assert_trains_correctly(WasmBackend(memory_cap_bytes=cap))


def test_a_module_declaring_more_memory_than_the_cap_is_not_instantiated(tmp_path: Path) -> None:
    big = write_wat(tmp_path / "big.wasm", f"(module {kernel_exports(memory_pages=1024)})")
    backend = WasmBackend(module_path=big, memory_cap_bytes=16 << 20)
    with pytest.raises(WasmSandboxError, match="failed to instantiate") as caught:
        backend.logits(SMALL.init_params(0), SMALL, np.zeros((2, 5), dtype=np.float32))
    assert caught.value.reason is SandboxReason.MEMORY


def test_data_larger_than_the_cap_is_refused_and_the_backend_still_works() -> None:
    backend = WasmBackend(memory_cap_bytes=512 << 10)
    arch = MLPArchitecture(64, (64, 32), 10)
    with pytest.raises(WasmSandboxError, match="over the cap of 524288 bytes") as caught:
        backend.train(arch.init_params(0), arch, DIGITS_X, DIGITS_Y, epochs=1, batch_size=16, lr=0.1, seed=0)
    assert caught.value.reason is SandboxReason.MEMORY
    assert_trains_correctly(backend)


@pytest.mark.parametrize("imported", [
    '(import "env" "send_home" (func (param i32)))',
    '(import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))',
    '(import "env" "shared" (global i32))',
])
def test_a_module_with_imports_is_refused_before_instantiation(tmp_path: Path, imported: str, monkeypatch) -> None:
    module = write_wat(tmp_path / "imports.wasm", f"(module {imported} {kernel_exports()})")
    instantiated = []
    monkeypatch.setattr(wasmtime, "Instance", lambda *args: instantiated.append(args))
    with pytest.raises(WasmSandboxError, match="imports") as caught:
        WasmBackend(module_path=module)
    assert caught.value.reason is SandboxReason.IMPORTS
    name = imported.split('"')[1] + "." + imported.split('"')[3]
    assert name in str(caught.value)
    assert instantiated == []


def test_an_imported_memory_is_refused(tmp_path: Path) -> None:
    module = write_wat(tmp_path / "memory.wasm", """(module
        (import "env" "memory" (memory 2))
        (export "memory" (memory 0))
        (func (export "train_epoch") (param i32) (result i32) (i32.const 0))
        (func (export "logits") (param i32) (result i32) (i32.const 0)))""")
    with pytest.raises(WasmSandboxError, match=r"env\.memory \(memory\)"):
        WasmBackend(module_path=module)


@pytest.mark.parametrize("body, message", [
    ('(memory (export "memory") 1) (func (export "train_epoch") (param i32) (result i32) (i32.const 0))', "logits"),
    ('(func (export "train_epoch") (param i32) (result i32) (i32.const 0)) '
     '(func (export "logits") (param i32) (result i32) (i32.const 0))', "memory"),
    ('(memory (export "memory") 1) (func (export "train_epoch") (param i32 f32) (result i32) (i32.const 0)) '
     '(func (export "logits") (param i32) (result i32) (i32.const 0))', r"train_epoch\(i32\) -> i32; found \(i32, f32\)"),
])
def test_missing_or_mistyped_exports_are_refused(tmp_path: Path, body: str, message: str) -> None:
    module = write_wat(tmp_path / "exports.wasm", f"(module {body})")
    with pytest.raises(WasmSandboxError, match=message) as caught:
        WasmBackend(module_path=module)
    assert caught.value.reason is SandboxReason.EXPORTS


def test_traps_and_error_statuses_become_sandbox_errors(tmp_path: Path) -> None:
    module = write_wat(tmp_path / "traps.wasm", f"(module {kernel_exports(train_body='(i32.const 2)', logits_body='unreachable')})")
    backend = WasmBackend(module_path=module)
    x, y = dataset(SMALL, 23)
    with pytest.raises(WasmSandboxError, match="status 2: the scratch buffer is too small") as caught:
        backend.train(SMALL.init_params(0), SMALL, x, y, epochs=1, batch_size=4, lr=0.1, seed=0)
    assert caught.value.reason is SandboxReason.STATUS
    with pytest.raises(WasmSandboxError, match="trapped in logits: unreachable") as caught:
        backend.logits(SMALL.init_params(0), SMALL, x)
    assert caught.value.reason is SandboxReason.TRAP


def test_a_start_function_runs_under_the_fuel_limit(tmp_path: Path) -> None:
    module = write_wat(tmp_path / "start.wasm", f"""(module {kernel_exports()}
        (func $spin (loop $forever (br $forever)))
        (start $spin))""")
    backend = WasmBackend(module_path=module)
    with pytest.raises(WasmSandboxError, match="out of fuel in instantiation"):
        backend.logits(SMALL.init_params(0), SMALL, np.zeros((2, 5), dtype=np.float32))


def test_unreadable_or_invalid_modules_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WasmSandboxError, match="cannot read") as caught:
        WasmBackend(module_path=tmp_path / "missing.wasm")
    assert caught.value.reason is SandboxReason.INVALID
    garbage = tmp_path / "garbage.wasm"
    garbage.write_bytes(b"\0asm\x01\0\0\0\xff\xff")
    with pytest.raises(WasmSandboxError, match="not a valid wasm module") as caught:
        WasmBackend(module_path=garbage)
    assert caught.value.reason is SandboxReason.INVALID
