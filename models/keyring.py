"""Key rings: an ordered list of operator secrets where the first seals and every one opens.

One shape serves every secret sessionq is given to protect data with (the MCP
request-state ring, the at-rest encryption ring): a setting holds a comma-separated
list; each entry is at least :data:`MIN_SECRET_BYTES` bytes of secret randomness
(``sessionq keys generate`` prints one). Rotation is the same three phases for every
ring, each fully rolled out before the next: ``OLD,NEW`` → ``NEW,OLD`` → ``NEW``.

A key never leaves this module in a message: errors name the setting and the
entry's position, and operators see a key only as its :meth:`KeyRing.fingerprints`.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sessionq.errors import ConfigError

#: The least a secret may hold, in bytes (the strength of the AES-256 keys derived from it).
MIN_SECRET_BYTES = 32
# Bytes of randomness in a generated key (43 URL-safe characters).
_GENERATED_BYTES = 32
_FINGERPRINT_LABEL = b"sessionq/key-fingerprint/v1:"


def generate_key() -> str:
    """A new secret for any ring: 32 random bytes, URL-safe text (no commas)."""
    return secrets.token_urlsafe(_GENERATED_BYTES)


def fingerprint(secret: bytes) -> str:
    """A short non-secret name for ``secret`` (16 hex digits), safe to log and show."""
    return hashlib.sha256(_FINGERPRINT_LABEL + secret).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class KeyRing:
    """An ordered, non-empty tuple of distinct secrets; ``secrets[0]`` seals, all open.

    ``repr`` shows fingerprints only, so a ring in a log line or traceback leaks nothing.
    """

    secrets: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.secrets:
            raise ConfigError("a key ring needs at least one key")

    @classmethod
    def parse(cls, value: str | Sequence[str], *, setting: str) -> KeyRing:
        """The ring a setting's value describes: a comma list (or a list) of secrets.

        Blank entries are ignored; an entry shorter than :data:`MIN_SECRET_BYTES`
        or a repeated entry is a :class:`~sessionq.errors.ConfigError` naming
        ``setting`` and the entry's position, never its value.
        """
        entries = value.split(",") if isinstance(value, str) else list(value)
        material = [entry.strip().encode() for entry in entries if entry.strip()]
        if not material:
            raise ConfigError(f"{setting}: no keys given (generate one with: sessionq keys generate)")
        seen: set[bytes] = set()
        for position, secret in enumerate(material, start=1):
            if len(secret) < MIN_SECRET_BYTES:
                raise ConfigError(
                    f"{setting}: key {position} is {len(secret)} bytes, keys must be at least "
                    f"{MIN_SECRET_BYTES} (generate one with: sessionq keys generate)"
                )
            if secret in seen:
                raise ConfigError(f"{setting}: key {position} repeats an earlier key")
            seen.add(secret)
        return cls(tuple(material))

    @property
    def primary(self) -> bytes:
        """The secret that seals new values."""
        return self.secrets[0]

    def fingerprints(self) -> list[str]:
        """Each secret's :func:`fingerprint`, in ring order (primary first)."""
        return [fingerprint(secret) for secret in self.secrets]

    def derive(self, purpose: bytes, length: int = 32) -> Iterator[tuple[str, bytes]]:
        """``(fingerprint, key)`` per secret, primary first: ``length`` bytes stretched
        with HKDF-SHA256 under ``purpose``, so one secret yields unrelated keys per use."""
        for secret in self.secrets:
            key = HKDF(algorithm=SHA256(), length=length, salt=None, info=purpose).derive(secret)
            yield fingerprint(secret), key

    def __repr__(self) -> str:
        return f"KeyRing({', '.join(self.fingerprints())})"

    def __len__(self) -> int:
        return len(self.secrets)
