"""Configuration: one dataclass per stage, loadable from YAML, every field overridable on the command line.

Precedence, lowest first: the dataclass defaults, the YAML file (``--config``), the command-line options.
A YAML file may hold a single stage's fields, or a whole pipeline with one section per stage
(``data:``, ``sft:`` ...); :func:`load_config` picks the stage's section when it is there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import click
import yaml

from stackrlhf.errors import StackRLHFError

C = TypeVar("C")


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_kind(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) of a dataclass field annotation."""
    tp = _unwrap_optional(tp)
    if typing.get_origin(tp) in (list, tuple):
        inner = typing.get_args(tp)[0] if typing.get_args(tp) else str
        return _unwrap_optional(inner), True
    return tp, False


DTYPE_CHOICES = ("auto", "float32", "bfloat16")  # training dtypes: auto is bf16 autocast on a capable GPU
REPORT_TO_CHOICES = ("tensorboard", "wandb", "both", "none")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")  # transformers' SchedulerType names


def shown_default(value: Any) -> str:
    """How ``--help`` shows a default, the same way everywhere: ``[default: 0.7]``, ``[default: length, time]``,
    ``[default: on]``; nothing when there is none (an empty string, list or None)."""
    if value is None or value == "" or value == [] or value == ():
        return ""
    if isinstance(value, bool):
        return f"[default: {'on' if value else 'off'}]"
    if isinstance(value, (list, tuple)):
        return f"[default: {', '.join(map(str, value))}]"
    return f"[default: {value}]"


def config_options(cls: type) -> typing.Callable:
    """Decorate a click command with ``--config FILE`` and one option per field of the dataclass ``cls``.

    Options default to ``None`` (or an empty tuple for lists) so that "not given on the command line"
    can be told apart from "given", and a YAML value is only overridden by an explicit option.
    """
    hints = typing.get_type_hints(cls)

    def decorate(func: typing.Callable) -> typing.Callable:
        for f in reversed(dataclasses.fields(cls)):
            if f.metadata.get("cli") is False:
                continue
            scalar, is_list = _field_kind(hints[f.name])
            name = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
            help_text = " ".join(filter(None, (f.metadata.get("help", ""), shown_default(default))))
            ctype: Any = None
            if not (scalar is bool and not is_list):
                ctype = {int: int, float: float, str: str}.get(scalar, str)
                if f.metadata.get("choices"):
                    ctype = click.Choice(list(f.metadata["choices"]))
            for flag, dest, shown in [(name, f.name, True)] + [
                    ("--" + old.replace("_", "-"), old, False) for old in f.metadata.get("aliases", ())]:
                # an old spelling (``aliases``) is still accepted, hidden from --help, with a warning
                if ctype is None:
                    opt = click.option(f"{flag}/--no-{flag[2:]}", dest, default=None, hidden=not shown,
                                       help=help_text if shown else None)
                else:
                    opt = click.option(flag, dest, type=ctype, default=None, multiple=is_list, hidden=not shown,
                                       help=help_text if shown else None)
                func = opt(func)
        return click.option(
            "--config", "config_file", type=click.Path(dir_okay=False), default=None,
            help="YAML file with the settings (a stage's fields, or a pipeline file with a section per stage).",
        )(func)

    return decorate


def field_aliases(cls: type) -> dict[str, str]:
    """Old names of settings that still work, {old: new}, from each field's ``aliases`` metadata."""
    return {old: f.name for f in dataclasses.fields(cls) for old in f.metadata.get("aliases", ())}  # type: ignore


def rename_aliases(cls: type, values: dict, where: str) -> dict:
    """``values`` with each old setting name replaced by the current one, and a warning on stderr that says which
    name to use; both names at once is refused."""
    out = dict(values)
    for old, new in field_aliases(cls).items():
        if old not in out:
            continue
        value = out.pop(old)
        if value is None or (isinstance(value, tuple) and not value):
            continue  # a hidden CLI alias that was not given
        if out.get(new) not in (None, (), ""):
            raise StackRLHFError(f"{where}: {new} is given twice, also under its old name {old}; keep {new}")
        from stackrlhf.console import warn

        warn(f"{where}: `{old}` (--{old.replace('_', '-')}) is the old name of `{new}` (--{new.replace('_', '-')}); "
             "use that")
        out[new] = value
    return out


def load_config(cls: type[C], config_file: str | os.PathLike | None = None, section: str | None = None,
                **overrides: Any) -> C:
    """Build a ``cls`` from defaults, then ``config_file``, then ``overrides`` that are not None / empty."""
    values: dict[str, Any] = {}
    overrides = rename_aliases(cls, overrides, "command line")
    if config_file is not None:
        path = Path(config_file)
        data = read_yaml_mapping(path, "config file")
        if section and isinstance(data.get(section), dict):
            data = data[section]
        elif section and section in data:
            data = {}  # a pipeline file whose section is disabled or empty
        elif section and (sections := ", ".join(sorted(  # a pipeline file without this stage
                k for k, v in data.items() if isinstance(v, dict) and k not in _field_names(cls)))):
            raise StackRLHFError(f"config file {path} has sections ({sections}) but no `{section}:` section; add one "
                                 f"with this stage's settings, or run the whole file with `stackrlhf run {path}`")
        names = _field_names(cls)
        data = rename_aliases(cls, data, f"config file {path}")
        if not (section and any(isinstance(v, dict) for v in data.values())):  # a stage file: check every key
            check_settings(cls, data, f"config file {path}")
        values.update({k: v for k, v in data.items() if k in names})
    for key, value in overrides.items():
        if value is None or (isinstance(value, tuple) and len(value) == 0):
            continue
        values[key] = list(value) if isinstance(value, tuple) else value
    return config_from_dict(cls, values, f"config file {config_file}" if config_file is not None else cls.__name__)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]


def read_yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file that must hold a mapping, with errors that name the file."""
    if not path.is_file():
        raise StackRLHFError(f"{what} {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise StackRLHFError(f"{what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        raise StackRLHFError(f"{what} {path} is not valid YAML: {exc}".replace("\n", " ")) from exc
    if not isinstance(data, dict):
        raise StackRLHFError(f"{what} {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def check_settings(cls: type, values: dict, where: str) -> None:
    """Refuse keys that are not fields of ``cls``, naming the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in values if k not in names)
    if unknown:
        raise StackRLHFError(f"{where}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}; "
                             f"valid: {', '.join(sorted(names))}")


def check_types(cls: type, values: dict, where: str) -> None:
    """Refuse a value whose type does not fit its field (``max_pairs_per_question: lots``), in one line that names
    the place, the key and the type expected. Ints are taken where floats are expected; a list field takes a list
    (or one scalar, which becomes a one-item list)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints or value is None:
            continue
        scalar, is_list = _field_kind(hints[key])
        if (typing.get_origin(scalar) or scalar) is dict:
            if not isinstance(value, dict):
                raise StackRLHFError(f"{where}: {key} must be a mapping of settings, got {value!r}")
            continue
        items = value if is_list and isinstance(value, (list, tuple)) else [value]
        if scalar in (bool, int, float, str) and not is_list and isinstance(value, (list, tuple, dict)):
            raise StackRLHFError(f"{where}: {key} must be {_type_name(scalar)}, not a {type(value).__name__}")
        for item in items:
            if not _fits(item, scalar):
                raise StackRLHFError(f"{where}: {key} must be {_type_name(scalar)}{' (or a list of them)' if is_list else ''}"
                                     f", got {item!r}")


def _fits(value: Any, scalar: Any) -> bool:
    if scalar is bool:
        return isinstance(value, bool)
    if scalar is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if scalar is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if scalar is str:  # YAML reads 2024-01-01 as a date and 7 as an int: both are fine as text
        return not isinstance(value, (bool, list, tuple, dict))
    return True


def _type_name(scalar: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(scalar, "of its type")


def config_from_dict(cls: type[C], values: dict, where: str) -> C:
    """``cls(**values)`` with the errors a user can act on."""
    values = rename_aliases(cls, values, where)
    check_settings(cls, values, where)
    check_types(cls, values, where)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        prefix = "bad setting" if where == cls.__name__ else where  # no "SFTConfig: bad settings for SFTConfig"
        raise StackRLHFError(f"{prefix}: {exc}") from exc


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the exact settings a stage ran with (``config.yaml`` in its artifact directory)."""
    write_text_atomic(Path(path), yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable (an artifact not written yet)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_text_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename, so a reader never sees half a file. The file
    gets ``mode`` less the umask, as a plain ``open`` would give it (mkstemp alone makes it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, mode & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


REPORT_TARGETS = ("tensorboard", "wandb")


def report_targets(report_to: str) -> list[str]:
    """Where metrics go, from a ``report_to`` setting: ``tensorboard``, ``wandb``, ``both`` (or a comma list of
    the two), or ``none``; anything else is refused with a message that lists the choices."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        if name not in (*REPORT_TARGETS, "both", "none"):
            raise StackRLHFError(f"--report-to {report_to}: {name!r} is not one of tensorboard, wandb, both, none")
        out.extend(REPORT_TARGETS if name == "both" else [] if name == "none" else [name])
    return list(dict.fromkeys(out))
