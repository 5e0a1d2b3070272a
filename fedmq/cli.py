"""The ``fedmq`` command: the composition root that wires broker, aggregator and edge agent.

CLI -> config (checked once) -> daemon.run(stop). Signal handlers only set the stop flag; a
second Ctrl-C (or SIGTERM) forces the exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmq import __version__
from fedmq.broker.errors import FedmqError

log = logging.getLogger("fedmq")

EXAMPLES = """\
examples:
  fedmq demo                                 federated digits demo on a local broker
  fedmq demo --agents 5 --rounds 10 --report run.json
  fedmq broker run --port 1883               a local broker for development
  fedmq aggregator --config aggregator.toml  the cloud daemon
  fedmq agent --config agent.toml            the device daemon
  fedmq demo --mode async --stragglers 0.3   async buffered aggregation with slow devices
  fedmq demo --keep-running                  a demo fleet to try the commands below on
  fedmq fleet status --broker URL --fleet F  who is online, on which version, with which counts
  fedmq model list | rollback V              the aggregator's versions; re-publish V as a new one
  fedmq report --state-dir DIR --out DIR     PNG plots of accuracy, loss and updates per version
"""


def _setup_logging(level: str, fmt: str = "text") -> None:
    from fedmq.broker.logs import setup_logging

    setup_logging(level, fmt, stream=sys.stderr)


def _run_until_signal(make: Any) -> None:
    """Run ``make(stop)`` (a coroutine) with SIGINT/SIGTERM setting ``stop``; a second signal exits at once."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if stop.is_set():
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(128 + signum)
            log.info("%s received: shutting down (send it again to force)", signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        await make(stop)

    asyncio.run(main())


# -- subcommands ------------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from fedmq.demo import DemoOptions, run_demo

    opts = DemoOptions(
        agents=args.agents, rounds=args.rounds, alpha=args.alpha, seed=args.seed, broker_url=args.broker,
        prefer_broker=args.local_broker, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        report=Path(args.report) if args.report else None, timeout_s=args.timeout, backend=args.backend,
        secure=args.secure, codec=args.codec, mode=args.mode, stragglers=args.stragglers, slowdown=args.slowdown,
        buffer_size=args.buffer_size, max_staleness=args.max_staleness, keep_running=args.keep_running,
        workdir=Path(args.workdir) if args.workdir else None,
    )

    async def demo(stop: asyncio.Event) -> None:
        task = asyncio.create_task(run_demo(opts, say=lambda s: print(s, flush=True)))
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([task, stopper], return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise KeyboardInterrupt
        task.result()

    _run_until_signal(demo)
    return 0


def cmd_aggregator(args: argparse.Namespace) -> int:
    from fedmq.aggregator.config import AggregatorConfig
    from fedmq.aggregator.daemon import Aggregator

    config = AggregatorConfig.from_file(args.config)
    aggregator = Aggregator(config)
    _run_until_signal(aggregator.run)
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    from fedmq.edge_agent.agent import Agent
    from fedmq.edge_agent.config import AgentConfig

    if args.agent_command == "predict":
        return cmd_agent_predict(args)
    if not args.config:
        raise FedmqError("fedmq agent needs --config FILE (see deploy/agent.example.toml)")
    config = AgentConfig.from_file(args.config)
    agent = Agent(config)
    _run_until_signal(agent.run)
    return 0


def cmd_agent_predict(args: argparse.Namespace) -> int:
    import json

    from fedmq.edge_agent.predict import load_input, predict

    result = predict(args.state, load_input(args.input))
    if args.json:
        print(json.dumps({"version": result.version, "labels": result.labels.tolist(),
                          "probabilities": result.probabilities.round(6).tolist()}))
    else:
        print(f"# model v{result.version}: index label probability", file=sys.stderr)
        for i, (label, probs) in enumerate(zip(result.labels, result.probabilities, strict=True)):
            print(f"{i} {label} {probs[label]:.4f}")
    return 0


def cmd_broker_run(args: argparse.Namespace) -> int:
    from fedmq.broker.local import LocalBroker

    async def serve(stop: asyncio.Event) -> None:
        async with LocalBroker(prefer=args.prefer, host=args.host, port=args.port) as broker:
            print(f"{broker.kind} broker listening on {broker.url} (MQTT {', '.join(broker.protocols)}); "
                  "Ctrl-C to stop", flush=True)
            await stop.wait()

    _run_until_signal(serve)
    return 0


def cmd_pki(args: argparse.Namespace) -> int:
    from fedmq.broker import pki

    directory = Path(args.dir)
    if args.pki_command == "init":
        files = pki.init_ca(directory, fleet=args.fleet, days=args.days or 3650, force=args.force)
        print(f"fleet CA written: {files.cert} (certificate), {files.key} (private key, 0600)")
    elif args.pki_command == "issue-server":
        cert, key = pki.issue_server(directory, hostnames=args.hostname, ips=args.ip or ["127.0.0.1"],
                                     days=args.days or 825, key_group=args.key_group, force=args.force)
        print(f"broker certificate {cert}, key {key}")
    elif args.pki_command == "issue-device":
        for device in args.device:
            cert, key = pki.issue_device(directory, device, days=args.days or 825, force=args.force)
            print(f"device {device}: certificate {cert}, key {key}")
    elif args.pki_command == "issue-client":
        cert, key = pki.issue_client(directory, args.name, role=args.role, days=args.days or 825, force=args.force)
        print(f"{args.role} {args.name}: certificate {cert}, key {key}")
    elif args.pki_command == "revoke":
        import datetime

        started = datetime.datetime.now(datetime.UTC)
        for device in args.device:
            record = pki.revoke(directory, device, reason=args.reason)
            when = "already revoked" if record.revoked_at < started else "revoked"
            print(f"device {device}: certificate {record.serial:X} {when} ({record.revoked_at:%Y-%m-%d %H:%M} UTC, "
                  f"reason: {record.reason})")
        print(f"updated {pki.crl_file(directory)} and {directory / pki.REVOKED_FILE}\n"
              "next: on the broker host (copy crl.pem there if the PKI lives elsewhere), regenerate the broker files "
              "with the same options as before, so that the ACL denies the revoked devices, and reload Mosquitto:\n"
              f"  fedmq broker config --pki {directory} ... -o /etc/mosquitto/conf.d/fedmq.conf\n"
              "  systemctl reload mosquitto    # SIGHUP: the CRL refuses new connections, the ACL takes every topic\n"
              "                                # from a connection already open; restart instead to drop it\n"
              "see SECURITY.md, \"When a device is stolen\"")
    elif args.pki_command == "signing-key":
        from fedmq.broker.signing import SigningKey

        private, public = directory / f"{args.name}.key", directory / f"{args.name}.pub"
        if private.exists() and not args.force:
            raise FedmqError(f"{private} exists; pass --force to replace it (devices trusting it would reject new models)")
        key = SigningKey.generate()
        key.write(private, public)
        print(f"model signing key {key.key_id}: private {private} (0600, aggregator only), public {public} (devices)")
    return 0


def cmd_broker_config(args: argparse.Namespace) -> int:
    from fedmq.broker import pki
    from fedmq.broker.files import write_atomic
    from fedmq.broker.mosquitto_config import render_acl, render_config

    acl_path = Path(args.acl_path).absolute()
    tls = pki.server_tls_files(args.pki) if args.pki else None
    if tls is None and not args.password_file:
        raise FedmqError("fedmq broker config needs --pki DIR (TLS with client certificates) or --password-file FILE")
    # Client certificates: the CRL refuses revoked ones at the handshake and the ACL denies them
    # every topic (the only layer that reaches a connection opened before the revocation).
    with_certificates = tls is not None and not args.password_file
    conf = render_config(fleet=args.fleet, port=args.port, bind=args.bind, tls=tls,
                         password_file=Path(args.password_file).absolute() if args.password_file else None,
                         acl_path=acl_path,
                         persistence_dir=Path(args.persistence_dir).absolute() if args.persistence_dir else None,
                         crl_file=pki.crl_file(args.pki) if with_certificates else None)
    denied = pki.revoked_device_ids(args.pki) if args.pki else []
    acl = render_acl(args.fleet, aggregator=args.aggregator, operators=args.operator or [], denied_devices=denied)
    acl_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(acl_path, acl.encode())
    acl_path.chmod(0o644)  # Mosquitto reads it after dropping privileges
    if args.output:
        write_atomic(Path(args.output), conf.encode())
        Path(args.output).chmod(0o644)
        print(f"wrote {args.output} and {acl_path}", file=sys.stderr)
    else:
        sys.stdout.write(conf)
    if denied:
        print(f"revoked devices denied in the ACL: {', '.join(denied)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmq", description="Federated learning for edge fleets over MQTT.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fedmq {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("FEDMQ_LOG_LEVEL", "warning"),
                        choices=["debug", "info", "warning", "error"], help="log verbosity (default: warning; env FEDMQ_LOG_LEVEL)")
    parser.add_argument("--log-format", default=os.environ.get("FEDMQ_LOG_FORMAT", "text"), choices=["text", "json", "auto"],
                        help="text lines (no timestamp under journald, which adds its own) or one JSON object per line "
                        "(default: text; env FEDMQ_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="run a federated demo fleet on this machine",
                          description="Start a local broker, an aggregator and N agents that train an MLP on "
                          "non-IID shards of scikit-learn's digits; print one row per model version.")
    demo.add_argument("--agents", type=int, default=10, help="number of agents (default 10)")
    demo.add_argument("--rounds", type=int, default=20, help="number of rounds (default 20)")
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration; smaller is more skewed (default 0.5)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the split and the initial model (default 0)")
    demo.add_argument("--broker", metavar="URL", help="use this broker (mqtt://host:port[?protocol=5|3.1.1]) instead of starting one")
    demo.add_argument("--local-broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                      help="which local broker to start: auto = Mosquitto if installed, else embedded amqtt")
    demo.add_argument("--epochs", type=int, default=5, help="local epochs per round (default 5)")
    demo.add_argument("--batch-size", type=int, default=16, help="local minibatch size (default 16)")
    demo.add_argument("--lr", type=float, default=0.2, help="local learning rate (default 0.2)")
    demo.add_argument("--codec", default="fp32",
                      choices=["fp32", "fp16", "int8", "int8-block", "topk-fp32", "topk-fp16"],
                      help="delta codec of the updates (default fp32; lossy ones use error feedback on the agents)")
    demo.add_argument("--secure", action="store_true",
                      help="mutual TLS with per-device certificates, broker ACLs and signed models (needs Mosquitto)")
    demo.add_argument("--backend", choices=["auto", "numpy", "onnx", "wasm"], default="auto",
                      help="the agents' training backend (default auto: the fastest one installed)")
    demo.add_argument("--mode", choices=["sync", "async"], default="sync",
                      help="sync rounds (wait for the fleet) or async buffered aggregation (FedBuff: a version every "
                      "--buffer-size updates, stale updates weighted 1/sqrt(1+staleness)); default sync")
    demo.add_argument("--buffer-size", type=int, metavar="K", help="async: updates per version (default: half the agents)")
    demo.add_argument("--max-staleness", type=int, default=10, metavar="S",
                      help="async: take updates computed up to S versions ago (default 10)")
    demo.add_argument("--stragglers", type=float, default=0.0, metavar="FRACTION",
                      help="make this fraction of the agents slow (default 0)")
    demo.add_argument("--slowdown", type=float, default=5.0, metavar="X",
                      help="how many times slower the stragglers are: they sleep in proportion to their work (default 5)")
    demo.add_argument("--keep-running", action="store_true",
                      help="after the rounds, keep the fleet training until Ctrl-C, so that `fedmq fleet ...` can be tried on it")
    demo.add_argument("--report", metavar="FILE.json", help="write one JSON object per model version to this file")
    demo.add_argument("--workdir", metavar="DIR", help="keep the run's files here (the aggregator's registry in "
                      "DIR/aggregator, for `fedmq report --state-dir DIR/aggregator`); default: a temporary directory")
    demo.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds (default 600)")
    demo.set_defaults(func=cmd_demo)

    from fedmq.report import add_report_command

    add_report_command(sub)
    from fedmq.ops_cli import add_ops_commands

    add_ops_commands(sub)

    agg = sub.add_parser("aggregator", help="run the aggregator daemon",
                         description="Run the aggregator: publish the model, check updates, run FedAvg rounds.")
    agg.add_argument("--config", required=True, metavar="FILE", help="aggregator TOML (see deploy/aggregator.example.toml)")
    agg.set_defaults(func=cmd_aggregator)

    agent = sub.add_parser("agent", help="run the edge agent daemon",
                           description="Run an edge agent: receive models, train on local data, publish deltas.")
    agent.add_argument("--config", metavar="FILE", help="agent TOML (see deploy/agent.example.toml)")
    agent.set_defaults(func=cmd_agent, agent_command=None)
    agent_sub = agent.add_subparsers(dest="agent_command", metavar="ACTION")
    predict = agent_sub.add_parser(
        "predict", help="predict with the device's current model (current.onnx in the state directory)",
        description="Run the fleet's current model, as exported by the agent to STATE/current.onnx, on the "
        "examples in INPUT.npy (an N x features float array); print index, label and probability per line.")
    predict.add_argument("--state", required=True, metavar="DIR", help="the agent's state_dir")
    predict.add_argument("input", metavar="INPUT.npy", help="examples to predict")
    predict.add_argument("--json", action="store_true", help="print one JSON object instead of lines")

    pki_parser = sub.add_parser("pki", help="fleet certificates (TLS, device identity) and the model signing key",
                                description="A small fleet PKI: a CA, the broker's server certificate, one client "
                                "certificate per device (CN = device id = MQTT client id) and per aggregator/operator, "
                                "and the Ed25519 key that signs models. Private keys are written 0600.")
    pki_sub = pki_parser.add_subparsers(dest="pki_command", metavar="ACTION", required=True)

    def pki_action(name: str, help_text: str) -> argparse.ArgumentParser:
        action = pki_sub.add_parser(name, help=help_text, description=help_text)
        action.add_argument("--dir", required=True, help="the PKI directory (e.g. /etc/fedmq/pki)")
        action.add_argument("--days", type=int, help="validity in days")
        action.add_argument("--force", action="store_true", help="replace existing files")
        action.set_defaults(func=cmd_pki)
        return action

    pki_action("init", "create the fleet CA (ca.pem, ca.key)").add_argument("--fleet", required=True)
    server = pki_action("issue-server", "issue the broker's TLS certificate")
    server.add_argument("--hostname", action="append", required=True, help="DNS name of the broker (repeatable)")
    server.add_argument("--ip", action="append", help="IP address of the broker (repeatable; default 127.0.0.1)")
    server.add_argument("--key-group", help="group that may read the key (mosquitto, which reads it after dropping root)")
    pki_action("issue-device", "issue device client certificates").add_argument("device", nargs="+", help="device ids")
    client = pki_action("issue-client", "issue an aggregator or operator client certificate")
    client.add_argument("name")
    client.add_argument("--role", choices=["aggregator", "operator"], required=True)
    revoke = pki_sub.add_parser(
        "revoke", help="revoke device certificates (crl.pem, revoked.json)",
        description="Add the current certificate of each DEVICE to the fleet CA's revocation list (crl.pem, signed "
        "by ca.key) and to revoked.json. Then regenerate the broker files (fedmq broker config) and reload or restart "
        "Mosquitto: see SECURITY.md.")
    revoke.add_argument("--dir", required=True, help="the PKI directory (holds ca.key)")
    revoke.add_argument("device", nargs="+", help="device ids")
    revoke.add_argument("--reason", default="unspecified", help="why, for revoked.json (e.g. 'stolen 2024-05-01')")
    revoke.set_defaults(func=cmd_pki)
    signing = pki_action("signing-key", "create an Ed25519 model signing key pair (NAME.key, NAME.pub)")
    signing.add_argument("--name", default="fleet-signing", help="file name stem (default fleet-signing)")

    broker = sub.add_parser("broker", help="local broker for development and tests; Mosquitto config")
    broker_sub = broker.add_subparsers(dest="broker_command", metavar="ACTION", required=True)
    run = broker_sub.add_parser("run", help="start Mosquitto (if installed) or the embedded amqtt broker on loopback")
    run.add_argument("--prefer", choices=["auto", "mosquitto", "amqtt"], default="auto")
    run.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    run.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    run.set_defaults(func=cmd_broker_run)
    conf = broker_sub.add_parser("config", help="render a Mosquitto config and ACL file for a fleet",
                                 description="Render a Mosquitto listener (TLS with client certificates, or "
                                 "passwords), anonymous access off, and an ACL that lets each device publish only its "
                                 "own update and status topics and read only the model, artifacts, its receipts and "
                                 "commands; the aggregator and operators get what they need and no more.")
    conf.add_argument("--fleet", required=True)
    conf.add_argument("--port", type=int, default=8883)
    conf.add_argument("--bind", default="127.0.0.1")
    conf.add_argument("--pki", metavar="DIR", help="PKI directory from fedmq pki (TLS with client certificates)")
    conf.add_argument("--password-file", metavar="FILE", help="Mosquitto password file instead of certificates")
    conf.add_argument("--aggregator", required=True, help="the aggregator's identity (certificate CN or username)")
    conf.add_argument("--operator", action="append", help="an operator identity (repeatable)")
    conf.add_argument("--acl-path", required=True, help="where to write the ACL file (the config points to it)")
    conf.add_argument("--persistence-dir", help="Mosquitto persistence directory")
    conf.add_argument("-o", "--output", help="write the config here instead of stdout")
    conf.set_defaults(func=cmd_broker_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, args.log_format)
    try:
        return args.func(args)
    except FedmqError as exc:
        print(f"fedmq: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # option values checked by the option objects
        print(f"fedmq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
