"""Command-line options generated from configuration dataclasses, so each setting is written once.

A configuration field declares its option with :func:`option` (flag, help, group, argparse kind) next
to its type and default; :func:`add_options` adds every such field of a dataclass tree to an
``argparse`` parser (choices from the field's metadata, the default shown in the help from the
dataclass or the presets), and :func:`apply_options` writes the parsed values back into a config.

Every generated option parses to ``None`` when not given, so a run's preset keeps its values and a
resumed run can tell which settings the command line tried to change.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["option", "OptionSpec", "option_fields", "add_options", "apply_options", "ResumeConflict"]

#: what a resumed run does with an option: refuse a different value, take it, or ignore it
ON_RESUME = ("fixed", "free", "ignored")
#: how the flag is spelled: ``value`` (--x V), ``both`` (--x / --no-x), ``on`` (--x sets True),
#: ``off`` (--no-x sets False)
KINDS = ("value", "both", "on", "off")


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """The command-line face of one configuration field (see :func:`option`)."""

    flag: str
    help: str
    group: str
    kind: str = "value"
    metavar: str | None = None
    choices: Sequence[str] | None = None
    type: Callable[[str], Any] | None = None
    convert: Callable[[Any], Any] | None = None
    default_text: str | None = None
    on_resume: str = "fixed"
    together: str | None = None
    show: Callable[[Any], str] | None = None

    @property
    def dest(self) -> str:
        """The argparse destination: the flag without dashes (``--no-ctf`` → ``no_ctf``)."""
        return self.flag.lstrip("-").replace("-", "_")


def option(default: Any = dataclasses.MISSING, *, flag: str, help: str, group: str, kind: str = "value",
           metavar: str | None = None, choices: Sequence[str] | None = None,
           type: Callable[[str], Any] | None = None, convert: Callable[[Any], Any] | None = None,
           default_text: str | None = None, on_resume: str = "fixed", together: str | None = None,
           show: Callable[[Any], str] | None = None,
           default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its command-line option.

    flag         : the option, e.g. ``"--lr"`` (``kind="off"``: the negative flag, ``"--no-ctf"``).
    help         : what it does, without the default (added from the dataclass or the presets).
    group        : the argparse group it is listed under.
    kind         : ``value``, ``both`` (--x/--no-x), ``on`` (a switch setting True), ``off`` (a
                   switch setting False).
    type         : parses the text (default: the field's type, e.g. ``int``); ``convert`` turns the
                   parsed value into the field's (e.g. a duration into seconds) when applied, so a
                   bad value is a one-line input error rather than an argparse usage message.
    default_text : the help's default when the field's own default does not say it (e.g. None
                   meaning "the learning rate").
    on_resume    : ``fixed`` (a resumed run refuses a different value), ``free`` (may change),
                   ``ignored`` (only a new run reads it).
    together     : fields of one ``together`` set are replaced as a whole when any of them is given
                   (the training budget: ``--steps`` alone drops the preset's time limit).
    show         : formats the field's value for the help and messages (e.g. seconds as minutes).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if on_resume not in ON_RESUME:
        raise ValueError(f"on_resume must be one of {ON_RESUME}, got {on_resume!r}")
    spec = OptionSpec(flag=flag, help=help, group=group, kind=kind, metavar=metavar, choices=choices,
                      type=type, convert=convert, default_text=default_text, on_resume=on_resume,
                      together=together, show=show)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": spec})


def option_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, OptionSpec, Any]]:
    """``(dotted path, field, spec, type)`` for every field with an option in the dataclass tree of
    ``cls``, in declaration order (nested dataclasses in place)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            yield from option_fields(hint, f"{prefix}{field.name}.")
        elif "option" in field.metadata:
            yield f"{prefix}{field.name}", field, field.metadata["option"], hint


def get_path(obj: Any, dotted: str) -> Any:
    """``obj.a.b`` for ``dotted = "a.b"``."""
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(obj: Any, dotted: str, value: Any) -> None:
    """``obj.a.b = value`` for ``dotted = "a.b"``."""
    *parents, last = dotted.split(".")
    setattr(get_path(obj, ".".join(parents)) if parents else obj, last, value)


def _scalar_type(hint: Any) -> Callable[[str], Any] | None:
    """``int`` for ``int`` or ``int | None`` (likewise float, str); None for anything else."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if len(args) == 1 and args[0] in (int, float, str) else None


def _show(value: Any, spec: OptionSpec | None = None) -> str:
    """A setting's value as the help and the messages print it."""
    if spec is not None and spec.show is not None:  # None too: "none" may not be what None means there
        return spec.show(value)
    if spec is not None and spec.kind == "off":  # --no-ctf: "on" would read as "no CTF: on"
        value = not value
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _default_help(path: str, field: dataclasses.Field, spec: OptionSpec,
                  presets: Mapping[str, Any]) -> str:
    """"default X", or "presets: a X, b Y" where the presets disagree, or the field's default_text."""
    if spec.default_text is not None:
        return f"default: {spec.default_text}"
    values = {name: get_path(config, path) for name, config in presets.items()}
    if len({_show(v, spec) for v in values.values()}) > 1:
        return "presets: " + ", ".join(f"{name} {_show(v, spec)}" for name, v in values.items())
    if values:
        return f"default: {_show(next(iter(values.values())), spec)}"
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return f"default: {_show(default, spec)}"


def add_options(parser: argparse.ArgumentParser, cls: type, groups: Mapping[str, str],
                presets: Mapping[str, Any] | None = None) -> dict[str, argparse._ArgumentGroup]:
    """Add an option for every :func:`option` field of the dataclass ``cls`` (nested ones included).

    groups  : {group key: title} in the order the groups are listed; every field's group must be one.
    presets : {name: config instance}; the help shows each field's default from them (one value when
              they agree, else one per preset) rather than the bare dataclass default.
    Returns {group key: the argparse group}, for the caller's own options.
    """
    made = {key: parser.add_argument_group(title) for key, title in groups.items()}
    for path, field, spec, hint in option_fields(cls):
        if spec.group not in made:
            raise ValueError(f"{path}: unknown option group {spec.group!r}")
        help_text = f"{spec.help} ({_default_help(path, field, spec, presets or {})})"
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": spec.dest, "help": help_text, "default": None}
        if spec.kind == "value":
            kwargs["type"] = spec.type or _scalar_type(hint) or str
            if spec.choices is not None:
                kwargs["choices"] = tuple(spec.choices)
            if spec.metavar is not None:
                kwargs["metavar"] = spec.metavar
        elif spec.kind == "both":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["action"] = "store_true"
        made[spec.group].add_argument(spec.flag, **kwargs)
    return made


class ResumeConflict(ValueError):
    """A resumed run was given a different value for a ``fixed`` setting."""

    def __init__(self, spec: OptionSpec, given: Any, current: Any):
        self.flag, self.given, self.current = spec.flag, given, current
        if spec.kind in ("on", "off"):
            super().__init__(f"{spec.flag} differs from the run's setting")
        else:
            super().__init__(f"{spec.flag} {_show(given, spec)} differs from the run's {_show(current, spec)}")


def _given(args: argparse.Namespace, spec: OptionSpec) -> tuple[bool, Any]:
    """(given?, the field value it asks for) of one option."""
    value = getattr(args, spec.dest, None)
    if spec.kind in ("on", "off"):
        return bool(value), spec.kind == "on"
    if value is None:
        return False, None
    return True, spec.convert(value) if spec.convert is not None else value


def apply_options(args: argparse.Namespace, config: Any, resume: bool = False,
                  skip: Sequence[str] = ()) -> None:
    """Write the options given in ``args`` into ``config`` (a dataclass made by ``add_options``' ``cls``).

    A new run takes every given option. A resumed run (``resume``) raises :class:`ResumeConflict`
    for a ``fixed`` option whose value differs from the config's, takes ``free`` ones and ignores
    ``ignored`` ones. Fields of a ``together`` set are replaced as a whole (ungiven ones become None)
    when any of them is given. ``skip``: dotted paths the caller applies itself.
    """
    fields = [(path, spec) for path, _field, spec, _hint in option_fields(type(config)) if path not in skip]
    asked = {path: _given(args, spec) for path, spec in fields}
    together = {spec.together for path, spec in fields if spec.together and asked[path][0]}
    for path, spec in fields:
        given, value = asked[path]
        if resume and spec.on_resume == "ignored":
            continue
        if not given:
            if spec.together in together and (not resume or spec.on_resume == "free"):
                set_path(config, path, None)
            continue
        if resume and spec.on_resume == "fixed":
            if value != get_path(config, path):
                raise ResumeConflict(spec, value, get_path(config, path))
            continue
        set_path(config, path, value)
