"""``reprobuild keygen``: lock signing keys, verity and Secure Boot key pairs."""

from __future__ import annotations

import os
from pathlib import Path

import click

from reprobuild.cli import cli


@cli.command("keygen")
@click.option("--out", "prefix", required=True, type=click.Path(path_type=Path),
              help="Path prefix: writes PREFIX.key and PREFIX.pub (or PREFIX.crt).")
@click.option("--verity", "kind", flag_value="verity", help="RSA key + X.509 certificate for signing verity root hashes.")
@click.option("--secure-boot", "kind", flag_value="secure-boot", help="RSA key + X.509 certificate for signing UKIs.")
@click.option("--lock", "kind", flag_value="lock", default=True, help="ed25519 key pair for signing locks (default).")
@click.option("--common-name", default=None, help="Certificate subject CN (verity / Secure Boot).")
@click.option("--identity", default="release@reprobuild", show_default=True,
              help="Lock keys: the principal of the printed allowed_signers line (and the key's comment).")
def keygen_command(prefix: Path, kind: str, common_name: str | None, identity: str) -> None:
    """Generate a key pair.

    \b
    --lock (default)   PREFIX.key (OpenSSH ed25519 private key, mode 0600) and PREFIX.pub
                       (OpenSSH public key), for [Signing] LockKey=; prints the
                       allowed_signers line for verifiers (ssh-keygen -Y verify)
    --verity           PREFIX.key (RSA) and PREFIX.crt, for VerityKey= / VerityCertificate=
    --secure-boot      PREFIX.key (RSA) and PREFIX.crt, for SecureBootKey= / SecureBootCertificate=

    Certificates get a fixed validity (1970 to 9999) derived from nothing but the key, so no
    clock enters them. Existing files are never overwritten.
    """
    if kind == "lock":
        from reprobuild.keys import allowed_signers_line, generate_keypair
        from reprobuild.sshsig import parse_public_key_line

        key_path, pub_path = generate_keypair(prefix, identity)
        blob = parse_public_key_line(pub_path.read_text(), str(pub_path))
        click.echo(f"wrote {key_path} (keep it secret) and {pub_path}", err=True)
        click.echo("allowed_signers line for verifiers:", err=True)
        click.echo(allowed_signers_line(blob, identity))
        return
    from reprobuild.keys import KeyFileError
    from reprobuild.x509 import generate_rsa_key_and_certificate

    key_path = prefix.with_name(prefix.name + ".key")
    crt_path = prefix.with_name(prefix.name + ".crt")
    for path in (key_path, crt_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; not overwriting a key")
    cn = common_name or ("reprobuild verity" if kind == "verity" else "reprobuild Secure Boot")
    key_pem, cert_pem = generate_rsa_key_and_certificate(cn)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    crt_path.write_bytes(cert_pem)
    click.echo(f"wrote {key_path} (keep it secret) and {crt_path}")
