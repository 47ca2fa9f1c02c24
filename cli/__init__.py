"""The ``d2r`` command line: argument parsing and lazy subcommand dispatch."""
