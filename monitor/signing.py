"""Ed25519 signatures of policy records: who may put code on the workers.

The registry topic is an ordinary Kafka topic: anyone with write access could publish a policy,
and a policy is code. A worker started with ``--policy-public-key FILE`` takes only records signed
by the matching private key (``policy publish --signing-key FILE``), so write access to the topic
alone cannot run code on the workers. Keys are PEM files (PKCS#8 private key, SubjectPublicKeyInfo
public key) made by ``agent-monitor policy keygen``; a key's id is the first 16 hex digits of the
sha256 of its raw public bytes.

Example::

    >>> private_pem, public_pem = generate_keypair()
    >>> private, public = load_private_key(private_pem), load_public_key(public_pem)
    >>> signature = sign(b"policy bytes", private)
    >>> verify(b"policy bytes", signature, [public]) == key_id(public)
    True
    >>> verify(b"other bytes", signature, [public])
    Traceback (most recent call last):
    ...
    monitor.signing.SignatureInvalid: the signature does not match any trusted key
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from monitor.errors import EXIT_USAGE, MonitorError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNING_KEY_ENV = "AGENT_MONITOR_POLICY_SIGNING_KEY"
"""Path of the private key ``policy publish/rollback/promote`` sign with when no flag names one."""


class KeyFileError(MonitorError):
    """A key file is missing, unreadable or not an Ed25519 key of the expected kind."""

    exit_code = EXIT_USAGE


class SignatureInvalid(MonitorError):
    """A record is unsigned, or its signature matches no trusted key."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A new Ed25519 key pair as (private PEM, public PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    public_pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return private_pem, public_pem


def _pem(source: bytes | str | os.PathLike[str], what: str) -> tuple[bytes, str]:
    if isinstance(source, bytes):
        return source, f"the {what}"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None


def load_private_key(source: bytes | str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM bytes or a PEM file (unencrypted PKCS#8)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data, where = _pem(source, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{where}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{where}: an Ed25519 key is needed, not {type(key).__name__}")
    return key


def load_public_key(source: bytes | str | os.PathLike[str]) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes or a PEM file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data, where = _pem(source, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{where}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: an Ed25519 key is needed, not {type(key).__name__}")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the key's raw public bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(payload: bytes, private: Ed25519PrivateKey) -> str:
    """The signature of ``payload``, base64."""
    return base64.b64encode(private.sign(payload)).decode()


def verify(payload: bytes, signature: str | None, trusted: list[Ed25519PublicKey]) -> str:
    """The id of the trusted key that signed ``payload``; :class:`SignatureInvalid` otherwise."""
    from cryptography.exceptions import InvalidSignature

    if not signature:
        raise SignatureInvalid("the record is not signed")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureInvalid("the signature is not base64") from None
    for public in trusted:
        try:
            public.verify(raw, payload)
        except InvalidSignature:
            continue
        return key_id(public)
    raise SignatureInvalid("the signature does not match any trusted key")


def write_keypair(base: str | os.PathLike[str]) -> tuple[Path, Path, str]:
    """Write ``BASE.key`` (mode 0600) and ``BASE.pub``; refuses to overwrite either. Returns the
    paths and the key id."""
    private_pem, public_pem = generate_keypair()
    private_path, public_path = Path(f"{base}.key"), Path(f"{base}.pub")
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} exists: choose another name (keys are never overwritten)")
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
        public_path.write_bytes(public_pem)
    except OSError as exc:
        raise KeyFileError(f"cannot write the key pair at {base}: {exc.strerror or exc}") from None
    return private_path, public_path, key_id(load_public_key(public_pem))
