"""``python -m cli``: the ``dlp`` command without its console script."""

from cli import main

main()
