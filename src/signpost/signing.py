"""Ed25519 signatures over artifact manifests: who made a model, checked before any of its files is read.

A manifest lists the SHA-256 of every file of its artifact, so a signature over the manifest's exact bytes covers
the whole folder: an edit of the weights and of the hash beside them no longer goes unnoticed. The signature lives
beside the manifest in ``manifest.sig`` (JSON: algorithm, key id, base64 signature).

Keys are ordinary PEM files (PKCS#8 private key, SubjectPublicKeyInfo public key; ``openssl`` reads them too), made
by ``signpost keys generate``:

- signing (the stages that write artifacts): ``SIGNPOST_SIGNING_KEY`` holds the private key's PEM text (a CI
  secret), else ``security.signing_key`` names the file. Without one, artifacts are written unsigned.
- verifying (serve, package, evaluate, the registry): ``SIGNPOST_PUBLIC_KEYS`` holds one or more public keys' PEM
  text, else ``security.public_keys`` names the files. Several keys are trusted at once while a key is rotated; a
  process with a signing key also trusts its own public half.
  Once any key is trusted, an unsigned artifact is refused unless ``security.allow_unsigned`` (``--allow-unsigned``)
  says otherwise, loudly; a signature that does not verify is refused always.

The policy is set once per process (``configure``; the CLI does it from the config) and read where models are
loaded, so no loader can forget it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

if TYPE_CHECKING:
    from signpost.config import SecurityConfig

log = logging.getLogger(__name__)

SIGNATURE = "manifest.sig"
SIGNING_KEY_ENV = "SIGNPOST_SIGNING_KEY"  # PEM text of the private key
PUBLIC_KEYS_ENV = "SIGNPOST_PUBLIC_KEYS"  # PEM text of one or more public keys
ALGORITHM = "ed25519"
_MAX_SIGNATURE_BYTES = 4096


class SignatureError(RuntimeError):
    """A key that cannot be read, or an artifact whose signature is missing or does not verify."""


@dataclass(frozen=True)
class Policy:
    """What this process signs with and whom it trusts."""

    signer: Ed25519PrivateKey | None = None
    trusted: dict[str, Ed25519PublicKey] = field(default_factory=dict)  # key id -> key
    allow_unsigned: bool = False

    @property
    def enforced(self) -> bool:
        """Signatures are checked: at least one public key is trusted."""
        return bool(self.trusted)


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def image_keys(policy: Policy) -> dict[str, Ed25519PublicKey]:
    """The keys an image packaged by this process should trust: the trusted ones and the signer's public half."""
    keys = dict(policy.trusted)
    if policy.signer is not None:
        public = policy.signer.public_key()
        keys[key_id(public)] = public
    return keys


def public_pem(keys: dict[str, Ed25519PublicKey]) -> str:
    """Public keys as concatenated PEM blocks (what ``load_public_keys`` and ``SIGNPOST_PUBLIC_KEYS`` read)."""
    return "".join(key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
                   .decode() for _, key in sorted(keys.items()))


def generate(out: Path, name: str = "signpost") -> tuple[Path, Path]:
    """Write a new key pair as ``out/<name>.key`` (private, mode 0600) and ``out/<name>.pub`` (public).

    Refuses to overwrite an existing key: a lost private key cannot be remade, and a replaced one silently
    invalidates every artifact signed before.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path} exists; refusing to overwrite a key (choose another --out or --name)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    public_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(pem: bytes, origin: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM bytes; ``origin`` names where they came from, for the error."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{origin}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{origin}: not an Ed25519 key; make one with `signpost keys generate`")
    return key


def load_public_keys(pem: bytes, origin: str) -> dict[str, Ed25519PublicKey]:
    """Every public key in PEM bytes that may hold several, by key id."""
    marker = b"-----BEGIN PUBLIC KEY-----"
    blocks = [marker + rest for rest in pem.split(marker)[1:]]
    if not blocks:
        raise SignatureError(f"{origin}: no PEM public key in it (expected '-----BEGIN PUBLIC KEY-----')")
    keys = {}
    for block in blocks:
        try:
            key = serialization.load_pem_public_key(block)
        except ValueError as exc:
            raise SignatureError(f"{origin}: not a PEM public key ({exc})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{origin}: not an Ed25519 public key; make one with `signpost keys generate`")
        keys[key_id(key)] = key
    return keys


def policy_from(signing_key: Path | None = None, public_keys: list[Path] | tuple[Path, ...] = (),
                allow_unsigned: bool = False) -> Policy:
    """The policy from the environment first, else these files (the config's ``security`` section)."""
    signer = None
    if text := os.environ.get(SIGNING_KEY_ENV, "").strip():
        signer = load_private_key(text.encode(), f"${SIGNING_KEY_ENV}")
    elif signing_key is not None:
        signer = load_private_key(_read_key_file(signing_key), str(signing_key))
    trusted: dict[str, Ed25519PublicKey] = {}
    if text := os.environ.get(PUBLIC_KEYS_ENV, "").strip():
        trusted = load_public_keys(text.encode(), f"${PUBLIC_KEYS_ENV}")
    else:
        for path in public_keys:
            trusted |= load_public_keys(_read_key_file(path), str(path))
    if signer is not None:  # a process that signs trusts its own key: artifacts handed between CI jobs are checked
        trusted[key_id(signer.public_key())] = signer.public_key()
    return Policy(signer, trusted, allow_unsigned)


def configure_from(security: SecurityConfig) -> Policy:
    """Set this process's policy from a config's ``security`` section (the environment first)."""
    return configure(policy_from(security.signing_key, security.public_keys, security.allow_unsigned))


def _read_key_file(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot read key file {path}: {exc.strerror or exc}") from None


_lock = threading.Lock()
_policy: Policy | None = None


def configure(policy: Policy) -> Policy:
    """Set this process's policy (the CLI and the server do, from the config) and say what it means."""
    global _policy
    with _lock:
        _policy = policy
    if policy.enforced and policy.allow_unsigned:
        log.warning("UNSIGNED ARTIFACTS ARE ALLOWED (--allow-unsigned): a model anyone could have written may be "
                    "loaded; for local experiments only")
    return policy


def current() -> Policy:
    """This process's policy: the configured one, else the environment's alone."""
    global _policy
    with _lock:
        if _policy is None:
            _policy = policy_from()
        return _policy


def sign(folder: Path, manifest_bytes: bytes) -> None:
    """Write ``manifest.sig`` for the manifest bytes just written, when this process has a signing key."""
    signer = current().signer
    if signer is None:
        return
    signature = base64.b64encode(signer.sign(manifest_bytes)).decode()
    record = {"algorithm": ALGORITHM, "key_id": key_id(signer.public_key()), "signature": signature}
    (Path(folder) / SIGNATURE).write_text(json.dumps(record) + "\n", encoding="utf-8")


def check(folder: Path, manifest_bytes: bytes) -> str | None:
    """Verify ``folder``'s signature over ``manifest_bytes`` under the current policy; returns the signing key's
    id, or None when the policy does not check (no trusted key) or allows this unsigned artifact."""
    policy = current()
    if not policy.enforced:
        return None
    path = Path(folder) / SIGNATURE
    if not path.is_file():
        if policy.allow_unsigned:
            log.warning("%s is UNSIGNED and loaded anyway (--allow-unsigned)", folder)
            return None
        raise SignatureError(f"{folder} is not signed (no {SIGNATURE}) and a public key is configured; sign it by "
                             f"making it with {SIGNING_KEY_ENV} set, or pass --allow-unsigned for a local experiment")
    try:
        if path.stat().st_size > _MAX_SIGNATURE_BYTES:
            raise ValueError("too large")
        record = json.loads(path.read_text(encoding="utf-8"))
        algorithm, kid, signature = record["algorithm"], record["key_id"], base64.b64decode(record["signature"],
                                                                                            validate=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"{path}: not a Signpost signature file ({exc})") from None
    if algorithm != ALGORITHM:
        raise SignatureError(f"{path}: algorithm {algorithm!r} is not {ALGORITHM}")
    key = policy.trusted.get(kid) if isinstance(kid, str) else None
    if key is None:
        raise SignatureError(f"{folder} is signed by key {kid!r}, which is not trusted here (trusted: "
                             f"{', '.join(sorted(policy.trusted))})")
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise SignatureError(f"{folder}: the signature does not match its manifest; the artifact was modified "
                             "after it was signed") from None
    return kid
