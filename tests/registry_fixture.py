"""Debian's docker-registry (the distribution project's registry, a real OCI registry) on
127.0.0.1 for tests: a temporary configuration and storage directory, a free port, plain HTTP or
TLS with a CA made here (cryptography) and basic auth from an htpasswd file (bcrypt, by
apache2-utils' htpasswd). Started as a subprocess, stopped (by its own pid) when the fixture ends.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

REGISTRY = "/usr/bin/docker-registry"
USER, PASSWORD = "builder", "s3cret-pass"

needs_registry = pytest.mark.skipif(shutil.which(REGISTRY) is None or shutil.which("htpasswd") is None,
                                    reason="docker-registry and apache2-utils are not installed (make apt)")


@dataclass
class Registry:
    address: str  # 127.0.0.1:PORT
    storage: Path
    ca: Path | None  # the CA certificate (TLS registries)
    process: subprocess.Popen[bytes]
    log: Path

    def blob_file(self, digest: str) -> Path:
        """Where the filesystem driver keeps a blob's bytes."""
        hex_digest = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.crt, server.crt, server.key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("reprobuild test CA")).issuer_name(_name("reprobuild test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    paths = directory / "ca.crt", directory / "server.crt", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return paths


def start_registry(directory: Path, tls: bool) -> Registry:
    """Start docker-registry serving ``directory/storage`` (TLS + basic auth when ``tls``)."""
    directory.mkdir(parents=True, exist_ok=True)
    storage = directory / "storage"
    storage.mkdir()
    port = free_port()
    config = ["version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: true", "storage:",
              "  filesystem:", f"    rootdirectory: {storage}", "  delete:", "    enabled: true",
              "http:", f"  addr: 127.0.0.1:{port}"]  # fmt: skip
    ca = None
    if tls:
        ca, cert, key = make_tls(directory)
        config += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        htpasswd = subprocess.run(["htpasswd", "-Bbn", USER, PASSWORD], check=True, capture_output=True).stdout
        (directory / "htpasswd").write_bytes(htpasswd)
        config += ["auth:", "  htpasswd:", "    realm: reprobuild-test", f"    path: {directory / 'htpasswd'}"]
    (directory / "config.yml").write_text("\n".join(config) + "\n")
    log = directory / "registry.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([REGISTRY, "serve", str(directory / "config.yml")], stdout=out,
                                   stderr=subprocess.STDOUT)  # fmt: skip
    registry = Registry(f"127.0.0.1:{port}", storage, ca, process, log)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/"
    deadline = time.monotonic() + 30
    while True:
        try:
            r = requests.get(url, verify=str(ca) if ca else True, timeout=2)
            if r.status_code in (200, 401):
                return registry
        except requests.exceptions.RequestException:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            registry.stop()
            raise RuntimeError(f"docker-registry did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
