"""Experiment configs: frozen dataclasses whose fields carry their own help text and checks.

Every setting of a run is a field declared with :func:`param`: its default, one line of help, the
check its value must pass, and whether the command line offers it (and as a comma-separated list
that sweeps). One declaration serves the library (``MnistConfig(lr=-1)`` raises), the command line
(``batchnorm reproduce mnist --lr -1`` prints the same problem under the flag's name and exits 2;
the flags, their types, defaults and help are generated from the fields, never retyped) and the
saved ``config.json`` (:meth:`Config.to_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields

__all__ = [
    "Config",
    "ConfigError",
    "at_least",
    "between",
    "check_batch_sizes",
    "flag_name",
    "grid",
    "one_of",
    "param",
    "positive",
    "positive_int",
]

Check = Callable[[object], "str | None"]


class ConfigError(ValueError):
    """A setting is not valid; ``field`` names it, ``problem`` says what is wrong with it.

    ``str()`` reads ``"MnistConfig: lr must be a positive finite number, got -1"``; the command
    line prints ``"--lr must be ..."`` instead (:func:`flag_name`).
    """

    def __init__(self, owner: str, field: str, problem: str) -> None:
        self.owner, self.field, self.problem = owner, field, problem
        super().__init__(f"{owner}: {field} {problem}")


def flag_name(field: str) -> str:
    """The command-line flag of a config field: ``batch_size`` -> ``--batch-size``."""
    return "--" + field.replace("_", "-").replace(".", "-")


# -- checks: each returns None when the value is fine, else what is wrong ------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(v: object) -> str | None:
    return None if _is_int(v) and v >= 1 else f"must be a positive integer, got {v!r}"


def at_least(low: int, why: str = "") -> Check:
    def check(v: object) -> str | None:
        if _is_int(v) and v >= low:
            return None
        return f"must be an integer of at least {low}{why}, got {v!r}"

    return check


def positive(v: object) -> str | None:
    return None if _is_real(v) and v > 0 else f"must be a positive finite number, got {v!r}"


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Check:
    """A finite number in the interval (``[low, high]`` unless a side is open)."""
    brackets = ("(" if open_low else "[") + f"{low:g}, {high:g}" + (")" if open_high else "]")

    def check(v: object) -> str | None:
        ok = (
            _is_real(v)
            and (v > low if open_low else v >= low)
            and (v < high if open_high else v <= high)
        )
        return None if ok else f"must be in {brackets}, got {v!r}"

    return check


def one_of(*choices: object) -> Check:
    def check(v: object) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(str, choices))}, got {v!r}"

    check.choices = choices  # the command line offers them
    return check


# -- fields -----------------------------------------------------------------------------------------


def param(
    default: object,
    help: str,
    *,
    check: Check | None = None,
    cli: bool = True,
    sweep: bool = False,
) -> typing.Any:
    """A config field: ``default``, one line of ``help``, the ``check`` of its values; on the
    command line unless ``cli=False``, and as a comma-separated list of values to sweep (every
    combination is run) if ``sweep``. Dataclass defaults (a nested config) are built per instance."""
    meta = {"help": help, "check": check, "cli": cli, "sweep": sweep}
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    """Base of every experiment's config: checks each field's value on construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            check = f.metadata.get("check")
            problem = check(value) if check is not None else _type_problem(value, hints[f.name])
            if problem is not None:
                raise self.error(f.name, problem)

    def error(self, field: str, problem: str) -> ConfigError:
        return ConfigError(type(self).__name__, field, problem)

    def to_dict(self) -> dict:
        """Every setting, as saved to ``config.json`` (tuples as lists)."""
        return json_ready(dataclasses.asdict(self))


def json_ready(value: object) -> object:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _type_problem(value: object, hint: object) -> str | None:
    """A light type check for fields without their own check (bool is not an int here)."""
    origin = typing.get_origin(hint)
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        return None if _is_int(value) else f"must be an integer, got {value!r}"
    if hint is float:
        return None if _is_real(value) else f"must be a finite number, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if origin is typing.Literal:
        return one_of(*typing.get_args(hint))(value)
    return None


# -- reading the fields (for the command line) -------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One command-line option of a config: a field, or a field of a nested config."""

    path: tuple[str, ...]  # ("lr",) or ("base", "lr")
    type: type
    default: object
    help: str
    sweep: bool
    choices: tuple | None

    @property
    def name(self) -> str:
        return "_".join(self.path)

    @property
    def flag(self) -> str:
        return flag_name(self.name)


def options(cls: type[Config], prefix: tuple[str, ...] = (), context: str = "") -> Iterator[Option]:
    """The command-line options of ``cls``: every field with ``cli=True``, nested configs'
    fields prefixed with the field's name (``base.lr`` -> ``--base-lr``)."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in fields(cls):
        hint = hints[f.name]
        default = getattr(defaults, f.name)
        if isinstance(hint, type) and issubclass(hint, Config):
            yield from options(hint, (*prefix, f.name), f"; {f.metadata['help']}")
            continue
        if not f.metadata.get("cli", False):
            continue
        choices = getattr(f.metadata.get("check"), "choices", None)
        if choices is None and typing.get_origin(hint) is typing.Literal:
            choices = typing.get_args(hint)
        base = type(choices[0]) if choices else _optional_inner(hint)
        yield Option(
            (*prefix, f.name),
            base,
            default,
            f.metadata["help"] + context,
            f.metadata["sweep"],
            choices,
        )


def _optional_inner(hint: object) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint  # type: ignore[return-value]


def with_values(cfg: Config, values: dict[tuple[str, ...], object]) -> Config:
    """``cfg`` with the fields at each path replaced (nested configs rebuilt, so checked)."""
    top: dict[str, object] = {}
    nested: dict[str, dict[tuple[str, ...], object]] = {}
    for path, value in values.items():
        if len(path) == 1:
            top[path[0]] = value
        else:
            nested.setdefault(path[0], {})[path[1:]] = value
    for name, sub in nested.items():
        try:
            top[name] = with_values(getattr(cfg, name), sub)
        except ConfigError as exc:  # name the field as the outer config knows it
            raise ConfigError(type(cfg).__name__, f"{name}.{exc.field}", exc.problem) from None
    return dataclasses.replace(cfg, **top)


def grid(base: Config, values: dict[tuple[str, ...], Sequence[object]]) -> list[Config]:
    """Every combination of the listed values (the last path varies fastest)."""
    combos: list[dict[tuple[str, ...], object]] = [{}]
    for path, vals in values.items():
        combos = [{**c, path: v} for c in combos for v in vals]
    return [with_values(base, c) for c in combos]


def check_batch_sizes(
    owner: str, batch_size: int, population_batches: int, train_images: int
) -> None:
    """The training batch and the population estimate's batches (distinct training images) must
    fit in the training set (``train_images``: after the validation images are set aside)."""
    if batch_size > train_images:
        raise ConfigError(
            owner, "batch_size", f"= {batch_size} exceeds the {train_images} training images"
        )
    if population_batches * batch_size > train_images:
        raise ConfigError(
            owner,
            "population_batches",
            f"× batch_size = {population_batches} × {batch_size} exceeds the {train_images} "
            "training images (the population estimate uses distinct images); use at most "
            f"{train_images // batch_size}",
        )
