"""The SQL backend: SQLite, PostgreSQL and MariaDB/MySQL through Peewee.

:class:`SqlStore` (``store.py``) is composed of the parts below, each on the
connection state and transaction helpers of ``database.py``:

* ``records.py`` — sessions and messages (saves, appends, imports, reads);
* ``kinds.py`` — files, transport sessions and agent state, one at a time and in bulk;
* ``fast_save.py`` — PostgreSQL's one-statement save of a batch's new sessions;
* ``copy.py`` — PostgreSQL's ``COPY`` of imported messages;
* ``schema.py`` — the Peewee models, built per database, and the schema migrations.
"""

from __future__ import annotations

from .database import open_database
from .store import SqlStore

__all__ = ["SqlStore", "open_database"]
