"""A minimal ssh-agent client: list the agent's keys and ask it to sign (draft-miller-ssh-agent).

Spoken directly over the unix socket named by ``SSH_AUTH_SOCK``. Every message is ``uint32
length, byte type, contents``:

* ``SSH_AGENTC_REQUEST_IDENTITIES`` (11) → ``SSH_AGENT_IDENTITIES_ANSWER`` (12): ``uint32 nkeys``,
  then ``string key blob, string comment`` per key;
* ``SSH_AGENTC_SIGN_REQUEST`` (13): ``string key blob, string data, uint32 flags`` →
  ``SSH_AGENT_SIGN_RESPONSE`` (14): ``string signature`` (for ed25519, RFC 8709's blob);
* ``SSH_AGENT_FAILURE`` (5) for a refusal (unknown key, a confirmation declined, a locked agent).

The private key stays in the agent (or in the hardware behind it).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Self

from reprobuild.errors import ReprobuildError
from reprobuild.sshsig import Reader, SshFormatError, fingerprint, ssh_string, ssh_uint32

SSH_AGENT_FAILURE = 5
SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14
MAX_MESSAGE = 256 * 1024  # OpenSSH's own limit for agent messages


class AgentError(ReprobuildError):
    """The ssh-agent is unreachable, refused, or does not hold the requested key."""


@dataclass(frozen=True)
class AgentKey:
    blob: bytes
    comment: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.blob)


class Agent:
    """One connection to the agent at ``socket_path``."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        self.path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(socket_path)
        except OSError as e:
            self.sock.close()
            raise AgentError(f"cannot reach the ssh-agent at {socket_path}: {e.strerror or e}",
                             hint="start one (eval $(ssh-agent)) and add the key with ssh-add") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise AgentError(f"the ssh-agent at {self.path} closed the connection")
            out += chunk
        return out

    def request(self, kind: int, body: bytes) -> tuple[int, bytes]:
        try:
            self.sock.sendall(ssh_string(bytes([kind]) + body))
            length = int.from_bytes(self._recv(4), "big")
            if not 0 < length <= MAX_MESSAGE:
                raise AgentError(f"the ssh-agent at {self.path} sent a message of {length} bytes")
            reply = self._recv(length)
        except OSError as e:
            raise AgentError(f"talking to the ssh-agent at {self.path}: {e.strerror or e}") from None
        return reply[0], reply[1:]

    def identities(self) -> list[AgentKey]:
        kind, body = self.request(SSH_AGENTC_REQUEST_IDENTITIES, b"")
        if kind != SSH_AGENT_IDENTITIES_ANSWER:
            raise AgentError(f"the ssh-agent at {self.path} refused to list its keys")
        try:
            r = Reader(body, "agent identities answer")
            keys = [AgentKey(r.string(), r.string().decode("utf-8", "replace")) for _ in range(r.uint32())]
            r.end()
        except SshFormatError as e:
            raise AgentError(f"the ssh-agent at {self.path} sent a malformed key list ({e})") from None
        return keys

    def sign(self, blob: bytes, data: bytes) -> bytes:
        """The agent's signature blob for ``data`` with the key ``blob``."""
        kind, body = self.request(SSH_AGENTC_SIGN_REQUEST, ssh_string(blob) + ssh_string(data) + ssh_uint32(0))
        if kind == SSH_AGENT_FAILURE:
            raise AgentError(f"the ssh-agent refused to sign with {fingerprint(blob)}",
                             hint="is the key still added (ssh-add -l), the agent unlocked, a confirmation given?")
        if kind != SSH_AGENT_SIGN_RESPONSE:
            raise AgentError(f"the ssh-agent answered a sign request with message type {kind}")
        try:
            r = Reader(body, "agent sign response")
            signature = r.string()
            r.end()
        except SshFormatError as e:
            raise AgentError(f"the ssh-agent sent a malformed signature ({e})") from None
        return signature


def select_key(keys: list[AgentKey], selector: str, key_type: bytes) -> AgentKey:
    """The agent key named by ``selector`` (a comment or a ``SHA256:`` fingerprint; empty: the only
    key of ``key_type``)."""
    usable = [k for k in keys if Reader(k.blob, "agent key").string() == key_type]
    if selector:
        chosen = [k for k in usable if selector in (k.comment, k.fingerprint)]
    else:
        chosen = usable
    names = ", ".join(f"{k.fingerprint} ({k.comment})" for k in usable) or "none"
    if not chosen:
        what = f"no {key_type.decode()} key" + (f" named {selector!r}" if selector else "")
        raise AgentError(f"the ssh-agent holds {what}; its {key_type.decode()} keys: {names}",
                         hint="add one with ssh-add, or name it: agent:COMMENT or agent:SHA256:…")
    if len(chosen) > 1:
        raise AgentError(f"the ssh-agent holds several {key_type.decode()} keys ({names}); name one: "
                         "agent:COMMENT or agent:SHA256:…")
    return chosen[0]
