"""``python -m nexus`` is the ``nexus`` command."""

from nexus.cli import main

main()
