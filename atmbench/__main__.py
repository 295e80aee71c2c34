"""``python -m atmbench`` is the ``atmbench`` command."""

from atmbench.cli import cli

cli()
