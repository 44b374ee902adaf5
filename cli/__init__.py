"""The ``dlp`` command (the outermost layer: cli -> flows -> tasks -> pipeline, dlp).

- :mod:`cli.library`           -- ``ratios``, ``prune``, ``ppl``, ``eval``: direct calls into dlp/
- :mod:`cli.pipeline_commands` -- ``compress``, ``sweep``: the Prefect flows
- :mod:`cli.ops_commands`      -- ``deploy``, ``watch``, ``promote``, ``models``, ``report``
- :mod:`cli.quant_commands`    -- ``quantize``, ``pack``, ``materialize``: deployable and compact outputs
- :mod:`cli.prefect_server`    -- the temporary Prefect API a pipeline command starts when none is configured

prefect, mlflow and torch are imported inside the commands, so ``dlp --help`` stays fast.
"""
from __future__ import annotations

import sys

import typer

from cli import ops_commands, pipeline_commands, quant_commands
from cli.library import app
from dlp.errors import DLPError

pipeline_commands.register(app)
ops_commands.register(app)
quant_commands.register(app)

__all__ = ["app", "main"]


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input -> one line on stderr and exit status 2, no traceback."""
    try:
        app(args=argv, standalone_mode=True)
    except DLPError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
