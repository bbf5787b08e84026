"""Signing of audit checkpoints (Ed25519). The private key comes from settings
(ACCUBOOKS_AUDIT_SIGNING_KEY: base64 of a 32-byte seed); unset, a key is generated once
into the data folder (fine for the embedded process; set the setting in production, the
same on every process). The public key is served so auditors can check signatures with
any Ed25519 implementation."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from infra.settings import Settings

KEY_FILE = "audit-signing.key"
ALGORITHM = "Ed25519"


class SigningKeyError(Exception):
    """Raised when the configured signing key is not base64 of 32 bytes."""


class CheckpointSigner:
    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        raw = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.public_key = base64.b64encode(raw).decode()
        # A short name for the key, so a checkpoint says which key signed it.
        self.key_id = hashlib.sha256(raw).hexdigest()[:16]

    def sign(self, message: bytes) -> str:
        return base64.b64encode(self._private.sign(message)).decode()


def verify_signature(public_key: str, message: bytes, signature: str) -> bool:
    """True when ``signature`` (base64) is the key's signature of ``message``."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        key.verify(base64.b64decode(signature, validate=True), message)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def load_signer(settings: Settings) -> CheckpointSigner:
    if settings.audit_signing_key:
        return CheckpointSigner(_from_seed(settings.audit_signing_key))
    path = os.path.join(settings.data_dir, KEY_FILE)
    os.makedirs(settings.data_dir, exist_ok=True)
    if not os.path.exists(path):
        # Written whole to a private file, then linked into place: a concurrent creator
        # loses the race and everyone reads the one complete key.
        seed = base64.b64encode(os.urandom(32)).decode()
        draft = f"{path}.{os.getpid()}.tmp"
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(seed + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(draft)
    with open(path, encoding="ascii") as f:
        return CheckpointSigner(_from_seed(f.read().strip()))


def _from_seed(encoded: str) -> Ed25519PrivateKey:
    try:
        seed = base64.b64decode(encoded, validate=True)
    except binascii.Error as e:
        raise SigningKeyError("the audit signing key is not base64") from e
    if len(seed) != 32:
        raise SigningKeyError("the audit signing key must be 32 bytes (base64)")
    return Ed25519PrivateKey.from_private_bytes(seed)
