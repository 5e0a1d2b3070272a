"""The operator commands of the ``fedmq`` CLI: ``fleet``, ``model`` and ``rounds``.

They talk MQTT to the broker (:mod:`fedmq.ops`), so they work from any machine that reaches it.
Exit code 0 on success, 1 on failure (with one ``fedmq: error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmq.broker.errors import FedmqError, RejectedMessage
from fedmq.broker.files import write_atomic
from fedmq.broker.messages import ModelMessage, decode_message
from fedmq.broker.operators import OperatorSigner
from fedmq.broker.settings import BrokerSettings

from .ops import MAX_RESPONSE_BYTES, FleetStatus, OpsClient, OpsError, default_client_id

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
MAX_PUSH_FILE_BYTES = 1 << 30


# -- formatting ---------------------------------------------------------------------------------

def age(timestamp: float | None, now: float | None = None) -> str:
    """``"3m ago"`` for a unix time (``"-"`` when unknown)."""
    if not timestamp:
        return "-"
    seconds = (now if now is not None else time.time()) - timestamp
    if seconds < 0:
        return "just now" if seconds > -5 else "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers], *[[("-" if c is None else str(c)) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def render_fleet_status(status: FleetStatus, now: float | None = None) -> str:
    lines = []
    agg = status.aggregator
    presence = status.aggregator_status
    if agg is not None:
        counters = agg.get("counters", {})
        lines.append(f"fleet {status.fleet}: aggregator {agg.get('client_id', '')} online since {age(agg.get('since'), now)}, "
                     f"model v{agg.get('model_version')} ({agg.get('mode')}), accepted {int(counters.get('accepted', 0))}, "
                     f"rejected {int(counters.get('rejected', 0))}, rounds {int(counters.get('rounds', 0))}")
    elif presence is not None:
        lines.append(f"fleet {status.fleet}: aggregator {presence.state} (retained status), model v{presence.model_version}")
    else:
        lines.append(f"fleet {status.fleet}: no aggregator status on this broker")
    online = sum(d.state == "online" for d in status.devices)
    lines.append(f"{len(status.devices)} device(s), {online} online, {sum(d.paused for d in status.devices)} paused")
    rows = []
    for d in status.devices:
        state = d.state + (" (paused)" if d.paused else "") + (f" (frozen v{d.frozen})" if d.frozen else "")
        rows.append([d.device, state, age(d.since, now), f"v{d.model_version}" if d.model_version else "-",
                     age(d.last_update, now), d.accepted, d.rejected, d.backend or "-", d.platform or "-"])
    if rows:
        lines.append(table(["DEVICE", "STATE", "SINCE", "MODEL", "LAST UPDATE", "ACCEPTED", "REJECTED", "BACKEND",
                            "PLATFORM"], rows))
    return "\n".join(lines)


# -- options --------------------------------------------------------------------------------

def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument("--broker", metavar="URL", default=None,
                       help=f"mqtt://host:port or mqtts://host:port for TLS, optional ?protocol=5|3.1.1 "
                       f"(env FEDMQ_BROKER, default {DEFAULT_BROKER})")
    group.add_argument("--fleet", default=None, help="fleet name (env FEDMQ_FLEET, default 'default')")
    group.add_argument("--client-id", default=None,
                       help="MQTT client id (default ops-USER-RANDOM; with broker ACLs: your operator identity)")
    group.add_argument("--ca-file", help="CA certificate (PEM) that signed the broker's certificate")
    group.add_argument("--cert-file", help="client certificate (PEM) for brokers that require one; an operator "
                       "certificate (fedmq pki issue-client NAME --role operator) also signs every request and "
                       "command, which an aggregator and devices that know the fleet CA require")
    group.add_argument("--key-file", help="private key (PEM) of --cert-file")
    group.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the aggregator (default 10)")
    return common


def _settings(args: argparse.Namespace) -> BrokerSettings:
    url = args.broker or os.environ.get("FEDMQ_BROKER") or DEFAULT_BROKER
    settings = BrokerSettings.from_url(url, ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    if (args.ca_file or args.cert_file) and not settings.tls:
        raise OpsError(f"--ca-file/--cert-file need a TLS broker URL (mqtts://...), got {url}")
    if bool(args.cert_file) != bool(args.key_file):
        raise OpsError("--cert-file and --key-file go together")
    return settings


def _signer(args: argparse.Namespace) -> OperatorSigner | None:
    """The operator identity that signs requests and commands: the TLS client certificate, when
    it is an operator's (an aggregator that knows the fleet CA refuses unsigned requests)."""
    if not (args.cert_file and args.key_file):
        return None
    return OperatorSigner.from_files(args.cert_file, args.key_file)


def _client(args: argparse.Namespace) -> OpsClient:
    fleet = args.fleet or os.environ.get("FEDMQ_FLEET") or "default"
    return OpsClient(_settings(args), fleet, args.client_id or default_client_id(), args.timeout, signer=_signer(args))


def _run(body: Callable[[argparse.Namespace], Awaitable[int]]) -> Callable[[argparse.Namespace], int]:
    """A command function: run ``body`` and turn fedmq errors into one line and exit code 1."""

    def command(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(body(args))
        except (FedmqError, ValueError) as exc:
            print(f"fedmq: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0 if getattr(args, "ops_command", "") == "watch" else 130

    return command


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


# -- fleet ------------------------------------------------------------------------------------

async def fleet_status(args: argparse.Namespace) -> int:
    async with _client(args) as ops:
        status = await ops.fleet_status()
    if args.json:
        _print_json(status.to_json())
    else:
        print(render_fleet_status(status))
    if status.warning:
        print(f"fedmq: warning: {status.warning}", file=sys.stderr)
    return 0


async def fleet_watch(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise OpsError("--interval must be positive")
    tty = sys.stdout.isatty()
    drawn = 0
    async with _client(args) as ops:
        while True:
            status = await ops.fleet_status()
            text = render_fleet_status(status)
            if status.warning:
                text += f"\nwarning: {status.warning}"
            stamp = f"fedmq fleet watch, every {args.interval:g} s, {when(time.time())} (Ctrl-C to stop)"
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: redraw in place
            elif drawn:
                sys.stdout.write("\n")
            sys.stdout.write(f"{stamp}\n{text}\n")
            sys.stdout.flush()
            drawn += 1
            if args.count and drawn >= args.count:
                return 0
            await asyncio.sleep(args.interval)


async def fleet_command(args: argparse.Namespace) -> int:
    version = getattr(args, "version", 0) or 0
    async with _client(args) as ops:
        command = await ops.command(args.ops_command, args.device, args.reason or "", version=version)
    target = f"device {args.device}" if args.device else f"every device of fleet {ops.fleet}"
    what = f"freeze at v{version}" if command.command == "freeze" else command.command
    signed = f"signed by {ops.signer.name}" if ops.signer is not None else "unsigned: devices that know the fleet CA ignore it"
    print(f"{what} sent to {target} (retained, {signed}; devices obey the newest command)")
    return 0


# -- model ------------------------------------------------------------------------------------

async def model_list(args: argparse.Namespace) -> int:
    async with _client(args) as ops:
        result = (await ops.request("model.list", {"limit": args.limit})).result
    if args.json:
        _print_json(result)
        return 0
    rows = [[("*" if r["current"] else "") + f"v{r['version']}", f"v{r['parent']}" if r["parent"] else "-",
             when(r["created"]), age(r["created"]), r["size"], r["sha256"][:12], r["source"]]
            for r in result["versions"]]
    print(table(["VERSION", "PARENT", "CREATED", "AGE", "BYTES", "SHA256", "SOURCE"], rows))
    if result["total"] > len(rows):
        print(f"(the last {len(rows)} of {result['total']} versions; --limit N for more)")
    return 0


async def model_show(args: argparse.Namespace) -> int:
    async with _client(args) as ops:
        r = (await ops.request("model.show", {"version": args.version})).result
    if args.json:
        _print_json(r)
        return 0
    print(f"model v{r['version']}{' (current)' if r['current'] else ''}")
    print(f"  parent        {'v' + str(r['parent']) if r['parent'] else '-'}")
    print(f"  created       {when(r['created'])} ({age(r['created'])})")
    print(f"  source        {r['source']}")
    print(f"  sha256        {r['sha256']}")
    print(f"  size          {r['size']} bytes")
    print(f"  architecture  {' -> '.join(str(w) for w in r['arch'])} ({r['num_params']} parameters)")
    print(f"  task          {', '.join(f'{k}={v}' for k, v in r['task'].items())}")
    if r.get("backbone"):
        print(f"  backbone      {r['backbone']}")
    if r.get("signed_by"):
        print(f"  signed by     {r['signed_by']}")
    info = {k: v for k, v in r["info"].items()}
    if info:
        print("  info          " + ", ".join(f"{k}={_short(v)}" for k, v in sorted(info.items())))
    print(table(["  TENSOR", "SHAPE", "DTYPE", "L2 NORM"],
                [[f"  {name}", "x".join(str(d) for d in t["shape"]), t["dtype"], f"{t['norm']:.6g}"]
                 for name, t in r["tensors"].items()]))
    return 0


def _short(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


async def model_export(args: argparse.Namespace) -> int:
    try:
        from fedmq.edge_agent.onnx_backend import compose_with_backbone, inference_model
    except ImportError as exc:
        raise OpsError(f"model export needs onnx and onnxruntime (pip install 'fedmq[onnx]'): {exc}") from None
    import onnx

    async with _client(args) as ops:
        response = await ops.request("model.get", {"version": args.version})
        payload = response.tensors.get("payload")
        if payload is None:
            raise OpsError("the aggregator's answer to model.get carries no model")
        model: ModelMessage = decode_message(payload.tobytes(), max_bytes=MAX_RESPONSE_BYTES, expect=ModelMessage)
        backbone = None
        if model.backbone is not None:
            import hashlib

            from fedmq.broker import topics

            backbone = await ops.retained(topics.artifact_topic(ops.fleet, model.backbone.sha256))
            if hashlib.sha256(backbone).hexdigest() != model.backbone.sha256:
                raise OpsError(f"the backbone artifact {model.backbone.sha256} on the broker does not match its hash")
    onnx_model = inference_model(model.arch, model.params)
    if backbone is not None:
        onnx_model = compose_with_backbone(onnx.load_from_string(backbone), onnx_model)
    path = Path(args.file)
    write_atomic(path, onnx_model.SerializeToString())
    inputs = ", ".join(f"{v.name}" for v in onnx_model.graph.input)
    outputs = ", ".join(f"{v.name}" for v in onnx_model.graph.output)
    print(f"wrote model v{model.version} to {path} (inputs: {inputs}; outputs: {outputs})")
    return 0


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """Weights from an ``.npz`` (arrays named like the architecture's parameters) or a ``.fmq``
    model payload; floating arrays become float32."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise OpsError(f"cannot read {path}: {exc}") from None
    if size > MAX_PUSH_FILE_BYTES:
        raise OpsError(f"{path} is {size} bytes; the limit is {MAX_PUSH_FILE_BYTES}")
    if path.suffix == ".fmq":
        try:
            model: ModelMessage = decode_message(path.read_bytes(), max_bytes=size + 1, expect=ModelMessage)
        except RejectedMessage as exc:
            raise OpsError(f"{path} is not a fedmq model payload: {exc}") from None
        params = dict(model.params)
    elif path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                params = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise OpsError(f"cannot read {path} as an .npz of parameter arrays: {exc}") from None
    else:
        raise OpsError(f"{path}: push takes an .npz (arrays named dense0.weight, dense0.bias, ...) or a .fmq model payload")
    if not params:
        raise OpsError(f"{path} holds no arrays")
    out = {}
    for name, array in params.items():
        if array.dtype.kind == "f":
            out[name] = np.ascontiguousarray(array, dtype=np.float32)
        elif array.dtype.kind in "iu":
            out[name] = np.ascontiguousarray(array)  # the aggregator names it among the problems
        else:
            raise OpsError(f"{path}: array {name!r} has dtype {array.dtype}; weights must be floating point")
    return out


async def model_push(args: argparse.Namespace) -> int:
    params = load_weights(Path(args.file))
    async with _client(args) as ops:
        r = (await ops.request("model.push", {"file": Path(args.file).name[:200]}, tensors=params)).result
    print(f"published {args.file} as model v{r['version']} (parent v{r['parent']}, sha256 {r['sha256'][:12]})")
    return 0


async def model_rollback(args: argparse.Namespace) -> int:
    async with _client(args) as ops:
        r = (await ops.request("model.rollback", {"version": args.version})).result
    print(f"re-published the weights of v{r['rollback_of']} as model v{r['version']} (devices install it as an upgrade)")
    return 0


# -- rounds -----------------------------------------------------------------------------------

METRIC_COLUMNS = ("train_loss", "train_accuracy")


async def rounds(args: argparse.Namespace) -> int:
    async with _client(args) as ops:
        result = (await ops.request("rounds", {"limit": args.limit})).result
    if args.json:
        _print_json(result)
        return 0
    rows = []
    for r in result["rounds"]:
        info = r["info"]
        metrics = {k: v for k, v in info.items() if isinstance(v, int | float) and not isinstance(v, bool)
                   and k not in ("updates", "examples", "bytes_in", "round_seconds", "seed", "rollback_of",
                                 "dropped_updates")}
        rows.append([f"v{r['version']}", when(r["created"]), r["source"], info.get("updates", "-"),
                     info.get("examples", "-"), info.get("round_seconds", "-"),
                     " ".join(f"{k}={_short(v)}" for k, v in sorted(metrics.items())) or "-"])
    print(table(["VERSION", "CREATED", "SOURCE", "UPDATES", "EXAMPLES", "SECONDS", "METRICS"], rows))
    if result["total"] > len(rows):
        print(f"(the last {len(rows)} of {result['total']} versions; --limit N for more)")
    return 0


# -- registration -----------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_ops_commands(sub: Any) -> None:
    """Register ``fleet``, ``model`` and ``rounds`` on the top-level subparsers ``sub``."""
    common = _common_options()

    def leaf(parent: Any, name: str, body: Callable[[argparse.Namespace], Awaitable[int]], help_text: str) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, parents=[common], help=help_text, description=help_text)
        parser.set_defaults(func=_run(body), ops_command=name)
        return parser

    fleet = sub.add_parser("fleet", help="fleet presence, live view, pause and resume",
                           description="Watch and steer the fleet's devices over MQTT.")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    status = leaf(fleet_sub, "status", fleet_status, "table of devices: online/offline since when, model version, "
                  "last update, accepted/rejected counts, backend, platform")
    status.add_argument("--json", action="store_true", help="print JSON")
    watch = leaf(fleet_sub, "watch", fleet_watch, "live fleet table, redrawn every --interval seconds (Ctrl-C to stop)")
    watch.add_argument("--interval", type=float, default=2.0, help="seconds between redraws (default 2)")
    watch.add_argument("--count", type=_positive_int, default=0, help="stop after N redraws (default: never)")
    for name, text in (("pause", "stop local training (retained command; devices stay online)"),
                       ("resume", "restart local training"),
                       ("freeze", "keep devices on --version: they install nothing newer until unfreeze"),
                       ("unfreeze", "lift a freeze: devices install the newest model again")):
        command = leaf(fleet_sub, name, fleet_command, text)
        command.add_argument("--device", help="one device (default: every device, via cmd/all)")
        command.add_argument("--reason", help="why (shown in the devices' logs)")
        if name == "freeze":
            command.add_argument("--version", type=_positive_int, required=True, help="the newest version devices may run")

    model = sub.add_parser("model", help="model versions: list, show, export, push, rollback",
                           description="The aggregator's model registry, over MQTT.")
    model_sub = model.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    listing = leaf(model_sub, "list", model_list, "every version with its parent, time, size and source")
    listing.add_argument("--limit", type=_positive_int, default=100, help="the newest N versions (default 100)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    show = leaf(model_sub, "show", model_show, "one version: info, parent, sha256, tensor shapes and norms")
    show.add_argument("version", type=_positive_int, metavar="VERSION")
    show.add_argument("--json", action="store_true", help="print JSON")
    export = leaf(model_sub, "export", model_export, "write one version as a standard ONNX inference model")
    export.add_argument("version", type=_positive_int, metavar="VERSION")
    export.add_argument("file", metavar="FILE.onnx")
    push = leaf(model_sub, "push", model_push, "publish operator-supplied weights as the next version "
                "(.npz with arrays dense0.weight, dense0.bias, ... or a .fmq model payload)")
    push.add_argument("file", metavar="FILE")
    rollback = leaf(model_sub, "rollback", model_rollback, "re-publish the weights of VERSION under a new, higher "
                    "version number (devices never install an older version)")
    rollback.add_argument("version", type=_positive_int, metavar="VERSION")

    history = leaf(sub, "rounds", rounds, "round history with metrics")
    history.add_argument("--limit", type=_positive_int, default=100, help="the newest N rounds (default 100)")
    history.add_argument("--json", action="store_true", help="print JSON")
