"""Encryption at rest: the one codec that seals and opens stored values.

With ``SESSIONQ_ENCRYPTION_KEYS`` set (a :class:`~sessionq.models.keyring.KeyRing`:
the first key seals, every key opens), each backend seals message content and
metadata, session metadata and agent state values where it turns records into rows,
and opens them where it turns rows back into records; nothing else sees a sealed value.
Ids, timestamps, status and sizes stay clear, so sweeps, paging and stats are unchanged.

A sealed value is text that describes itself::

    sqe1:<key id>:<base64 of nonce (12 bytes) + AES-256-GCM ciphertext and tag>

``sqe1`` is the format version; the key id is the key's non-secret
:func:`~sessionq.models.keyring.fingerprint`, in clear so that ``sessionq keys
status`` counts values per key without decrypting anything. The associated data is
the key id and the record's identity (its kind, ids and field name), so a value
copied to another row or field, or altered, does not open. JSON values (metadata,
agent state) are sealed as their compact JSON text and stored as a JSON string:
a plaintext row written before encryption was turned on is read as it is, so mixed
rows work during a rollout and a rotation.

A value that does not open is a :class:`~sessionq.errors.SealedValueError`: one
line naming the record and the key id, never garbage. Keys are derived once per
ring (HKDF, purpose :data:`PURPOSE`) and one AES-GCM object per key is reused.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sessionq.errors import SealedValueError, ValidationError

from .keyring import KeyRing

#: Format tag that starts every sealed value.
PREFIX = "sqe1:"
#: The HKDF purpose the at-rest keys are derived under.
PURPOSE = b"sessionq/at-rest/aes-256-gcm/v1"
#: The setting that holds the ring (named in errors).
SETTING = "SESSIONQ_ENCRYPTION_KEYS"
#: Length of a key id (a fingerprint: hex digits).
KID_LENGTH = 16
#: The key id counted for a value stored in clear.
PLAINTEXT = "plaintext"
_NONCE_BYTES = 12
_KID_END = len(PREFIX) + KID_LENGTH
_PREFIX_BYTES = PREFIX.encode()
_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def is_sealed(value: Any) -> bool:
    """True for a sealed value (text in the ``sqe1:`` format)."""
    return isinstance(value, str) and value.startswith(PREFIX)


def key_id(value: Any) -> str:
    """The key id a stored value is sealed under, or :data:`PLAINTEXT`; decrypts nothing."""
    return value[len(PREFIX):_KID_END] if is_sealed(value) else PLAINTEXT


def identity(*parts: str) -> str:
    """A record's identity as sealed values bind it: ``kind/id/.../field`` for messages."""
    return "\x00".join(parts)


class Sealer:
    """Seals and opens values under a key ring; without a ring it writes plaintext and
    opens nothing (a sealed value read then is an error naming its key id).

    ``repr`` shows key ids only.
    """

    def __init__(self, ring: KeyRing | None = None) -> None:
        derived = list(ring.derive(PURPOSE)) if ring is not None else []
        #: Key ids, primary first (empty when encryption is off).
        self.key_ids: list[str] = [kid for kid, _ in derived]
        self._aead = {kid: AESGCM(key) for kid, key in derived}
        self._primary = (derived[0][0], AESGCM(derived[0][1])) if derived else None

    @property
    def enabled(self) -> bool:
        """True when values are sealed on write."""
        return self._primary is not None

    @property
    def primary(self) -> str | None:
        """The key id new values are sealed under (``None`` when encryption is off)."""
        return self._primary[0] if self._primary else None

    def __repr__(self) -> str:
        return f"Sealer({', '.join(self.key_ids) or 'off'})"

    # -- sealing -----------------------------------------------------------------

    def seal(self, text: str, where: str) -> str:
        """``text`` sealed for the record field ``where`` (see :func:`identity`), or
        unchanged when encryption is off."""
        if self._primary is None:
            return text
        kid, aead = self._primary
        nonce = os.urandom(_NONCE_BYTES)
        sealed = aead.encrypt(nonce, text.encode(), f"{kid}\x00{where}".encode())
        return f"{PREFIX}{kid}:{base64.b64encode(nonce + sealed).decode()}"

    def seal_json(self, value: Any, where: str) -> Any:
        """A JSON value sealed as a string (unchanged when encryption is off)."""
        if self._primary is None:
            return value
        return self.seal(_json(value), where)

    # -- opening -----------------------------------------------------------------

    def open(self, value: str, where: str) -> str:
        """The text of a stored value: a sealed one opened, plaintext as it is.

        Raises :class:`~sessionq.errors.SealedValueError` (one line, the key id
        named) for a key not in the ring, or a value that was altered or moved."""
        if not value.startswith(PREFIX):
            return value
        kid = value[len(PREFIX):_KID_END]
        try:
            blob = base64.b64decode(value[_KID_END + 1:], validate=True)
        except (binascii.Error, ValueError):
            blob = b""
        return self._decrypt(kid, blob, where).decode()

    def _decrypt(self, kid: str, blob: bytes, where: str) -> bytes:
        aead = self._aead.get(kid)
        what = where.replace("\x00", " ")
        if aead is None:
            ring = f"the ring holds {', '.join(self.key_ids)}" if self.key_ids else f"{SETTING} is not set"
            raise SealedValueError(f"{what}: sealed under key {kid}, which is not in {SETTING} ({ring})")
        try:
            return aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], f"{kid}\x00{where}".encode())
        except (InvalidTag, ValueError):
            raise SealedValueError(
                f"{what}: the value sealed under key {kid} does not open (altered, or moved from another record)"
            ) from None

    def open_json(self, value: Any, where: str) -> Any:
        """A stored JSON value: a sealed string opened and parsed, anything else as it is."""
        if isinstance(value, str) and value.startswith(PREFIX):
            return json.loads(self.open(value, where))
        return value

    def seal_bytes(self, data: bytes, where: str) -> bytes:
        """``data`` sealed (``sqe1:<key id>:`` then nonce and ciphertext, raw: for
        binary stores such as Redis), or unchanged when encryption is off."""
        if self._primary is None:
            return data
        kid, aead = self._primary
        nonce = os.urandom(_NONCE_BYTES)
        return f"{PREFIX}{kid}:".encode() + nonce + aead.encrypt(nonce, data, f"{kid}\x00{where}".encode())

    def open_bytes(self, data: bytes, where: str) -> bytes:
        """The inverse of :meth:`seal_bytes` (other bytes as they are); errors as :meth:`open`."""
        if not data.startswith(_PREFIX_BYTES):
            return data
        return self._decrypt(data[len(PREFIX):_KID_END].decode(errors="replace"), data[_KID_END + 1:], where)

    def reseal(self, value: Any, where: str, *, is_json: bool) -> str | None:
        """``value`` (a stored text, or JSON if ``is_json``) sealed under the primary
        key: ``None`` when it already is, is absent (``None``) or encryption is off, so a rotation rewrites
        only what it must. A plaintext value is sealed too."""
        if self._primary is None or value is None or key_id(value) == self._primary[0]:
            return None
        if is_sealed(value):
            return self.seal(self.open(value, where), where)
        return self.seal(_json(value) if is_json else value, where)


#: The sealer of a store opened without a key ring: writes plaintext.
PLAIN = Sealer()


@functools.cache
def _cached(value: str) -> Sealer:
    return Sealer(KeyRing.parse(value, setting=SETTING))


def sealer_for(keys: str | Iterable[str] | None) -> Sealer:
    """The sealer of a ``SESSIONQ_ENCRYPTION_KEYS`` value (:data:`PLAIN` when unset),
    derived once per value."""
    if keys is None:
        return PLAIN
    value = keys if isinstance(keys, str) else ",".join(keys)
    return _cached(value) if value.strip() else PLAIN


#: The record fields sealed per bulk record kind (by plural name); each is a JSON value.
SEALED_KIND_FIELDS: dict[str, tuple[str, ...]] = {"agent_states": ("value",)}


def kind_identity(kind: Any, key: Iterable[str], name: str) -> str:
    """The identity a field of a bulk record kind is sealed for: kind, key, field."""
    return identity(kind.name, *key, name)


def seal_record(sealer: Sealer, kind: Any, record: Any) -> Any:
    """``record`` of ``kind`` (a :class:`~sessionq.models.kinds.RecordKind`) with its
    sealed fields (:data:`SEALED_KIND_FIELDS`) sealed, as the backend writes it."""
    fields = SEALED_KIND_FIELDS.get(kind.plural)
    if not fields or not sealer.enabled:
        return record
    key = kind.key(record)
    return record.replace(**{f: sealer.seal_json(getattr(record, f), kind_identity(kind, key, f)) for f in fields})


def open_record(sealer: Sealer, kind: Any, record: Any) -> Any:
    """The inverse of :func:`seal_record`: a stored record with its sealed fields opened."""
    fields = SEALED_KIND_FIELDS.get(kind.plural)
    if not fields:
        return record
    changes = {f: getattr(record, f) for f in fields if is_sealed(getattr(record, f))}
    if not changes:
        return record
    key = kind.key(record)
    return record.replace(**{f: sealer.open_json(v, kind_identity(kind, key, f)) for f, v in changes.items()})


#: The MCP task fields sealed (the tool's arguments, its result, input requests and
#: responses); each is stored as its compact JSON text, sealed as that text.
TASK_FIELDS = ("arguments", "result", "input_requests", "input_responses")


def seal_task_texts(sealer: Sealer, task_id: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (field -> stored JSON text) with the :data:`TASK_FIELDS` among them sealed."""
    if not sealer.enabled:
        return values
    return {name: sealer.seal(v, identity("task", task_id, name))
            if name in TASK_FIELDS and isinstance(v, str) and not is_sealed(v) else v
            for name, v in values.items()}


def open_task_texts(sealer: Sealer, task_id: str, values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`seal_task_texts`: the sealed task fields opened to their JSON text."""
    return {name: sealer.open(v, identity("task", task_id, name)) if name in TASK_FIELDS and is_sealed(v) else v
            for name, v in values.items()}


def seal_task_values(sealer: Sealer, task_id: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (field -> JSON value) with the :data:`TASK_FIELDS` among them sealed as
    their compact JSON text (a column that stores JSON text keeps a sealed value as it is)."""
    if not sealer.enabled:
        return values
    return {name: sealer.seal(_json(v), identity("task", task_id, name))
            if name in TASK_FIELDS and v is not None and not is_sealed(v) else v
            for name, v in values.items()}


def open_task_values(sealer: Sealer, task_id: str, values: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`seal_task_values`."""
    return {name: json.loads(sealer.open(v, identity("task", task_id, name)))
            if name in TASK_FIELDS and is_sealed(v) else v
            for name, v in values.items()}


@dataclass(frozen=True)
class SealedTable:
    """One table (collection) holding sealed values: its record kind as sealed values
    name it, its key fields and its sealed fields (``(name, is_json)``)."""

    name: str
    kind: str
    key_fields: tuple[str, ...]
    fields: tuple[tuple[str, bool], ...]

    def where(self, key: tuple[str, ...], name: str) -> str:
        """The identity the value of ``name`` in the row ``key`` is sealed for."""
        return identity(self.kind, *key, name)


#: Every table whose rows hold sealed values, in the order a rotation walks them.
SEALED_TABLES: tuple[SealedTable, ...] = (
    SealedTable("sessions", "session", ("session_id",), (("metadata", True),)),
    SealedTable("messages", "message", ("session_id", "message_id"), (("content", False), ("metadata", True))),
    SealedTable("agent_states", "agent_state", ("agent_id", "key"), (("value", True),)),
    SealedTable("tasks", "task", ("task_id",), tuple((name, False) for name in TASK_FIELDS)),
)
TABLES_BY_NAME = {t.name: t for t in SEALED_TABLES}


def table_named(name: str) -> SealedTable:
    """The sealed table called ``name``; :class:`ValidationError` otherwise."""
    try:
        return TABLES_BY_NAME[name]
    except (KeyError, TypeError):
        raise ValidationError(
            f"unknown sealed table {name!r:.40} (expected one of {', '.join(TABLES_BY_NAME)})") from None


#: The fields a sealed backup seals per JSON Lines record type: (identity kind, key
#: fields, [(field, is_json)]), the same identities as in the store.
ARCHIVE_FIELDS: dict[str, tuple[str, tuple[str, ...], tuple[tuple[str, bool], ...]]] = {
    "session": ("session", ("session_id",), (("metadata", True),)),
    "message": ("message", ("session_id", "message_id"), (("content", False), ("metadata", True))),
    "agent_state": ("agent_state", ("agent_id", "key"), (("value", True),)),
    "task": ("task", ("task_id",), tuple((name, True) for name in TASK_FIELDS)),
}


def seal_archive_record(sealer: Sealer, rtype: str, data: dict[str, Any]) -> dict[str, Any]:
    """A JSON Lines record (``Record.to_json`` of type ``rtype``) with its private
    fields sealed, for a backup that stays sealed; unchanged when encryption is off."""
    spec = ARCHIVE_FIELDS.get(rtype)
    if spec is None or not sealer.enabled:
        return data
    kind, keys, fields = spec
    ids = [str(data[k]) for k in keys]
    out = dict(data)
    for name, is_json in fields:
        value = out.get(name)
        if value is not None:
            where = identity(kind, *ids, name)
            out[name] = sealer.seal_json(value, where) if is_json else sealer.seal(value, where)
    return out


def open_archive_record(sealer: Sealer, rtype: str, data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`seal_archive_record` (a record in clear comes back as it is);
    a sealed field that does not open is a :class:`~sessionq.errors.SealedValueError`."""
    spec = ARCHIVE_FIELDS.get(rtype)
    if spec is None:
        return data
    kind, keys, fields = spec
    if not any(is_sealed(data.get(name)) for name, _ in fields):
        return data
    ids = [str(data.get(k)) for k in keys]
    out = dict(data)
    for name, is_json in fields:
        value = out.get(name)
        if isinstance(value, str) and value.startswith(PREFIX):
            where = identity(kind, *ids, name)
            out[name] = sealer.open_json(value, where) if is_json else sealer.open(value, where)
    return out
