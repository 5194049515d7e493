"""Job configs: a YAML file plus ``dotted.key=value`` overrides → a frozen dataclass, checked strictly.

Every job is ``python -m ray_jobs.<job> --config FILE [key=value ...]``. An unknown key, a
missing required key or a value of the wrong type fails before any work starts, with a message
naming the key. ``--help`` lists every key with its default and meaning (the field's
``metadata["help"]``).

A config file may start from another: ``base: other.yaml`` (relative to the file) loads that file
first and lays this one's keys over it, sections merged key by key and lists replaced. The
paper's ablation configs are the paper config plus the few keys they change. With
``base_keys`` a file takes only some keys of its base, possibly moved (``pick_keys``): the
per-job paper configs take their stage's section of the pipeline config ``paper_ava.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import yaml

from featurestore.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config that names an unknown key, lacks a required one, or has a value of the wrong type."""


def option(default: Any = dataclasses.MISSING, help: str = "", **kwargs) -> Any:  # noqa: A002
    """A config field with its ``--help`` text."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` → (["a", "b"], value); values are YAML, so ``3``, ``true``, ``[a, b]`` work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. store=s3://bucket/prefix)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw else ""


def merge(tree: dict, path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {'.'.join(path)!r}: {part!r} is not a section")
        tree = node
    tree[path[-1]] = value


def _convert(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"config key {key!r}: {value!r} fits none of "
                          f"{[getattr(a, '__name__', str(a)) for a in args]}")
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, prefix=f"{key}.")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"config key {key!r}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from nested mappings, refusing unknown keys by name."""
    if not isinstance(data, (Mapping, type(None))):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - set(fields)):
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; known keys here: "
                          f"{', '.join(prefix + k for k in fields)} (see --help)")
    values = {}
    for name, f in fields.items():
        key = prefix + name
        if name in data:
            values[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                values[name] = from_dict(hints[name], {}, prefix=f"{key}.")
            else:
                raise ConfigError(f"missing required config key {key!r}: {f.metadata.get('help', '')}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"config {prefix.rstrip('.') or '(top level)'}: {exc}") from None


def read_tree(file: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """The key tree of a YAML config file, with its ``base`` chain merged in."""
    if not file.is_file():
        raise ConfigError(f"config file {str(file)!r} not found")
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(file)!r} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(file)!r} must hold a mapping of keys")
    if "base" not in tree:
        if "base_keys" in tree:
            raise ConfigError(f"config file {str(file)!r}: base_keys needs a base file to take them from")
        return tree
    base = tree.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"config file {str(file)!r}: base must be a file name, got {base!r}")
    base_file = (file.parent / base).resolve()
    if base_file in _seen or base_file == file.resolve():
        raise ConfigError(f"config file {str(file)!r}: base {base!r} leads back to itself")
    base_tree = read_tree(base_file, (*_seen, file.resolve()))
    if "base_keys" in tree:
        base_tree = pick_keys(base_tree, tree.pop("base_keys"), f"config file {str(file)!r}: base_keys")
    return overlay(base_tree, tree)


def pick_keys(tree: dict, mapping: Any, where: str) -> dict:
    """The keys a job config takes from another file, e.g. from a pipeline config:
    ``{store: store, ".": extract, student: "students[0]"}`` — each target key gets the value at
    a dotted source path (``[i]`` picks a list item); target ``.`` merges a section into the top
    level. One definition of each setting, however many configs use it."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where} must map target keys to source paths, e.g. {{store: store, '.': extract}}")
    picked: dict = {}
    for target, source in mapping.items():
        value: Any = tree
        for part in str(source).replace("[", ".[").split("."):
            index = part[1:-1] if part.startswith("[") and part.endswith("]") else None
            if index is not None and isinstance(value, list) and index.isdigit() and int(index) < len(value):
                value = value[int(index)]
            elif index is None and isinstance(value, dict) and part in value:
                value = value[part]
            else:
                raise ConfigError(f"{where}: the base file has no {source!r} (for {target!r})")
        if target == ".":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: {source!r} is not a section, so it cannot be merged at the top level")
            picked = overlay(picked, value)
        else:
            merge(picked, str(target).split("."), value)
    return picked


def overlay(base: dict, top: dict) -> dict:
    """``top``'s keys over ``base``'s: mappings merged recursively, everything else replaced."""
    merged = dict(base)
    for key, value in top.items():
        merged[key] = overlay(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def load_config(cls: type[T], path: str | None, overrides: list[str]) -> T:
    tree = read_tree(Path(path)) if path else {}
    for text in overrides:
        merge(tree, *parse_override(text))
    return from_dict(cls, tree)


def describe_keys(cls: type, prefix: str = "") -> list[str]:
    """One line per key: ``name = default  help``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe_keys(hints[f.name], prefix=f"{prefix}{f.name}.")
            continue
        default = "(required)" if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING \
            else json.dumps(f.default if f.default is not dataclasses.MISSING else f.default_factory())
        lines.append(f"  {prefix + f.name:<28} {default:<22} {f.metadata.get('help', '')}")
    return lines


def as_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def find_user_error(exc: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``exc``: ``exc`` itself, or one that a worker raised and Ray
    wrapped (a task's ``RayTaskError.cause``, a Ray Train worker's entry in
    ``WorkerGroupError.worker_failures``, a controller's failure) or that ``exc`` was raised
    ``from``. The outermost one of our own, so its message keeps the most context."""
    seen: set[int] = set()

    def search(e: BaseException | None) -> UserError | None:
        if e is None or id(e) in seen:
            return None
        seen.add(id(e))
        if isinstance(e, UserError) and not _is_ray_wrapper(e):
            return e
        failures = getattr(e, "worker_failures", None)
        inner = [getattr(e, name, None) for name in ("cause", "controller_failure", "_base_exc")]
        inner += [failures[rank] for rank in sorted(failures)] if isinstance(failures, dict) else []
        for candidate in (*inner, e.__cause__):
            if isinstance(candidate, BaseException) and (found := search(candidate)) is not None:
                return found
        return None

    return search(exc)


def _is_ray_wrapper(exc: BaseException) -> bool:
    """Ray's ``RayTaskError(<cause class>)``: an instance of the cause's class whose text is a
    whole traceback; the cause itself is in ``.cause``."""
    return type(exc).__module__.split(".")[0] == "ray"


def run_job(name: str, config_cls: type[T], main: Callable[[T], dict[str, Any]],
            check: Callable[[T], dict[str, Any]] | None = None, argv: list[str] | None = None) -> int:
    """Parse ``[--verbose] [--check] --config FILE [key=value ...]``, run ``main`` and print its
    result as the last stdout line.

    A :class:`UserError` — raised here or in a worker — prints one ``error:`` line on stderr and
    exits 2; anything else is a bug or an outage and keeps its traceback. ``--verbose`` (or
    ``AKD_VERBOSE=1``) shows Ray's internal logs. A job with a ``check`` function has ``--check``:
    it validates the config and prints ``check``'s plan instead of running ``main``.
    """
    from ray_jobs.runtime import VERBOSE_ENV, set_verbose

    parser = argparse.ArgumentParser(
        prog=f"python -m ray_jobs.{name}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(sys.modules[main.__module__].__doc__ or "").strip(),
        epilog="config keys (set in the YAML file or as key=value):\n" + "\n".join(describe_keys(config_cls)))
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--verbose", action="store_true",
                        help=f"also show Ray's internal logs (workers, Ray Train, Ray Data); or set {VERBOSE_ENV}=1")
    if check is not None:
        parser.add_argument("--check", action="store_true",
                            help="validate the config and print the planned work as JSON; run nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    args = parser.parse_intermixed_args(argv)
    if args.verbose:
        set_verbose(True)
    try:
        config = load_config(config_cls, args.config, args.overrides)
        result = check(config) if getattr(args, "check", False) else main(config)
    except Exception as exc:  # noqa: BLE001 - only user errors are caught; the rest re-raise
        if (error := find_user_error(exc)) is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0
