"""The subcommands of ``main.py``, one module per group of related commands, each imported on first use.

``main.py`` lists them in a :class:`commands.lazy_group.LazyGroup`, so that a command (or ``--help``) imports only
what it needs (``search-bit-policy`` runs without torch).
"""
