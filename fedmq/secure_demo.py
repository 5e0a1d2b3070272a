"""The secure variant of the demo: a fleet PKI, Mosquitto with mutual TLS and per-device ACLs,
and Ed25519-signed models, all made fresh in the demo's working directory."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedmq.broker import pki
from fedmq.broker.local import BrokerStartError, find_free_port, mosquitto_binary
from fedmq.broker.mosquitto_config import render_acl, render_config
from fedmq.broker.settings import BrokerSettings
from fedmq.broker.signing import SigningKey


@dataclass
class SecureFleet:
    """Credentials and a TLS Mosquitto for one demo fleet."""

    workdir: Path
    fleet: str
    devices: list[str]
    aggregator: str
    observer: str
    port: int = 0
    signing_key: Path = field(init=False)
    public_key: Path = field(init=False)
    _process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.pki_dir = self.workdir / "pki"
        self.signing_key = self.pki_dir / "fleet-signing.key"
        self.public_key = self.pki_dir / "fleet-signing.pub"

    def create(self) -> None:
        pki.init_ca(self.pki_dir, fleet=self.fleet)
        pki.issue_server(self.pki_dir, hostnames=["localhost"], ips=["127.0.0.1"])
        for device in self.devices:
            pki.issue_device(self.pki_dir, device)
        pki.issue_client(self.pki_dir, self.aggregator, role="aggregator")
        pki.issue_client(self.pki_dir, self.observer, role="operator")
        SigningKey.generate().write(self.signing_key, self.public_key)

    def settings(self, identity: str) -> BrokerSettings:
        """TLS settings for ``identity`` (a device id, the aggregator or the observer)."""
        if identity in self.devices:
            cert, key = pki.device_paths(self.pki_dir, identity)
        else:
            cert, key = pki.client_paths(self.pki_dir, identity)
        return BrokerSettings(host="127.0.0.1", port=self.port, protocol="5", tls=True,
                              ca_file=str(self.pki_dir / "ca.pem"), cert_file=str(cert), key_file=str(key))

    def start_broker(self, timeout: float = 10.0) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerStartError("--secure needs Mosquitto (TLS, ACLs): apt-get install -y mosquitto")
        self.port = find_free_port()
        broker_dir = self.workdir / "mosquitto"
        broker_dir.mkdir(parents=True, exist_ok=True)
        acl = broker_dir / "fedmq.acl"
        acl.write_text(render_acl(self.fleet, aggregator=self.aggregator, operators=[self.observer],
                                  denied_devices=pki.revoked_device_ids(self.pki_dir)))
        conf = render_config(fleet=self.fleet, port=self.port, tls=pki.server_tls_files(self.pki_dir), acl_path=acl,
                             crl_file=pki.crl_file(self.pki_dir))
        if os.geteuid() == 0:
            conf += "user root\n"  # as root Mosquitto would drop to 'mosquitto', which cannot read the demo's keys
        (broker_dir / "mosquitto.conf").write_text(conf)
        log = (broker_dir / "mosquitto.log").open("wb")
        self._process = subprocess.Popen([binary, "-c", str(broker_dir / "mosquitto.conf")], stdout=log,
                                         stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerStartError(f"mosquitto exited: {(broker_dir / 'mosquitto.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise BrokerStartError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout}s")

    def stop_broker(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
