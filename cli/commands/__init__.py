"""Subcommands of ``d2r``; each module has ``add_arguments`` and ``run``."""
