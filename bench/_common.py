"""What the fedmq benchmarks share: model presets, update payloads, the machine description,
memory and CPU readings, a Mosquitto on loopback, and progress and JSON output.

Not part of the fedmq package: the bench scripts import it as ``_common`` (they run from bench/).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from typing import Any

import numpy as np

from fedmq.broker.architecture import MLPArchitecture
from fedmq.broker.local import MosquittoProcess
from fedmq.broker.messages import UpdateMessage

#: Model presets by name: about 1M and 100k float32 parameters.
MODELS: dict[str, MLPArchitecture] = {
    "1m": MLPArchitecture(1000, (1000,), 10),     # 1,011,010 parameters, 4.0 MB as fp32
    "100k": MLPArchitecture(784, (128,), 10),     # 101,770 parameters, 0.4 MB as fp32
    "10k": MLPArchitecture(64, (128,), 10),       # 9,610 parameters: for smoke runs
}

#: Mosquitto settings for benchmarks: a subscriber that falls behind must not lose QoS 1 messages
#: (the default queue limit of 1000 messages per client would drop the excess); everything else
#: is Mosquitto's default.
BENCH_MOSQUITTO_CONF = "max_queued_messages 0\n"


def model(name: str) -> MLPArchitecture:
    try:
        return MODELS[name]
    except KeyError:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None


def delta_tensors(arch: MLPArchitecture, seed: int, scale: float = 1e-3) -> dict[str, np.ndarray]:
    """A random float32 delta of ``arch``'s shapes (small values: far inside every norm bound)."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
            for name, shape in arch.param_shapes().items()}


def update_payload(device: str, update_id: str, tensors: dict[str, np.ndarray], *, base_version: int = 1,
                   num_examples: int = 100) -> bytes:
    """The wire bytes of an fp32 update, exactly as an agent publishes them."""
    return UpdateMessage(device=device, update_id=update_id, base_version=base_version, num_examples=num_examples,
                         codec="fp32", tensors=tensors, metrics={"loss": 0.5, "accuracy": 0.9},
                         created=time.time()).encode()


def device_name(index: int) -> str:
    return f"dev{index:05d}"


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((out.stdout or out.stderr).strip().splitlines() or ["?"])[0]


def machine() -> dict[str, Any]:
    """Where the figures come from: CPU, cores, memory, kernel and the versions that matter."""
    import aiomqtt
    import msgpack
    import paho.mqtt

    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "kernel": platform.release(),
        "python": platform.python_version(), "numpy": np.__version__, "msgpack": ".".join(map(str, msgpack.version)),
        "aiomqtt": getattr(aiomqtt, "__version__", "?"), "paho_mqtt": paho.mqtt.__version__,
        "mosquitto": _first_line([mosquitto, "-h"]).removeprefix("mosquitto version "),
    }


def describe_machine(info: dict[str, Any]) -> str:
    return (f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, Linux {info['kernel']}, "
            f"Python {info['python']}, numpy {info['numpy']}, Mosquitto {info['mosquitto']}, "
            f"aiomqtt {info['aiomqtt']} / paho {info['paho_mqtt']}")


def _status_kb(pid: int | str, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set (VmHWM) of a process, in MB (not ru_maxrss: fork carries the parent's peak)."""
    return _status_kb(pid, "VmHWM") / 1024


def rss_mb(pid: int | str = "self") -> float:
    return _status_kb(pid, "VmRSS") / 1024


def reset_peak_rss() -> None:
    """Make VmHWM start again from the current RSS (Linux >= 4.0), so a phase's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU seconds a process has used so far."""
    user, system, _ = cpu_split(pid)
    return user + system


def cpu_split(pid: int | str = "self") -> tuple[float, float, int]:
    """(user CPU seconds, system CPU seconds, minor page faults) of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks, int(fields[7])


def cpu_split_since(start: tuple[float, float, int], pid: int | str = "self") -> list[float]:
    """What :func:`cpu_split` has grown by since ``start`` (an earlier :func:`cpu_split`)."""
    return [now - then for then, now in zip(start, cpu_split(pid), strict=True)]


def raise_nofile(wanted: int) -> int:
    """Raise this process's open-file limit towards ``wanted`` (children inherit it); return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def start_mosquitto(extra_conf: str = BENCH_MOSQUITTO_CONF) -> MosquittoProcess:
    """A Mosquitto on a free 127.0.0.1 port with the benchmark settings; stop it when done."""
    broker = MosquittoProcess(extra_conf=extra_conf)
    broker.start()
    return broker


def progress(message: str) -> None:
    """Progress goes to stderr, so stdout holds the figures only."""
    print(message, file=sys.stderr, flush=True)


def write_json(path: str | None, data: Any) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")


def quiet_aiomqtt() -> None:
    """aiomqtt warns about every publish past 10 pending; a benchmark has many on purpose."""
    import logging

    logging.getLogger("mqtt").setLevel(logging.ERROR)
