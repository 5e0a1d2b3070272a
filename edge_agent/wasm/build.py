"""Rebuild ``kernel.wasm`` from ``kernel.c`` with the Zig toolchain from PyPI (package ``ziglang``).

    python -m fedmq.edge_agent.wasm.build            # rebuild the shipped kernel.wasm
    python -m fedmq.edge_agent.wasm.build --check    # exit 1 if kernel.wasm differs from a fresh build

The output is deterministic: the same kernel.c and the same ziglang version give the same bytes
(no paths, no timestamps, debug info stripped), so ``--check`` can compare byte for byte.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "kernel.c"
TARGET = HERE / "kernel.wasm"

#: the toolchain the shipped kernel.wasm was built with; another version may give other bytes
ZIGLANG_VERSION = "0.17.1"

FLAGS: tuple[str, ...] = (
    "--target=wasm32-freestanding",
    "-O3",
    "-msimd128",
    "-nostdlib",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-s",                                # no debug info or names: smaller, and no paths in the output
    "-Wl,--no-entry",                    # a library of exports, no _start
    "-Wl,-z,stack-size=65536",           # the kernel keeps only small arrays on the stack
    "-Wl,--initial-memory=131072",       # stack + data; the host grows memory for its buffers
)


class BuildError(Exception):
    """The toolchain is missing or the compiler failed."""


def build(output: Path, source: Path = SOURCE) -> None:
    """Compile ``source`` to ``output`` with ``FLAGS``."""
    if importlib.util.find_spec("ziglang") is None:
        raise BuildError(f"the ziglang package is not installed: pip install ziglang=={ZIGLANG_VERSION}")
    with tempfile.TemporaryDirectory(prefix="fedmq-zig-") as cache:
        # A private cache makes the build independent of whatever ~/.cache/zig holds.
        env = {**os.environ, "ZIG_GLOBAL_CACHE_DIR": f"{cache}/global", "ZIG_LOCAL_CACHE_DIR": f"{cache}/local"}
        command = [sys.executable, "-m", "ziglang", "cc", *FLAGS, "-o", str(output), str(source)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"zig cc failed ({done.returncode}):\n{done.stderr.strip()}")


def toolchain_version() -> str:
    from importlib.metadata import version

    return version("ziglang")


def check() -> bool:
    """True if the shipped kernel.wasm is byte-identical to a fresh build."""
    with tempfile.TemporaryDirectory(prefix="fedmq-wasm-") as tmp:
        fresh = Path(tmp) / "kernel.wasm"
        build(fresh)
        return fresh.read_bytes() == TARGET.read_bytes()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedmq.edge_agent.wasm.build", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the shipped kernel.wasm with a fresh build")
    args = parser.parse_args(argv)
    try:
        if args.check:
            if check():
                print(f"{TARGET.name} is up to date")
                return 0
            version = toolchain_version()
            hint = "" if version == ZIGLANG_VERSION else f" (ziglang {version} installed, {ZIGLANG_VERSION} expected)"
            print(f"{TARGET} differs from a fresh build of {SOURCE.name}{hint}: run python -m fedmq.edge_agent.wasm.build",
                  file=sys.stderr)
            return 1
        build(TARGET)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
