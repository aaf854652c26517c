"""Config fields that are also command-line options: one declaration gives both.

A stage's config dataclass (in `sodtool.configs.<stage>`, a module that imports no torch) declares
each field with `option(default, help, ...)`. `sodtool.cli` builds the command's Typer options from
those fields (name, default, type and help), so a default is written once, in the dataclass, and
`sodtool --help` imports no torch. A field declared with plain `dataclasses.field` or a bare
default is not an option (internal, or a test hook).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from sodtool.errors import InputError

HELP = "sodtool.help"
FLAG = "sodtool.flag"
PARSE = "sodtool.parse"
CLI_TYPE = "sodtool.cli_type"
HIDDEN = "sodtool.hidden"
ARGUMENT = "sodtool.argument"
CLI_DEFAULT = "sodtool.cli_default"
REQUIRED = dataclasses.MISSING
SAME = object()  # cli_default: the field's default


def option(default: Any = REQUIRED, help: str = "", *, flag: Optional[str | tuple[str, ...]] = None,
           parse: Optional[Callable[[Any, str], Any]] = None, cli_type: Any = None, hidden: bool = False,
           argument: bool = False, cli_default: Any = SAME) -> Any:
    """A dataclass field with its command-line spelling.

    default: the field's default (omit for a required option); a list or tuple default is stored
      as a tuple (frozen configs).
    help: the option's help text.
    flag: the option's declaration when it is not `--field-name` (e.g. "--workers",
      "--hflip/--no-hflip"), or a tuple of its names (("--weights", "--detector-weights")); a bool
      field without one becomes `--name/--no-name`.
    parse: (command-line value, option name) -> field value, for values the command line spells
      differently (comma-separated integers, repeated paths); its input type is `cli_type`.
    cli_type: the option's type when it is not the field's annotation.
    hidden: kept out of --help (test hooks).
    argument: a positional argument instead of an option.
    cli_default: the option's default when it must differ from the field's: a field required by
      the stage but optional on a command line where another option or a subcommand can stand in
      for it (the stage then names the missing option).
    """
    if not help:
        raise ValueError("option() needs a help text")
    metadata = {HELP: help, FLAG: flag, PARSE: parse, CLI_TYPE: cli_type, HIDDEN: hidden, ARGUMENT: argument,
                CLI_DEFAULT: cli_default}
    if isinstance(default, list):
        default = tuple(default)
    return dataclasses.field(default=default, metadata=metadata)


def is_option(field: dataclasses.Field) -> bool:
    return HELP in field.metadata


def option_name(field: dataclasses.Field) -> str:
    """The option's first name as a user types it: "--workers" for field num_workers."""
    flag = field.metadata.get(FLAG)
    if isinstance(flag, tuple):
        flag = flag[0]
    return (flag.split("/")[0] if flag else "--" + field.name.replace("_", "-"))


def csv_ints(value: Optional[str], option: str) -> Optional[tuple[int, ...]]:
    """'16,32,64' -> (16, 32, 64); None or '' -> None."""
    if value is None or str(value).strip() == "":
        return None
    try:
        return tuple(int(v) for v in str(value).split(","))
    except ValueError:
        raise InputError(f"{option} takes comma-separated integers, got '{value}'") from None


def csv_ints_or_empty(value: Optional[str], option: str) -> tuple[int, ...]:
    """As csv_ints, with () for nothing given."""
    return csv_ints(value, option) or ()


def paths_tuple(value, option: str) -> tuple:
    """A repeatable path option (a list, or None when not given) -> a tuple."""
    return tuple(value or ())


def one_or_many(value, option: str):
    """A repeatable path option given once -> that path; several times -> a tuple of them."""
    value = list(value or ())
    return value[0] if len(value) == 1 else tuple(value)


def csv_text(value: Optional[tuple]) -> Optional[str]:
    """(16, 32, 64) -> '16,32,64': a tuple default as the command line spells it."""
    return None if value is None else ",".join(str(v) for v in value)
