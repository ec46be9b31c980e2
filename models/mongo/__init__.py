"""The MongoDB backend, on standard PyMongo calls only (a real ``mongod`` or SecantusDB).

:class:`MongoStore` (``store.py``) is composed of the parts below, each on the
client and collections of ``database.py``:

* ``records.py`` — sessions and messages (saves, appends, imports, reads);
* ``kinds.py`` — files, transport sessions and agent state, one at a time and in bulk;
* ``schema.py`` — collection names, document shapes, indexes and schema versions.
"""

from __future__ import annotations

from .store import MongoStore

__all__ = ["MongoStore"]
