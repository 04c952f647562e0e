"""Reading a search space file: YAML -> a validated SearchSpace (the format is in search_spaces/README.md).

Every mistake is a SpaceError naming the file and the dimension, raised before any trial runs.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from distributed_anomaly.tuning.space import (
    DERIVED,
    DIMENSION_KEYS,
    SETTINGS,
    TOP_KEYS,
    Dimension,
    SearchSpace,
    SpaceError,
    normalize,
)


def load_space(path: str | os.PathLike) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file {path} does not exist (see search_spaces/ for examples)")
    return parse_space(path.read_text(encoding="utf-8"), str(path))


def parse_space(text: str, source: str = "<search space>") -> SearchSpace:
    """Parse and validate a space (format: module docstring, search_spaces/README.md)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpaceError(f"{source} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise SpaceError(f"{source}: expected a mapping with `fixed:` and `dimensions:`, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(TOP_KEYS), key=str)
    if unknown:
        raise SpaceError(f"{source}: unknown key {unknown[0]!r} (allowed: {', '.join(TOP_KEYS)})")
    if doc.get("version", 1) != 1:
        raise SpaceError(f"{source}: version {doc['version']!r} is not supported (this package reads version 1)")
    fixed_doc = doc.get("fixed") or {}
    dims_doc = doc.get("dimensions") or {}
    if not isinstance(fixed_doc, dict) or not isinstance(dims_doc, dict):
        raise SpaceError(f"{source}: `fixed:` and `dimensions:` must be mappings of setting name to value/spec")
    if not dims_doc:
        raise SpaceError(f"{source}: no dimensions to search")
    fixed: dict[str, Any] = {}
    for name, value in fixed_doc.items():
        _check_name(name, source, "fixed")
        fixed[name] = normalize(name, value, f"{source}, fixed {name}")
    dims: list[Dimension] = []
    for name, spec in dims_doc.items():
        _check_name(name, source, "dimensions")
        if name in fixed:
            raise SpaceError(f"{source}: {name!r} is both fixed and a dimension")
        known = set(fixed) | {d.name for d in dims}
        dims.append(_parse_dimension(name, spec, source, known, {d.name: d for d in dims}, fixed))
    space = SearchSpace(source, fixed, tuple(dims), str(doc.get("description") or "").strip(), text)
    space.validate()
    return space


def _check_name(name: Any, source: str, section: str) -> None:
    if name not in SETTINGS:
        raise SpaceError(f"{source}: unknown setting {name!r} in `{section}:` (settings: {', '.join(SETTINGS)})")


def _values(parent: str, raw: Any, where: str) -> tuple:
    return tuple(normalize(parent, v, where) for v in (raw if isinstance(raw, list) else [raw]))


def _choice_list(name: str, raw: Any, where: str) -> tuple:
    if not isinstance(raw, list) or not raw:
        raise SpaceError(f"{where}: `choice` must be a non-empty list")
    out: list[Any] = []
    for item in raw:
        if isinstance(item, dict):
            if name != "layers" or set(item) - {"subsets_of", "min_size"} or "subsets_of" not in item:
                raise SpaceError(
                    f"{where}: a mapping in a choice list is only allowed for layers, as "
                    "{subsets_of: [a, b, c], min_size: K}"
                )
            base = [normalize("layers", [l], where) for l in item["subsets_of"]]
            k = item.get("min_size", 1)
            if not isinstance(k, int) or not 1 <= k <= len(base):
                raise SpaceError(f"{where}: min_size must be between 1 and {len(base)}, got {k!r}")
            out += [",".join(c) for r in range(k, len(base) + 1) for c in itertools.combinations(base, r)]
        else:
            out.append(normalize(name, item, where))
    return tuple(dict.fromkeys(out))  # order kept, duplicates dropped


def _parse_dimension(
    name: str, spec: Any, source: str, known: set[str], dims: Mapping[str, Dimension], fixed: Mapping[str, Any]
) -> Dimension:
    where = f"{source}, dimension {name}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: expected a mapping such as {{choice: [...]}} or {{int: [low, high]}}, got {spec!r}")
    unknown = sorted(set(spec) - set(DIMENSION_KEYS), key=str)
    if unknown:
        raise SpaceError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(DIMENSION_KEYS)})")
    kinds = [k for k in ("choice", "int", "float") if k in spec]
    if len(kinds) != 1:
        raise SpaceError(f"{where}: give exactly one of choice, int, float")
    when = _parse_when(spec, name, known, where)
    if kinds[0] == "choice":
        return _parse_choice(name, spec, known, when, where)
    return _parse_numeric(name, kinds[0], spec, known, when, where)


def _ref(spec: Mapping[str, Any], key: str, name: str, known: set[str], where: str) -> str:
    """A setting named by `by`, `at_most` or `at_least`: it must be fixed or searched above this dimension."""
    r = spec[key]
    if r not in known:
        raise SpaceError(
            f"{where}: `{key}: {r}` must name a setting fixed or searched above {name!r} "
            f"(known here: {', '.join(sorted(known)) or 'none'})"
        )
    return r


def _parse_when(spec: Mapping[str, Any], name: str, known: set[str], where: str) -> dict[str, tuple]:
    when: dict[str, tuple] = {}
    if "when" in spec:
        if not isinstance(spec["when"], dict) or not spec["when"]:
            raise SpaceError(f"{where}: `when` must be a mapping such as {{model: stfpm}}")
        for k, v in spec["when"].items():
            if k not in known:
                raise SpaceError(f"{where}: `when: {{{k}: ...}}` must name a setting fixed or searched above {name!r}")
            when[k] = _values(k, v, f"{where}, when {k}")
    return when


def _parse_choice(name: str, spec: Mapping[str, Any], known: set[str], when: dict, where: str) -> Dimension:
    if any(k in spec for k in ("log", "step", "at_most", "at_least")):
        raise SpaceError(f"{where}: log/step/at_most/at_least apply to int and float dimensions only")
    if "by" in spec:
        parent = _ref(spec, "by", name, known, where)
        if not isinstance(spec["choice"], dict) or not spec["choice"]:
            raise SpaceError(f"{where}: with `by: {parent}`, `choice` maps each value of {parent} to a list")
        options = {
            normalize(parent, k, f"{where}, choice key"): _choice_list(name, v, f"{where}, {parent}={k}")
            for k, v in spec["choice"].items()
        }
        return Dimension(name, "choice", by=parent, options=options, when=when)
    return Dimension(name, "choice", choices=_choice_list(name, spec["choice"], where), when=when)


def _parse_numeric(name: str, kind: str, spec: Mapping[str, Any], known: set[str], when: dict, where: str) -> Dimension:
    if SETTINGS[name] not in ("int", "float"):
        raise SpaceError(f"{where}: {name} takes names, so it must be a `choice`")
    if kind != SETTINGS[name]:
        raise SpaceError(
            f"{where}: {name} is "
            + ("a real number: use `float: [low, high]`" if kind == "int" else "an integer: use `int: [low, high]`")
        )
    bounds = spec[kind]
    if not (isinstance(bounds, list) and len(bounds) == 2):
        raise SpaceError(f"{where}: `{kind}` must be [low, high]")
    low, high = (normalize(name, b, where) for b in bounds)
    if low > high:
        raise SpaceError(f"{where}: low {low} is above high {high}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SpaceError(f"{where}: `log` must be true or false")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log range needs low > 0")
    step = spec.get("step")
    if step is not None:
        bad_type = isinstance(step, bool) or not isinstance(step, (int, float))
        if bad_type or step <= 0 or (kind == "int" and step != int(step)):
            raise SpaceError(f"{where}: `step` must be a positive {'integer' if kind == 'int' else 'number'}")
        if log:
            raise SpaceError(f"{where}: `step` and `log` cannot be combined (Optuna samples one or the other)")
    limits = {}
    for key in ("at_most", "at_least"):
        if key in spec:
            r = spec[key] if spec[key] in DERIVED else _ref(spec, key, name, known, where)
            if r not in DERIVED and SETTINGS[r] not in ("int", "float"):
                raise SpaceError(f"{where}: `{key}: {r}` must be numeric (or one of: {', '.join(DERIVED)})")
            limits[key] = r
    return Dimension(name, kind, low=low, high=high, log=log, step=step, when=when, **limits)
