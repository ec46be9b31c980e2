"""A streaming reader for big JSON documents: the members of the top-level object,
with chosen arrays yielded one element at a time, so that memory holds one element
(one session with its messages, one file record, ...) whatever the file's size.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from typing import IO, Any

from .errors import ValidationError

# Characters read at a time.
DEFAULT_READ_CHUNK = 1 << 16


def iter_members(
    fp: IO[str], streamed: Collection[str], *, chunk: int = DEFAULT_READ_CHUNK
) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, value)`` for the members of the top-level JSON object in file
    order, except that a member named in ``streamed`` must be an array and yields
    ``(key, element)`` once per element instead. Malformed JSON raises
    :class:`~sessionq.models.errors.ValidationError`."""
    reader = _JsonReader(fp, chunk)
    reader.expect("{")
    if reader.take("}"):
        return
    while True:
        key = reader.value()
        if not isinstance(key, str):
            raise ValidationError("malformed JSON: an object key must be a string")
        reader.expect(":")
        if key in streamed:
            reader.expect("[")
            if not reader.take("]"):
                while True:
                    yield key, reader.value()
                    if reader.take("]"):
                        break
                    reader.expect(",")
        else:
            yield key, reader.value()
        if reader.take("}"):
            return
        reader.expect(",")


class _JsonReader:
    """Just enough of a streaming JSON tokenizer for :func:`iter_members`."""

    def __init__(self, fp: IO[str], chunk: int) -> None:
        self.fp, self.chunk = fp, chunk
        self.buf, self.pos, self.eof = "", 0, False
        self.decoder = json.JSONDecoder()

    def _fill(self, size: int) -> bool:
        if self.eof:
            return False
        data = self.fp.read(size)
        if not data:
            self.eof = True
            return False
        self.buf = self.buf[self.pos :] + data
        self.pos = 0
        return True

    def _skip(self) -> None:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self._fill(self.chunk):
                return

    def take(self, char: str) -> bool:
        self._skip()
        if self.pos < len(self.buf) and self.buf[self.pos] == char:
            self.pos += 1
            return True
        return False

    def expect(self, char: str) -> None:
        if not self.take(char):
            found = self.buf[self.pos : self.pos + 20] if self.pos < len(self.buf) else "end of file"
            raise ValidationError(f"malformed JSON: expected {char!r}, found {found!r}")

    def value(self) -> Any:
        self._skip()
        size = self.chunk
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return value
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise ValidationError(f"malformed JSON: {exc.msg}") from None
            # The value may continue past the buffer (a number cut in two, a long object).
            if not self._fill(size):
                continue
            size *= 2
