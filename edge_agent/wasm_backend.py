"""The WebAssembly backend: the C kernel of ``wasm/kernel.c`` run by wasmtime in a sandbox.

The kernel is untrusted code as far as this module is concerned (the agent can be pointed at
another module): it must have no imports at all, so it can only compute on its own linear memory;
every call gets a fuel budget proportional to its work, so an endless loop stops; its memory is
capped by the store limits. Anything that goes wrong inside Wasm becomes a
:class:`WasmSandboxError` with a :class:`SandboxReason`.

Memory layout and export signatures are described at the top of ``wasm/kernel.c``. This is the
only module that imports wasmtime.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import wasmtime

from fedmq.broker.architecture import MLPArchitecture

from . import training
from .backends import BackendError
from .training import TrainResult

log = logging.getLogger(__name__)

KERNEL_PATH = Path(__file__).parent / "wasm" / "kernel.wasm"
DEFAULT_MEMORY_CAP = 256 << 20
WASM_PAGE = 65536
MAX_MEMORY = 1 << 32      # a wasm32 memory addresses at most 4 GiB

# Fuel budgets, in wasm instructions. Measured on the shipped kernel (fuel counts instructions, so
# it does not depend on the machine): about 2 per multiply-add on wide layers, up to about 3 per
# weight per batch for packing (batch size 1), ~100-600 per activation value and ~700-8000 per
# batch and layer on tiny layers. Over 17 shapes from 1-wide to 4096-wide, batch 1 to 1000, the
# budget was at least 5x what the kernel used (tests/test_wasm_backend.py keeps 3x). An endless loop burns ~1.2e9 fuel/s, so it stops
# after budget / 1.2e9 seconds: ~0.4 s for an epoch of the digits MLP (1437 examples), ~2 s per
# 300 examples of 784-256-128-10.
FUEL_PER_MAC = 8          # per multiply-add of the call (3 products per layer when training, 1 for logits)
FUEL_PER_PACKED = 16      # per weight, product and batch: the kernel copies each weight panel per batch
FUEL_PER_VALUE = 1024     # per activation value (row x width, all layers)
FUEL_PER_STEP = 16384     # per batch and layer: calls, loop set-up, softmax
FUEL_BASE = 1_000_000
FUEL_INSTANTIATE = 1_000_000    # a start function, if any, runs during instantiation

# Constants of kernel.c that size its scratch buffer: rows per inference tile, columns per packed panel.
LOGITS_TILE = 64
PANEL_COLUMNS = 8
# Inference runs on chunks of at most this many bytes of input and output per call.
LOGITS_CHUNK_BYTES = 8 << 20

#: export name -> (params, results): each function takes the offset of its argument block
#: (struct train_args / struct logits_args in kernel.c) and returns a status, 0 for success.
KERNEL_EXPORTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "train_epoch": (("i32",), ("i32",)),
    "logits": (("i32",), ("i32",)),
}
_STATUS = {1: "a width, count or batch size is out of range", 2: "the scratch buffer is too small"}


class SandboxReason(StrEnum):
    """Why the sandbox refused a module or stopped a call."""

    INVALID = "invalid"          # not a valid Wasm module, or unreadable
    IMPORTS = "imports"          # the module imports something
    EXPORTS = "exports"          # an export is missing or has the wrong type
    OUT_OF_FUEL = "out_of_fuel"  # the call used up its fuel budget
    TRAP = "trap"                # any other trap: out-of-bounds access, unreachable, stack overflow...
    MEMORY = "memory"            # the call needs more linear memory than the cap, or growth failed
    STATUS = "status"            # the kernel returned an error status


class WasmSandboxError(BackendError):
    """The Wasm module was refused or stopped by the sandbox; ``reason`` says why."""

    def __init__(self, message: str, *, reason: SandboxReason) -> None:
        self.reason = reason
        super().__init__(message)


@functools.cache
def _engine() -> wasmtime.Engine:
    config = wasmtime.Config()
    config.consume_fuel = True
    return wasmtime.Engine(config)


@functools.lru_cache(maxsize=8)
def _compile(wasm: bytes) -> wasmtime.Module:
    """Compile once per process per distinct module content (the shipped kernel: ~10 ms)."""
    return wasmtime.Module(_engine(), wasm)


def _check_module(module: wasmtime.Module, source: str) -> None:
    """Refuse a module with any import, or without the kernel's exports and signatures."""
    imports = [f"{imp.module}.{imp.name} ({_kind(imp.type)})" for imp in module.imports]
    if imports:
        raise WasmSandboxError(f"wasm module {source} imports {', '.join(imports)}; a kernel must have no imports",
                               reason=SandboxReason.IMPORTS)
    exports = {exp.name: exp.type for exp in module.exports}
    memory = exports.get("memory")
    if not isinstance(memory, wasmtime.MemoryType) or memory.is_64 or memory.is_shared:
        raise WasmSandboxError(f"wasm module {source} must export a 32-bit unshared memory named 'memory'",
                               reason=SandboxReason.EXPORTS)
    for name, (params, results) in KERNEL_EXPORTS.items():
        func = exports.get(name)
        actual = (tuple(str(t) for t in func.params), tuple(str(t) for t in func.results)) \
            if isinstance(func, wasmtime.FuncType) else None
        if actual != (params, results):
            raise WasmSandboxError(
                f"wasm module {source} must export function {name}({', '.join(params)}) -> {', '.join(results)}; "
                f"found {_describe(func, actual)}", reason=SandboxReason.EXPORTS)


def _kind(ty: object) -> str:
    return {wasmtime.FuncType: "function", wasmtime.MemoryType: "memory", wasmtime.GlobalType: "global",
            wasmtime.TableType: "table"}.get(type(ty), type(ty).__name__)


def _describe(ty: object, signature: tuple[tuple[str, ...], tuple[str, ...]] | None) -> str:
    if ty is None:
        return "nothing"
    if signature is None:
        return f"a {_kind(ty)}"
    return f"({', '.join(signature[0])}) -> {', '.join(signature[1])}"


class _Layout:
    """Byte offsets of the buffers the host places in linear memory, 16-byte aligned."""

    def __init__(self, base: int) -> None:
        self.end = base

    def take(self, nbytes: int) -> int:
        offset = (self.end + 15) & ~15
        self.end = offset + nbytes
        return offset


class _Sandbox:
    """One instance of the kernel in its own Store: fuel, memory cap and trap translation."""

    def __init__(self, module: wasmtime.Module, *, memory_cap: int, fuel_override: int | None) -> None:
        self.memory_cap = memory_cap
        self.fuel_override = fuel_override
        self.store = wasmtime.Store(_engine())
        self.store.set_limits(memory_size=memory_cap)
        self.store.set_fuel(fuel_override or FUEL_INSTANTIATE)
        try:
            instance = wasmtime.Instance(self.store, module, [])
        except wasmtime.Trap as exc:
            raise self._trap_error("instantiation", exc) from None
        except wasmtime.WasmtimeError as exc:
            # typically a declared minimum memory above the cap
            reason = SandboxReason.MEMORY if "memory" in str(exc) else SandboxReason.INVALID
            raise WasmSandboxError(f"wasm module failed to instantiate: {exc}", reason=reason) from None
        exports = instance.exports(self.store)
        self.memory: wasmtime.Memory = exports["memory"]
        self.funcs: dict[str, wasmtime.Func] = {name: exports[name] for name in KERNEL_EXPORTS}
        # The module's stack and static data live in its initial memory; the host's buffers go above.
        self.base = self.memory.data_len(self.store)

    def reserve(self, end: int, what: str) -> None:
        """Grow the memory to at least ``end`` bytes, within the cap."""
        if end > self.memory_cap:
            raise WasmSandboxError(f"{what} needs {end} bytes of wasm memory, over the cap of {self.memory_cap} bytes",
                                   reason=SandboxReason.MEMORY)
        have = self.memory.data_len(self.store)
        if end > have:
            try:
                self.memory.grow(self.store, -(-(end - have) // WASM_PAGE))
            except wasmtime.WasmtimeError as exc:
                raise WasmSandboxError(f"wasm memory could not grow to {end} bytes for {what}: {exc}",
                                       reason=SandboxReason.MEMORY) from None

    def view(self) -> np.ndarray:
        """The whole linear memory as bytes; take it again after every call (memory may have moved)."""
        return np.frombuffer(self.memory.get_buffer_ptr(self.store), dtype=np.uint8)

    def call(self, name: str, args_offset: int, fuel: int) -> None:
        """Call export ``name`` with the argument block at ``args_offset`` and a fuel budget."""
        budget = self.fuel_override or fuel
        self.store.set_fuel(budget)
        try:
            status = self.funcs[name](self.store, args_offset)
        except wasmtime.Trap as exc:
            raise self._trap_error(name, exc, budget) from None
        except wasmtime.WasmtimeError as exc:
            raise WasmSandboxError(f"wasm kernel failed in {name}: {exc}", reason=SandboxReason.TRAP) from None
        if status != 0:
            raise WasmSandboxError(f"wasm kernel {name} returned status {status}: {_STATUS.get(status, 'unknown')}",
                                   reason=SandboxReason.STATUS)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s used %d of %d fuel", name, budget - self.store.get_fuel(), budget)

    def _trap_error(self, where: str, exc: wasmtime.Trap, budget: int | None = None) -> WasmSandboxError:
        code = exc.trap_code
        if code is wasmtime.TrapCode.OUT_OF_FUEL:
            spent = budget if budget is not None else (self.fuel_override or FUEL_INSTANTIATE)
            return WasmSandboxError(f"wasm kernel ran out of fuel in {where} (budget {spent})",
                                    reason=SandboxReason.OUT_OF_FUEL)
        kind = code.name.lower() if code is not None else "trap"
        return WasmSandboxError(f"wasm kernel trapped in {where}: {kind}: {exc.message}", reason=SandboxReason.TRAP)


@dataclass(frozen=True, slots=True)
class _Model:
    """An architecture's widths, parameter shapes and packed float32 parameters."""

    widths: np.ndarray            # int32, inputs, hidden..., classes
    shapes: dict[str, tuple[int, ...]]
    flat: np.ndarray              # float32, per layer W then b (kernel.c's layout)

    @classmethod
    def pack(cls, params: Mapping[str, np.ndarray], arch: MLPArchitecture) -> _Model:
        shapes = arch.param_shapes()
        if set(params) != set(shapes):
            raise BackendError(f"parameters {sorted(params)} do not match the architecture's {sorted(shapes)}")
        parts = []
        for name, shape in shapes.items():
            value = np.asarray(params[name], dtype=np.float32)
            if value.shape != shape:
                raise BackendError(f"parameter {name} has shape {value.shape}; the architecture needs {shape}")
            parts.append(value.ravel())
        return cls(np.asarray(arch.widths, dtype=np.int32), shapes, np.concatenate(parts))

    def unpack(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        at = 0
        for name, shape in self.shapes.items():
            size = int(np.prod(shape))
            out[name] = flat[at:at + size].reshape(shape).copy()
            at += size
        return out

    @property
    def num_layers(self) -> int:
        return len(self.widths) - 1

    def macs_per_example(self) -> int:
        return int(sum(int(self.widths[i]) * int(self.widths[i + 1]) for i in range(self.num_layers)))

    def train_scratch_floats(self, batch_size: int) -> int:
        """The kernel's train_scratch_floats (kernel.c): activations, two gradients, the pack buffer."""
        widths = [int(w) for w in self.widths]
        return batch_size * sum(widths) + 2 * batch_size * max(widths) + max(widths) * max(PANEL_COLUMNS, batch_size)

    def logits_scratch_floats(self) -> int:
        """The kernel's logits_scratch_floats (kernel.c): two activation tiles and a packed panel."""
        widest = int(self.widths.max())
        return 2 * LOGITS_TILE * widest + PANEL_COLUMNS * widest


def _place(mem: np.ndarray, offset: int, values: np.ndarray) -> None:
    raw = np.ascontiguousarray(values).view(np.uint8).ravel()
    mem[offset:offset + raw.size] = raw


def _read(mem: np.ndarray, offset: int, dtype: type, count: int) -> np.ndarray:
    size = np.dtype(dtype).itemsize * count
    return mem[offset:offset + size].view(dtype).copy()


class WasmBackend:
    """Training and inference in the WebAssembly kernel (``wasm/kernel.wasm`` by default).

    ``fuel_per_call`` replaces the work-proportional fuel budget of every call (and of the
    instantiation); ``memory_cap_bytes`` caps the module's linear memory. The module is checked
    (no imports, the kernel's exports) and compiled when the backend is built, once per process.
    """

    name = "wasm"

    def __init__(self, module_path: Path | None = None, *, fuel_per_call: int | None = None,
                 memory_cap_bytes: int = DEFAULT_MEMORY_CAP) -> None:
        if fuel_per_call is not None and fuel_per_call <= 0:
            raise ValueError(f"fuel_per_call must be positive, got {fuel_per_call}")
        if not WASM_PAGE <= memory_cap_bytes <= MAX_MEMORY:
            raise ValueError(f"memory_cap_bytes must be from {WASM_PAGE} (one page) to {MAX_MEMORY} (wasm32), "
                             f"got {memory_cap_bytes}")
        self.module_path = Path(module_path) if module_path is not None else KERNEL_PATH
        self.fuel_per_call = fuel_per_call
        self.memory_cap_bytes = memory_cap_bytes
        try:
            wasm = self.module_path.read_bytes()
        except OSError as exc:
            raise WasmSandboxError(f"cannot read wasm module {self.module_path}: {exc.strerror}",
                                   reason=SandboxReason.INVALID) from None
        try:
            self._module = _compile(wasm)
        except wasmtime.WasmtimeError as exc:
            raise WasmSandboxError(f"{self.module_path} is not a valid wasm module: {exc}",
                                   reason=SandboxReason.INVALID) from None
        _check_module(self._module, str(self.module_path))
        log.debug("wasm kernel %s (sha256 %s) ready", self.module_path, hashlib.sha256(wasm).hexdigest()[:12])

    def _sandbox(self) -> _Sandbox:
        return _Sandbox(self._module, memory_cap=self.memory_cap_bytes, fuel_override=self.fuel_per_call)

    def train(self, params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray, y: np.ndarray, *,
              epochs: int, batch_size: int, lr: float, seed: int) -> TrainResult:
        """Same contract and same batches as :func:`training.train`; one Wasm call per epoch."""
        model = _Model.pack(params, arch)
        x = np.ascontiguousarray(x, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        n = len(x)
        if x.ndim != 2 or x.shape[1] != arch.inputs:
            raise BackendError(f"x has shape {x.shape}; the architecture needs (n, {arch.inputs})")
        if y.shape != (n,):
            raise BackendError(f"y has shape {y.shape}; x has {n} rows")
        if n and (y.min() < 0 or y.max() >= arch.classes):
            raise BackendError(f"labels must be in [0, {arch.classes}); got {y.min()}..{y.max()}")
        if batch_size < 1:
            raise BackendError(f"batch_size must be at least 1, got {batch_size}")
        orders = _epoch_orders(n, batch_size, epochs, seed)
        if not orders:
            return TrainResult(model.unpack(model.flat), 0.0, 0.0, n)

        sandbox = self._sandbox()
        layout = _Layout(sandbox.base)
        at_args = layout.take(4 * 12)
        at_out = layout.take(16)
        at_widths = layout.take(model.widths.nbytes)
        at_params = layout.take(model.flat.nbytes)
        at_x = layout.take(x.nbytes)
        at_y = layout.take(4 * n)
        at_order = layout.take(4 * n)
        rows = min(batch_size, n)                      # a batch larger than the data is all of it
        scratch_floats = model.train_scratch_floats(rows)
        at_scratch = layout.take(4 * scratch_floats)
        sandbox.reserve(layout.end, f"training on {n} examples with widths {arch.widths}")
        args = np.array([at_widths, model.num_layers, at_params, at_x, at_y, at_order, n, rows, 0, at_scratch,
                         scratch_floats, at_out], dtype=np.uint32)
        args[8] = np.float32(lr).view(np.uint32)      # struct train_args.lr is a float32
        mem = sandbox.view()
        _place(mem, at_args, args)
        _place(mem, at_widths, model.widths)
        _place(mem, at_params, model.flat)
        _place(mem, at_x, x)
        _place(mem, at_y, y.astype(np.int32))

        fuel = _fuel_budget(model, n, batch_size, products=3)
        loss_sum, correct = 0.0, 0
        for order in orders:
            _place(sandbox.view(), at_order, order)
            sandbox.call("train_epoch", at_args, fuel)
            mem = sandbox.view()
            loss_sum = float(_read(mem, at_out, np.float64, 1)[0])
            correct = int(_read(mem, at_out + 8, np.int32, 1)[0])
        trained = model.unpack(_read(sandbox.view(), at_params, np.float32, model.flat.size))
        return TrainResult(trained, loss_sum / n, correct / n, n)

    def logits(self, params: Mapping[str, np.ndarray], arch: MLPArchitecture, x: np.ndarray) -> np.ndarray:
        """Logits of every row of ``x``, one Wasm call per chunk of rows."""
        model = _Model.pack(params, arch)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != arch.inputs:
            raise BackendError(f"x has shape {x.shape}; the architecture needs (n, {arch.inputs})")
        n = len(x)
        result = np.empty((n, arch.classes), dtype=np.float32)
        if n == 0:
            return result
        chunk = max(LOGITS_TILE, LOGITS_CHUNK_BYTES // (4 * (arch.inputs + arch.classes)))
        chunk = min(chunk, n)

        sandbox = self._sandbox()
        layout = _Layout(sandbox.base)
        at_args = layout.take(4 * 8)
        at_widths = layout.take(model.widths.nbytes)
        at_params = layout.take(model.flat.nbytes)
        at_x = layout.take(4 * chunk * arch.inputs)
        at_out = layout.take(4 * chunk * arch.classes)
        scratch_floats = model.logits_scratch_floats()
        at_scratch = layout.take(4 * scratch_floats)
        sandbox.reserve(layout.end, f"inference with widths {arch.widths}")
        mem = sandbox.view()
        _place(mem, at_widths, model.widths)
        _place(mem, at_params, model.flat)

        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            mem = sandbox.view()
            _place(mem, at_args, np.array([at_widths, model.num_layers, at_params, at_x, rows, at_scratch, scratch_floats,
                                           at_out], dtype=np.uint32))
            _place(mem, at_x, x[start:start + rows])
            sandbox.call("logits", at_args, _fuel_budget(model, rows, LOGITS_TILE, products=1))
            result[start:start + rows] = _read(sandbox.view(), at_out, np.float32, rows * arch.classes).reshape(rows, -1)
        return result


def _fuel_budget(model: _Model, rows: int, batch: int, products: int) -> int:
    """Fuel for one call over ``rows`` examples in batches of ``batch`` rows (see FUEL_PER_*)."""
    batches = -(-rows // batch)
    weights = model.macs_per_example()
    return (FUEL_PER_MAC * products * rows * weights + FUEL_PER_PACKED * products * batches * weights
            + FUEL_PER_VALUE * rows * int(model.widths.sum()) + FUEL_PER_STEP * batches * model.num_layers + FUEL_BASE)


def _epoch_orders(n: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Each epoch's example order, from :func:`training.epoch_batches` so the batches are the same."""
    orders: list[list[np.ndarray]] = []
    for epoch, idx in training.epoch_batches(n, batch_size, epochs, seed):
        if epoch == len(orders):
            orders.append([])
        orders[epoch].append(idx)
    for batches in orders:
        # the kernel cuts each order into consecutive batches of batch_size, the last one short
        if any(len(b) != batch_size for b in batches[:-1]):
            raise BackendError("training.epoch_batches no longer cuts fixed-size batches; the wasm kernel needs updating")
    return [np.concatenate(batches).astype(np.int32) for batches in orders]
