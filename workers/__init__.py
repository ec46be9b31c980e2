"""The job system and the producer side of sessionq.

Import-light on purpose: ``sessionq.workers.producer`` and ``sessionq.workers.mcp`` do not load the
Dramatiq broker. :mod:`sessionq.workers.actors` imports the broker and every job module
(``dramatiq sessionq.workers.actors`` / ``sessionq worker``).
"""
