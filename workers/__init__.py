"""The job system and the producer side of sessionq.

Import-light on purpose: ``workers.producer`` and ``workers.mcp`` do not load the
Dramatiq broker. :mod:`workers.actors` imports the broker and every job module
(``dramatiq workers.actors`` / ``sessionq worker``).
"""
