"""Command-line flags built from a job's `Config` dataclass, with a TOML overlay.

A job states its settings once, in a frozen `Config`; this module adapts it to the
command line, so defaults, types and documentation are written in one place:

* each field becomes `--field-name` (or a positional, or another name: `Flags`);
* its help is the field's entry in the `Attributes:` section of the class docstring,
  followed by the default;
* its type gives the parser: `int`, `float`, `str`, `bool` (`--flag`, or `--flag/--no-flag`
  when the default is true), enums and `Literal`s (their names are the choices),
  `X | None`, and `tuple[X, ...]` (comma-separated, or `START:STOP:NUM` evenly spaced);
* `--config FILE` reads a TOML file whose keys are the flags' names with underscores
  (`num_prompts = 8`, lists for tuple fields); flags given on the command line override
  it, and an unknown key is an error naming it.

Validation stays in `Config.__post_init__`; `config_from_args` rewords its messages to
name flags (`--num-prompts`) rather than fields (`num_prompts`). A job then reads

    def add_arguments(parser):
        cli_config.add_arguments(parser, Config, Flags(positional=("run_dir",)))

    def main(args):
        result = run(cli_config.config_from_args(Config, args))
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import inspect
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "CONFIG_KEY",
    "Flags",
    "add_arguments",
    "add_output_flags",
    "config_from_args",
    "field_docs",
    "flag_message",
    "load_toml",
    "parse_values",
]

# The Namespace attribute that holds the flags of every Config a parser was built from.
CONFIG_KEY = "_config_flags"
# A tuple default longer than this is shown as START:STOP:NUM when evenly spaced.
_SHORT_TUPLE = 4


@dataclasses.dataclass(frozen=True)
class Flags:
    """How a `Config`'s fields meet the command line, where the default rule does not fit.

    Attributes:
        positional: fields given as positional arguments, in this order.
        names: field -> flag name without dashes (e.g. `{"run_dir": "run"}` for `--run`).
        hidden: fields that get no flag (set by the job itself, or nested configs).
        required: fields whose flag must be given.
        help: field -> help text replacing the docstring's.
    """

    positional: tuple[str, ...] = ()
    names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    hidden: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    help: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Field:
    """One field on the command line: its flag and how its text and TOML values parse."""

    name: str
    flag: str  # "--num-prompts", or "RUN_DIR" for a positional
    parse_text: Callable[[str], Any]
    coerce: Callable[[Any], Any]  # a TOML value (list, number, string, bool) to the field's

    @property
    def key(self) -> str:
        """The field's key in a TOML file: its flag's name with underscores."""
        return self.flag.lstrip("-").lower().replace("-", "_")


# ----------------------------------------------------------------------- docs


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the `Attributes:` section of `cls`'s docstring.

    An entry `a, b: text` documents both fields; continuation lines are joined.
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    docs: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:")
    except StopIteration:
        return docs
    indent, names = None, []
    for line in lines[start + 1 :]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            break
        indent = depth if indent is None else indent
        head = re.match(r"\s*([\w, ]+):\s(.*)", line) if depth == indent else None
        if head:
            names = [n.strip() for n in head.group(1).split(",")]
            for n in names:
                docs[n] = head.group(2).strip()
        else:
            for n in names:
                docs[n] += " " + line.strip()
    return docs


# ----------------------------------------------------------------------- parsers


def parse_values(text: str) -> list[float]:
    """`"0,0.1,0.5"` as a list, or `"START:STOP:NUM"` as `NUM` evenly spaced values.

    Raises:
        argparse.ArgumentTypeError: naming the text and the two accepted forms.
    """
    text = text.strip()
    try:
        if text.count(":") == 2:
            start, stop, num = text.split(":")
            count = int(num)
            if count < 1:
                raise ValueError
            step = (float(stop) - float(start)) / max(count - 1, 1)
            return [round(float(start) + i * step, 12) for i in range(count)]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of numbers: give comma-separated values (0,0.1,0.5) "
            "or START:STOP:NUM (0:1:41)"
        ) from None


def _member_name(member: enum.Enum) -> str:
    """The command-line name of an enum member: its string value, or its value's name."""
    value = member.value
    if isinstance(value, str):
        return value
    return getattr(value, "name", member.name.lower())


def _enum_parser(cls: type[enum.Enum]) -> Callable[[Any], enum.Enum]:
    def parse(text: Any) -> enum.Enum:
        if isinstance(text, cls):
            return text
        if hasattr(cls, "from_name"):  # its own message names what it parses
            try:
                return cls.from_name(text)
            except ValueError as err:
                raise argparse.ArgumentTypeError(str(err)) from None
        for member in cls:
            if text in (_member_name(member), member.name.lower()):
                return member
        names = ", ".join(_member_name(m) for m in cls)
        raise argparse.ArgumentTypeError(f"unknown value {text!r}; use one of: {names}")

    return parse


def _literal_parser(values: tuple) -> Callable[[Any], Any]:
    def parse(text: Any) -> Any:
        for value in values:
            if text == value or str(text) == str(value):
                return value
        names = ", ".join(str(v) for v in values)
        raise argparse.ArgumentTypeError(f"unknown value {text!r}; use one of: {names}")

    return parse


def _scalar_parser(kind: Any) -> tuple[Callable[[Any], Any], list[str] | None]:
    """A parser of one value of type `kind`, and its choices (None: any)."""
    if kind is bool:
        return _parse_bool, ["true", "false"]
    if kind in (int, float):
        def number(text: Any) -> Any:
            if isinstance(text, bool):
                raise argparse.ArgumentTypeError(f"{text!r} is not a number")
            try:
                value = kind(text)
            except (TypeError, ValueError):
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not {'an integer' if kind is int else 'a number'}"
                ) from None
            if kind is int and isinstance(text, float) and value != text:
                raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
            return value

        return number, None
    if kind is str:
        def string(text: Any) -> str:
            if not isinstance(text, str):
                raise argparse.ArgumentTypeError(f"{text!r} is not a string")
            return text

        return string, None
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return _enum_parser(kind), [_member_name(m) for m in kind]
    if typing.get_origin(kind) is typing.Literal:
        values = typing.get_args(kind)
        return _literal_parser(values), [str(v) for v in values]
    raise TypeError(f"no command-line parser for type {kind!r}")


def _parse_bool(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("true", "1", "yes"):
        return True
    if str(text).lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _split_optional(kind: Any) -> tuple[Any, bool]:
    """`(X, True)` for `X | None`, else `(kind, False)`."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0], True
    return kind, False


def _tuple_item(kind: Any) -> Any | None:
    """`X` for `tuple[X, ...]`, else None."""
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
    return None


# ----------------------------------------------------------------------- display


def _show(value: Any) -> str:
    """A default as a user would type it."""
    if isinstance(value, enum.Enum):
        return _member_name(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        if not value:
            return "none"
        if len(value) > _SHORT_TUPLE and all(isinstance(v, int | float) for v in value):
            steps = {round(b - a, 9) for a, b in zip(value, value[1:], strict=False)}
            if len(steps) == 1:
                return f"{_show(value[0])}:{_show(value[-1])}:{len(value)}"
        return ",".join(_show(v) for v in value)
    return str(value)


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


# ----------------------------------------------------------------------- the adapter


def add_arguments(
    parser: argparse.ArgumentParser, cls: type, flags: Flags = Flags(), toml: bool = True
) -> None:
    """Adds one argument per field of the dataclass `cls` to `parser` (and `--config`).

    Flags not given on the command line are absent from the parsed namespace, so that
    `config_from_args` can tell them from a TOML file's values and the defaults.

    Raises:
        TypeError: for a field whose type has no parser and is not in `flags.hidden`.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    registry: dict[str, _Field] = dict(parser.get_default(CONFIG_KEY) or {})
    unknown = set(flags.positional) | set(flags.names) | set(flags.hidden) | set(flags.required)
    unknown -= {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"Flags of {cls.__name__} name fields it does not have: {sorted(unknown)}")
    for field in dataclasses.fields(cls):
        if field.name in flags.hidden or not field.init:
            continue
        kind, optional = _split_optional(hints[field.name])
        item = _tuple_item(kind)
        parse_one, choices = _scalar_parser(item if item is not None else kind)
        default = _default(field)
        help_text = flags.help.get(field.name, docs.get(field.name, "")).replace("`", "")
        if default is not dataclasses.MISSING and default is not None and (
            "default" not in help_text
        ):
            help_text = f"{help_text.rstrip('.')} (default: {_show(default)})".lstrip()
        name = flags.names.get(field.name, field.name).replace("_", "-")
        kwargs: dict[str, Any] = {"help": help_text or None, "default": argparse.SUPPRESS}
        if item is not None:
            parse_text = _list_parser(item, parse_one)
            kwargs["metavar"] = "{" + ",".join(choices) + "},..." if choices else "LIST"
        else:
            parse_text = parse_one
            if choices:
                kwargs["metavar"] = "{" + ",".join(choices) + "}"
        if field.name in flags.positional:
            flag = name.upper().replace("-", "_")
            parser.add_argument(field.name, type=parse_text, metavar=flag, help=kwargs["help"])
        elif kind is bool and item is None:
            flag = "--" + name
            action = argparse.BooleanOptionalAction if default is True else "store_true"
            parser.add_argument(flag, dest=field.name, action=action,
                                default=argparse.SUPPRESS, help=kwargs["help"])
        else:
            flag = "--" + name
            parser.add_argument(flag, dest=field.name, type=parse_text,
                                required=field.name in flags.required, **kwargs)
        registry[field.name] = _Field(field.name, flag, parse_text,
                                      _coercer(item, parse_one, optional))
    parser.set_defaults(**{CONFIG_KEY: registry})
    if toml and not any(a.dest == "config_file" for a in parser._actions):
        parser.add_argument(
            "--config", dest="config_file", metavar="FILE",
            help="TOML file of settings (keys: the flags' names with underscores); flags "
            "given here override it",
        )


def _list_parser(item: Any, parse_one: Callable[[Any], Any]) -> Callable[[str], tuple]:
    numeric = item in (int, float)

    def parse(text: str) -> tuple:
        if numeric:
            return tuple(parse_one(v) for v in parse_values(text))
        return tuple(parse_one(v.strip()) for v in text.split(",") if v.strip())

    return parse


def _coercer(item: Any, parse_one: Callable[[Any], Any], optional: bool) -> Callable:
    """A converter of a TOML value to the field's type (a list for a tuple field)."""

    def coerce(value: Any) -> Any:
        if item is not None:
            values = value if isinstance(value, list) else [value]
            return tuple(parse_one(v) for v in values)
        return parse_one(value)

    return coerce


def load_toml(path: str) -> dict[str, Any]:
    """The mapping a TOML settings file holds.

    Raises:
        ValueError: naming the file, if it is missing or not valid TOML.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"--config {path!r}: no such file") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path!r} is not valid TOML: {err}") from None


def config_from_args(cls: type, args: argparse.Namespace, **fixed: Any) -> Any:
    """The `cls` instance that the parsed flags, over the `--config` file, describe.

    Precedence: `fixed` (set by the job), then flags given on the command line, then the
    TOML file's keys, then the dataclass defaults.

    Raises:
        ValueError: naming the flag of a bad value, or an unknown TOML key and the valid ones.
    """
    registry: dict[str, _Field] = getattr(args, CONFIG_KEY, {})
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    path = getattr(args, "config_file", None)
    if path:
        mapping = load_toml(path)
        by_key = {field.key: field for field in registry.values()}
        unknown = [k for k in mapping if k not in by_key]
        if unknown:
            raise ValueError(
                f"--config {path!r}: unknown key(s) {', '.join(map(repr, unknown))}; valid "
                f"keys: {', '.join(by_key)}"
            )
        for key, value in mapping.items():
            field = by_key[key]
            if field.name not in names:
                continue
            try:
                values[field.name] = field.coerce(value)
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"--config {path!r}: key {key!r}: {err}") from None
    values.update({k: v for k, v in vars(args).items() if k in names and k in registry})
    values.update(fixed)
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(flag_message(str(err), registry)) from None


def flag_message(message: str, registry: Mapping[str, _Field]) -> str:
    """`message` with field names (`num_prompts`, `Config.num_prompts`) as their flags.

    A name with an underscore, or one whose flag differs from it, is replaced wherever it
    stands; a single word (`pair`, `risk`) only where it is the subject of a check
    (`risk must ...`, `risk=...`), since elsewhere it is an ordinary word.
    """
    for name, field in registry.items():
        tail = r"\b" if "_" in name or field.flag.lstrip("-").replace("-", "_") != name else (
            r"(?=\s+must\b|=)"
        )
        message = re.sub(rf"(?<![\w-])(Config\.)?{name}{tail}", field.flag, message)
    return message


def add_output_flags(parser: argparse.ArgumentParser, quiet: bool = False) -> None:
    """Adds `--json` (one strict JSON object on stdout) and, for long jobs, `--quiet`."""
    parser.add_argument("--json", action="store_true",
                        help="print the result as one JSON object (undefined values: null)")
    if quiet:
        parser.add_argument("--quiet", action="store_true",
                            help="no progress bar or progress lines")
