"""The command line the top-level scripts share (argument parsing lives only at the top level, never under models/,
datasets/ or helpers/): ``--config FILE``, ``--print-config`` and dotted overrides, checked against the script's
:class:`~helpers.config.Schema` before anything heavy is imported; one-line errors; logging setup.

Torch-free: a script calls :func:`config_from_args` first and imports torch only once its config is known good.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common.errors import ProjectError, one_line
from helpers.config import Schema, dump_config, load_config

log = logging.getLogger(__name__)


def config_arg_parser(*, description: str, schema: Schema, default_config: str | os.PathLike | None,
                      example: str) -> argparse.ArgumentParser:
    """``SCRIPT [--config FILE] [--print-config] [key.sub=value ...]``; its help says where the keys are."""
    sections = ", ".join(k for k, v in schema.defaults.items() if isinstance(v, Mapping))
    epilog = (f"Config keys: the defaults of {schema.name} live in helpers/schemas.py (sections: {sections}); "
              f"an experiment YAML overrides some of them, dotted overrides override both "
              f"(e.g. {example}). --print-config prints every key with its resolved value.")
    parser = argparse.ArgumentParser(description=description, epilog=epilog)
    default = f" (default: {default_config})" if default_config else ""
    parser.add_argument("--config", default=None, help=f"experiment YAML{default}")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (defaults <- YAML <- overrides) and exit")
    parser.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {example}")
    return parser


def config_from_args(args: argparse.Namespace, schema: Schema, default_config: str | os.PathLike | None
                     ) -> dict[str, Any] | int:
    """The checked config, or an exit code: 0 after ``--print-config``, 2 after a config error (printed on
    stderr as one line, no traceback)."""
    try:
        cfg = load_config(args.config or default_config, args.overrides, schema=schema)
    except ProjectError as exc:
        print(f"{schema.name}: config error: {one_line(exc)}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(dump_config(cfg))
        return 0
    return cfg


def setup_logging(main: bool = True) -> None:
    """INFO on the main process, WARNING on the others, on stdout."""
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_reporting_errors(fn: Callable[[], int], *, name: str) -> int:
    """``fn()``, with the project's errors (:class:`common.errors.ProjectError`, every error it raises on purpose)
    printed as one ``name: error: ...`` line (exit code 2; :func:`common.errors.one_line`: at most 2,000
    characters, whatever the message holds); anything else is a bug and keeps its traceback."""
    try:
        return fn()
    except ProjectError as exc:
        print(f"{name}: error: {one_line(exc)}", file=sys.stderr)
        return 2


def repo_path(script: str, *parts: str) -> Path:
    """A path inside the repository, from a top-level script's ``__file__``."""
    return Path(script).resolve().parent.joinpath(*parts)


def training_arg_parser(*, description: str, schema: Schema, default_config: str | os.PathLike,
                        example: str) -> argparse.ArgumentParser:
    """A training script's command line: config options plus --resume / --overwrite (exclusive), --no-progress."""
    parser = config_arg_parser(description=description, schema=schema, default_config=default_config,
                               example=example)
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue from <run.out_dir>/train_state.pth")
    run.add_argument("--overwrite", action="store_true",
                     help="delete the run already in run.out_dir (its own files only) and start over")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def training_main(train: Callable[..., Any], parser: argparse.ArgumentParser, *, schema: Schema,
                  default_config: str | os.PathLike, argv: Sequence[str] | None = None) -> int:
    """Parse, check the config (torch-free), then ``train(cfg=, resume=, overwrite=, progress=)``, with the
    training errors printed as one line (exit code 2)."""
    args = parser.parse_args(argv)
    cfg = config_from_args(args, schema, default_config)
    if isinstance(cfg, int):
        return cfg
    setup_logging()

    def run() -> int:
        train(cfg=cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        return 0

    return run_reporting_errors(run, name=schema.name)
