"""``--config FILE`` and ``--print-config`` for any argparse command line.

A configuration file is TOML whose keys are the long option names without the dashes, exactly
as on the command line (``max-size = "10m"``, ``listen = ["127.0.0.1:2525"]``,
``auth-required = true``); a positional argument's key is its name (``target``). Each value
goes through the option's own ``type`` and ``choices``, so the file accepts what the command
line accepts and nothing else. File values become the parser's defaults, so the command line
overrides them; a repeatable option given on the command line replaces the file's list.

Everything is learnt from the parser's actions when it parses, so options added to a parser
later work in files and in ``--print-config`` without any change here.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import enum
import math
import sys
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import tomli_w

__all__ = ["add_config_options", "effective_argv", "parse_args", "render_config"]

#: A configuration file larger than this is refused unread (a plan is a few hundred bytes).
MAX_FILE_SIZE = 1 << 20

Kind = Literal["flag", "count", "value", "list", "positional"]


@dataclass(frozen=True)
class Option:
    """One parser action as a configuration key."""

    key: str
    action: argparse.Action
    kind: Kind


class FileError(Exception):
    """A configuration file that cannot be used; the message is one line for the user."""


def add_config_options(parser: argparse.ArgumentParser, *, secret_keys: Iterable[str] = ()) -> None:
    """Add ``--config FILE`` and ``--print-config`` to ``parser``, and a note to its epilog.

    ``secret_keys`` name options whose values ``--print-config`` never prints (passwords).
    """
    group = parser.add_argument_group("configuration file")
    group.add_argument(
        "--config",
        metavar="FILE",
        help="read options from this TOML file: keys are the long option names without "
        "dashes; options on the command line override the file's, and "
        "a repeatable option given on the command line replaces the file's list. Relative "
        "paths in the file are relative to the working directory, as on the command line",
    )
    group.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective options (defaults, then --config, then the command line) "
        "as a TOML file that --config accepts, and exit",
    )
    vars(parser)[_SECRET_KEYS] = frozenset(secret_keys)
    prog = parser.prog
    keys = "".join(
        f"\nThe {a.metavar or a.dest} argument is the key {a.dest}."
        for a in parser._actions
        if not a.option_strings
    )
    save = f"{prog} ... --print-config > saved.toml"
    run = f"{prog} --config saved.toml [OPTIONS]"
    width = max(len(save), len(run)) + 3
    note = (
        "configuration file: TOML, keys are the long option names without dashes, values "
        "as on the\ncommand line: strings or numbers, true/false for flags, [arrays] for "
        f"repeatable options.{keys}\n"
        f"  {save.ljust(width)}save the effective options\n"
        f"  {run.ljust(width)}run them; OPTIONS override the file\n"
    )
    # No %-formatting of this text: argparse formats epilogs holding %(prog)s.
    if parser.epilog and "%(prog)" in parser.epilog:
        note = note.replace("%", "%%")
    epilog = (parser.epilog or "").rstrip("\n")
    parser.epilog = f"{epilog}\n\n{note}" if epilog else note


#: The attribute of a parser that names its secret keys.
_SECRET_KEYS = "_mailstorm_secret_keys"

_OWN_KEYS = frozenset({"config", "print-config"})

#: The attribute of an action that keeps its default from before a file replaced it.
_BUILT_IN_DEFAULT = "_mailstorm_built_in_default"


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv`` over the values of its ``--config`` file; handle ``--print-config``.

    Exits with status 2 and one line on stderr for an unusable file, as for a bad option.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    # A first look for --config only; abbreviated as the parser allows (--conf).
    pre = argparse.ArgumentParser(
        prog=parser.prog, add_help=False, allow_abbrev=parser.allow_abbrev
    )
    pre.add_argument("--config")
    pre.error = lambda message: _exit(parser, message)  # type: ignore[method-assign]
    known, _ = pre.parse_known_args(args_list)
    path: str | None = known.config
    from_file: dict[str, Any] = {}
    if path is not None:
        try:
            from_file = apply_file(parser, path, read_file(path))
        except FileError as exc:
            _exit(parser, str(exc))
    args = parser.parse_args(args_list)
    if getattr(args, "config", None) != path:  # not one FILE for both looks: never ignore it
        _exit(parser, "give --config FILE in full, once, before any '--'")
    for option in options(parser):
        if option.key not in from_file:
            continue
        value: Any = getattr(args, option.action.dest)
        file_value = from_file[option.key]
        if option.kind == "list" and value is not file_value:
            # argparse appended the command line's items to the file's list: keep only theirs.
            setattr(args, option.action.dest, value[len(file_value):])
        elif option.kind == "count" and value != file_value:
            setattr(args, option.action.dest, value - file_value)
    if getattr(args, "print_config", False):
        sys.stdout.write(render_config(parser, args))
        parser.exit(0)
    return args


def _exit(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def read_file(path: str) -> dict[str, Any]:
    """The TOML table in ``path``; FileError names the file and what is wrong, in one line."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise FileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_SIZE:
        raise FileError(f"{path}: too large for a configuration file (over 1 MiB)")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise FileError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise FileError(f"{path}: bad TOML: {exc}") from None


def options(parser: argparse.ArgumentParser) -> list[Option]:
    """The parser's options that a configuration file may set, in the parser's order."""
    found = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(
            action, (argparse._HelpAction, argparse._VersionAction)
        ):
            continue
        kind = _kind(action)
        key = _key(action)
        if kind is None or key in _OWN_KEYS:
            continue
        found.append(Option(key, action, kind))
    return found


def _key(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.dest
    long_names = [s for s in action.option_strings if s.startswith("--")]
    return (long_names or action.option_strings)[0].lstrip("-")


def _kind(action: argparse.Action) -> Kind | None:
    if isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction)):
        return "flag"
    if isinstance(action, argparse._CountAction):
        return "count"
    if isinstance(action, argparse._AppendAction) and action.nargs is None:
        return "list"
    if isinstance(action, argparse._StoreAction):
        if not action.option_strings and action.nargs in (None, "?"):
            return "positional"  # "?" too: apply_file makes one it supplies optional
        if action.nargs is None:
            return "value"
    return None  # other actions (append_const, nargs='+', custom): command line only


def apply_file(
    parser: argparse.ArgumentParser, path: str, table: dict[str, Any]
) -> dict[str, Any]:
    """Make the file's values the parser's defaults; return them by key, as parsed."""
    known = {option.key: option for option in options(parser)}
    applied: dict[str, Any] = {}
    for key, raw in table.items():
        option = known.get(key)
        if option is None:
            raise FileError(f"{path}: key {key!r}: {_unknown(key, known, parser)}")
        try:
            value = _from_toml(option, raw)
        except ValueError as exc:
            raise FileError(f"{path}: key {key!r}: {exc}") from None
        action = option.action
        if option.kind == "positional":
            # argparse requires a positional unless it may be absent: the file supplies it.
            action.nargs = "?"
        action.required = False
        # --print-config's comments quote the parser's own default, not the file's.
        vars(action).setdefault(_BUILT_IN_DEFAULT, action.default)
        action.default = value
        applied[key] = value
    return applied


def _unknown(key: str, known: dict[str, Option], parser: argparse.ArgumentParser) -> str:
    if key in _OWN_KEYS or key in ("help", "h"):
        return "cannot be set in a configuration file"
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown option{hint}"


def _from_toml(option: Option, raw: Any) -> Any:
    """A TOML value as the option's parsed value; ValueError says what was expected."""
    action = option.action
    if option.kind == "flag":
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {_describe(raw)}")
        if isinstance(action, argparse.BooleanOptionalAction):
            return raw
        return action.const if raw else action.default
    if option.kind == "count":
        if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
            raise ValueError(f"expected a whole number of at least 0, got {_describe(raw)}")
        return raw
    if option.kind == "list":
        items = raw if isinstance(raw, list) else [raw]
        return [_convert(action, item, many=True) for item in items]
    return _convert(action, raw, many=False)


def _convert(action: argparse.Action, raw: Any, *, many: bool) -> Any:
    """One value through the option's type and choices, as its command-line text would go."""
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        what = (
            f"an array of {_metavar(action)} values (strings or numbers)"
            if many
            else f"a {_metavar(action)} value (a string or a number)"
        )
        raise ValueError(f"expected {what}, got {_describe(raw)}")
    text = raw if isinstance(raw, str) else repr(raw)
    convert: Callable[[str], Any] = action.type if callable(action.type) else str
    try:
        value = convert(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    except (TypeError, ValueError):
        name = getattr(convert, "__name__", "value")
        raise ValueError(f"invalid {name} value: {text!r}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(repr, action.choices))
        raise ValueError(f"invalid choice: {text!r} (choose from {choices})")
    return value


def _metavar(action: argparse.Action) -> str:
    metavar = action.metavar
    if isinstance(metavar, str):
        return metavar
    if action.choices is not None:
        return "{" + ",".join(map(str, action.choices)) + "}"
    return action.dest.upper()


def _describe(raw: Any) -> str:
    if isinstance(raw, list):
        return "an array"
    if isinstance(raw, dict):
        return "a table"
    if isinstance(raw, (bool, str, int, float)):
        return tomli_w.dumps({"v": raw}).partition("= ")[2].strip()
    return f"a {type(raw).__name__}"


# --- writing the effective configuration back -------------------------------------------


def render_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The effective options as a TOML file that ``--config`` reads back to the same values.

    Unset options and secrets are written commented out, with why.
    """
    secrets: frozenset[str] = vars(parser).get(_SECRET_KEYS, frozenset())
    titles = _group_titles(parser)
    lines = [
        f"# {parser.prog}: options as a configuration file (written by --print-config).",
        f"# Run with: {parser.prog} --config FILE; options on the command line override it.",
    ]
    title = None
    for option in options(parser):
        group = titles.get(id(option.action))
        if group != title and group is not None:
            title = group
            lines += ["", f"# == {group} =="]
        summary = _summary(parser, option.action)
        if summary:
            lines.append(f"# {summary}")
        value = getattr(args, option.action.dest, None)
        if option.key in secrets and value is not None:
            lines.append(f"# {option.key} = (not printed: it holds a secret; write it here)")
            continue
        toml_value = to_toml(option, value)
        if value is None:
            lines.append(f"# {option.key} = (not set)")
        elif toml_value is None:
            lines.append(f"# {option.key} = (no text form: give it on the command line)")
        else:
            lines.append(tomli_w.dumps({option.key: toml_value}).rstrip("\n"))
    return "\n".join(lines) + "\n"


def _group_titles(parser: argparse.ArgumentParser) -> dict[int, str]:
    titles: dict[int, str] = {}
    for group in parser._action_groups:
        for action in group._group_actions:
            if group.title:
                titles[id(action)] = group.title
    return titles


def _summary(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help, %-expanded as --help shows it, cut to its first clause."""
    text = action.help or ""
    with contextlib.suppress(KeyError, TypeError, ValueError):
        text = text % {
            **vars(action),
            "default": vars(action).get(_BUILT_IN_DEFAULT, action.default),
            "prog": parser.prog,
        }
    text = " ".join(text.split())
    return text if len(text) <= 96 else text[:93].rsplit(" ", 1)[0] + " ..."


def to_toml(option: Option, value: Any) -> Any:
    """``value`` as a TOML value that reads back to it, or None when it cannot be written."""
    if value is None:
        return None
    action = option.action
    if option.kind == "flag":
        if isinstance(action, argparse.BooleanOptionalAction):
            return bool(value)
        return value == action.const
    if option.kind == "count":
        return int(value)
    if option.kind == "list":
        items = [_text_form(action, item) for item in value]
        return None if any(item is None for item in items) else items
    return _text_form(action, value)


def _text_form(action: argparse.Action, value: Any, *, again: bool = True) -> Any:
    """The first of the likely command-line forms of ``value`` that converts back to it."""
    for candidate in _candidates(value):
        try:
            converted = _convert(action, candidate, many=False)
        except ValueError:
            continue
        if converted == value:
            if again and type(converted) is not type(value):
                # A default of another type than the option parses to (256.0 for an int):
                # write the parsed value's form, so that a second round prints the same.
                return _text_form(action, converted, again=False)
            return candidate
    return None


def _candidates(value: Any) -> Iterable[Any]:
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool):
        yield str(value).lower()
        return
    if isinstance(value, (str, int)):
        yield value
    elif isinstance(value, float) and math.isfinite(value):
        yield value
        yield format(value, "g")
    if isinstance(value, (tuple, list)):
        parts = [format(v, "g") if isinstance(v, float) else str(v) for v in value]
        yield ":".join(parts)
        yield ",".join(parts)
    yield str(value)


def effective_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The effective options as command-line arguments (``--key=value``), for a child
    process that must see what this one was configured with, whatever the source."""
    argv: list[str] = []
    positionals: list[str] = []
    for option in options(parser):
        parsed = getattr(args, option.action.dest, None)
        value = to_toml(option, parsed)
        if value is None:
            if parsed is not None:
                # A programming error (an option type without a text form), not bad input:
                # losing the setting in a child process would be worse than stopping.
                raise RuntimeError(f"--{option.key}: no command-line form of {parsed!r}")
            continue
        flag = f"--{option.key}"
        if option.kind == "flag":
            if isinstance(option.action, argparse.BooleanOptionalAction):
                argv.append(flag if value else f"--no-{option.key}")
            elif value:
                argv.append(flag)
        elif option.kind == "count":
            argv += [flag] * value
        elif option.kind == "list":
            argv += [f"{flag}={_argv_text(item)}" for item in value]
        elif option.kind == "positional":
            positionals.append(_argv_text(value))
        else:
            argv.append(f"{flag}={_argv_text(value)}")
    return argv + (["--", *positionals] if positionals else [])


def _argv_text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)
