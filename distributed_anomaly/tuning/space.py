"""Search spaces: a YAML file turned into an Optuna define-by-run function whose every sample is valid.

Ray-free and training-free, so a space can be checked (and sampled) in milliseconds. The format is documented
in search_spaces/README.md; in short:

    description: free text
    fixed:                     # settings every trial gets
      model: padim
    dimensions:                # searched, in this order; a dimension may depend on those above it
      backbone: {choice: [resnet18, mobilenet_v2]}
      layers:                  # the choices depend on the backbone: "layers valid for the chosen backbone"
        by: backbone
        choice:
          resnet18: [[layer1, layer2], {subsets_of: [layer1, layer2, layer3], min_size: 2}]
          mobilenet_v2: [[features.3, features.6, features.13]]
      n_features: {int: [32, 550], log: true, at_most: channels}   # n_features <= channels of those layers
      lr: {float: [0.01, 1.0], log: true, when: {model: stfpm}}     # only sampled for STFPM trials

Constraints are bounds and choice lists that depend on earlier choices (`by`, `at_most`, `at_least`, `when`),
so the sampler never proposes an invalid configuration: nothing is rejected after the fact, and TPE never
learns from a "bad combination" that was the space's fault. `SearchSpace.validate` enumerates every
combination of categorical choices (numeric dimensions at both ends of their range) and builds its
ModelConfig/TrainConfig, so a space that could produce an invalid trial is refused before anything runs.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from distributed_anomaly.config import ModelConfig, TrainConfig
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.backbones import DEFAULT_BACKBONE, get_spec

# Every setting a space may fix or search, and the kind of its values.
SETTINGS: dict[str, str] = {
    "model": "str", "backbone": "str", "layers": "layers", "n_features": "int", "image_size": "int",
    "epochs": "int", "batch_size": "int", "lr": "float", "momentum": "float", "weight_decay": "float",
    "patience": "int",
}
MODEL_KEYS = ("model", "backbone", "layers", "n_features", "image_size")
TRAIN_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "patience")
# Quantities derived from earlier choices that a bound may refer to.
DERIVED = {"channels": "total channels of the chosen layers on the chosen backbone (PADIM's n_features bound)"}
DIMENSION_KEYS = ("choice", "by", "int", "float", "log", "step", "at_most", "at_least", "when")
TOP_KEYS = ("version", "description", "fixed", "dimensions")
MAX_COMBINATIONS = 100_000


class SpaceError(UserError):
    """A search space file (or a --fix) that cannot be used; the message names the file and the dimension."""


def normalize(name: str, value: Any, where: str = "") -> Any:
    """A setting's value in canonical form: layers as "a,b,c", ints as int, floats as float, strings as str."""
    kind = SETTINGS[name]
    prefix = f"{where}: " if where else ""
    if kind == "layers":
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            parts = [v.strip() for v in value]
        elif isinstance(value, str):
            parts = [v.strip() for v in value.split(",")]
        else:
            raise SpaceError(f"{prefix}layers must be a list of layer names or 'a,b,c', got {value!r}")
        if not all(parts):
            raise SpaceError(f"{prefix}empty layer name in {value!r}")
        return ",".join(parts)
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SpaceError(f"{prefix}{name} must be an integer, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise SpaceError(f"{prefix}{name} must be an integer, got {value!r}") from None
        if not number.is_integer():
            raise SpaceError(f"{prefix}{name} must be an integer, got {value!r}")
        return int(number)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SpaceError(f"{prefix}{name} must be a number, got {value!r}")
        try:
            number = float(value)
        except ValueError:
            raise SpaceError(f"{prefix}{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise SpaceError(f"{prefix}{name} must be finite, got {value!r}")
        return number
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise SpaceError(f"{prefix}{name} must be a name, got {value!r}")
    return str(value)


def channels(ctx: Mapping[str, Any]) -> int:
    """Total channels of the chosen layers on the chosen backbone (the backbone's default taps if none chosen)."""
    spec = get_spec(ctx.get("backbone", DEFAULT_BACKBONE))
    layers = ctx["layers"].split(",") if ctx.get("layers") else spec.default_layers
    unknown = [l for l in layers if l not in spec.taps]
    if unknown:
        raise SpaceError(f"backbone {spec.name} has no layer {unknown[0]!r} (valid: {', '.join(spec.taps)})")
    return sum(spec.taps[l][0] for l in layers)


@dataclass(frozen=True)
class Dimension:
    """One searched (or, after --fix, pinned) setting; its choices or bounds may depend on earlier settings."""

    name: str
    kind: str  # "choice", "int", "float" or "const" (a --fix)
    choices: tuple = ()  # "choice" without `by`
    by: str | None = None  # "choice": the earlier setting whose value selects the list of choices
    options: Mapping[Any, tuple] = field(default_factory=dict)  # "choice" with `by`: parent value -> choices
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    at_most: str | None = None  # a DERIVED quantity or an earlier numeric setting
    at_least: str | None = None
    when: Mapping[str, tuple] = field(default_factory=dict)  # setting -> allowed values; else not sampled
    value: Any = None  # "const"

    def applies(self, ctx: Mapping[str, Any]) -> bool:
        return all(k in ctx and ctx[k] in allowed for k, allowed in self.when.items())

    def choices_for(self, ctx: Mapping[str, Any]) -> tuple:
        if self.by is None:
            return self.choices
        parent = ctx.get(self.by)
        if parent not in self.options:
            raise SpaceError(f"dimension {self.name!r}: no choices for {self.by}={parent} (add them under `choice:`)")
        return self.options[parent]

    def param_name(self, ctx: Mapping[str, Any]) -> str:
        """Optuna's name: a choice list that depends on the backbone is a separate categorical per backbone
        (Optuna requires one fixed set of choices per parameter name)."""
        return self.name if self.by is None else f"{self.name}[{ctx.get(self.by)}]"

    def _ref(self, ref: str, ctx: Mapping[str, Any]) -> float:
        if ref in DERIVED:
            return channels(ctx)
        if ref not in ctx:
            raise SpaceError(f"dimension {self.name!r}: bound {ref!r} has no value in this trial")
        return float(ctx[ref])

    def bounds(self, ctx: Mapping[str, Any]) -> tuple[float, float]:
        """The range after the constraints; raises SpaceError when it is empty."""
        lo, hi = float(self.low), float(self.high)
        if self.at_most:
            hi = min(hi, self._ref(self.at_most, ctx))
        if self.at_least:
            lo = max(lo, self._ref(self.at_least, ctx))
        if self.kind == "int":
            lo, hi = math.ceil(lo), math.floor(hi)
            step = int(self.step or 1)
            hi = lo + (hi - lo) // step * step if hi >= lo else hi
        if lo > hi:
            given = ", ".join(f"{k}={ctx[k]}" for k in ctx if k in SETTINGS)
            raise SpaceError(f"dimension {self.name!r}: its range [{self.low:g}, {self.high:g}] is empty under its "
                             f"constraints ({self._constraint_text()}) when {given}")
        return (int(lo), int(hi)) if self.kind == "int" else (lo, hi)

    def _constraint_text(self) -> str:
        parts = [f"{self.name} <= {self.at_most}" if self.at_most else "",
                 f"{self.name} >= {self.at_least}" if self.at_least else ""]
        return ", ".join(p for p in parts if p) or "none"

    def suggest(self, trial: Any, ctx: Mapping[str, Any]) -> Any:
        if self.kind == "const":
            return self.value
        if self.kind == "choice":
            return trial.suggest_categorical(self.param_name(ctx), list(self.choices_for(ctx)))
        lo, hi = self.bounds(ctx)
        if self.kind == "int":
            return int(trial.suggest_int(self.name, lo, hi, step=int(self.step or 1), log=self.log))
        return float(trial.suggest_float(self.name, lo, hi, step=self.step, log=self.log))

    def describe(self) -> str:
        """One line for listings and the report."""
        if self.kind == "const":
            text = f"fixed {self.value}"
        elif self.kind == "choice":
            text = (f"one of {', '.join(map(str, self.choices))}" if self.by is None else
                    f"per {self.by}: " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in self.options.items()))
        else:
            text = f"{self.kind} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "") + (
                f" step {self.step:g}" if self.step else "")
            if self.at_most or self.at_least:
                text += f", {self._constraint_text()}"
        if self.when:
            text += " when " + " and ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in self.when.items())
        return text


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space: fixed settings and the dimensions in sampling order; `sample` is the define-by-run."""

    source: str
    fixed: Mapping[str, Any]
    dimensions: tuple[Dimension, ...]
    description: str = ""
    text: str = ""  # the YAML it was parsed from (kept with a search so --resume does not need the file)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: the trial's settings (fixed ones included), each choice made in order."""
        ctx = dict(self.fixed)
        for d in self.dimensions:
            if d.applies(ctx):
                ctx[d.name] = d.suggest(trial, ctx)
        return ctx

    def fix(self, assignments: Sequence[str]) -> "SearchSpace":
        """Pin dimensions: each "NAME=VALUE" (the --fix option); the result is validated again."""
        dims = list(self.dimensions)
        fixed = dict(self.fixed)
        for text in assignments:
            name, sep, raw = text.partition("=")
            name, raw = name.strip(), raw.strip()
            if not sep or not name or not raw:
                raise SpaceError(f"--fix {text!r}: expected NAME=VALUE, e.g. --fix backbone=mobilenet_v2")
            if name in fixed:
                fixed[name] = normalize(name, raw, f"--fix {text}")
                continue
            idx = next((i for i, d in enumerate(dims) if d.name == name), None)
            if idx is None:
                raise SpaceError(f"--fix {text!r}: {self.source} has no dimension {name!r} (dimensions: "
                                 f"{', '.join(d.name for d in dims) or 'none'}; fixed: {', '.join(fixed) or 'none'})")
            d = dims[idx]
            value = normalize(name, raw, f"--fix {text}")
            if d.kind == "choice":
                allowed = d.choices if d.by is None else tuple(dict.fromkeys(itertools.chain(*d.options.values())))
                if value not in allowed:
                    raise SpaceError(f"--fix {text!r}: {value} is not among the choices of {name!r} in {self.source} "
                                     f"({', '.join(map(str, allowed))})")
            elif d.kind in ("int", "float") and not d.low <= value <= d.high:
                raise SpaceError(f"--fix {text!r}: {value} is outside the range of {name!r} in {self.source} "
                                 f"([{d.low:g}, {d.high:g}])")
            # A pinned choice that depends on another keeps the dependency: checked per parent value below.
            dims[idx] = replace(d, kind="const", value=value)
        space = replace(self, fixed=fixed, dimensions=tuple(dims))
        space.validate()
        return space

    # ------------------------------------------------------------------ static checks

    def combinations(self) -> Iterator[dict[str, Any]]:
        """Every combination of categorical choices, numeric dimensions at both ends of their range."""
        count = itertools.count(1)

        def walk(i: int, ctx: dict[str, Any]) -> Iterator[dict[str, Any]]:
            if i == len(self.dimensions):
                if next(count) > MAX_COMBINATIONS:
                    raise SpaceError(f"{self.source}: more than {MAX_COMBINATIONS} combinations of choices; "
                                     "split the space into several files")
                yield dict(ctx)
                return
            d = self.dimensions[i]
            if not d.applies(ctx):
                yield from walk(i + 1, ctx)
                return
            if d.kind == "const":
                if d.by is not None and d.value not in d.choices_for(ctx):
                    raise SpaceError(f"{d.name}={d.value} is not among the choices for {d.by}={ctx.get(d.by)} in "
                                     f"{self.source}; fix {d.by} as well")
                values: Sequence[Any] = (d.value,)
            elif d.kind == "choice":
                values = d.choices_for(ctx)
            else:
                values = tuple(dict.fromkeys(d.bounds(ctx)))
            for v in values:
                ctx[d.name] = v
                yield from walk(i + 1, ctx)
                del ctx[d.name]

        yield from walk(0, dict(self.fixed))

    def validate(self) -> None:
        """Refuse a space that could produce an invalid trial, naming the combination and why."""
        for ctx in self.combinations():
            try:
                trial_configs(ctx)
            except UserError as exc:
                shown = ", ".join(f"{k}={v}" for k, v in ctx.items())
                raise SpaceError(f"{self.source}: the combination {shown} is invalid: {exc}") from None

    def models(self) -> set[str]:
        return {ctx["model"] for ctx in self.combinations()}

    def max_epochs(self) -> int:
        """The most epochs an STFPM trial of this space can run (ASHA's max_t); 0 without STFPM trials."""
        out = 0
        for ctx in self.combinations():
            if ctx["model"] == "stfpm":
                out = max(out, trial_configs(ctx)[1].epochs)
        return out


def trial_configs(sample: Mapping[str, Any], *, seed: int = 0, val_fraction: float = 0.1, pretrained: bool = True,
                  weights: Mapping[str, str] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The ModelConfig and (resolved) TrainConfig of one sampled configuration; raises UserError if invalid."""
    if "model" not in sample:
        raise SpaceError("no model: fix it (`fixed: {model: padim}`) or search it (`model: {choice: [padim, stfpm]}`)")
    m = {k: sample[k] for k in MODEL_KEYS if k in sample}
    if "layers" in m:
        m["layers"] = tuple(m["layers"].split(","))
    cfg = ModelConfig(**m, seed=seed)
    t = {k: sample[k] for k in TRAIN_KEYS if k in sample}
    for k in ("epochs", "batch_size"):
        if k in t and t[k] < 1:
            raise SpaceError(f"{k} must be >= 1, got {t[k]}")
    tcfg = TrainConfig(**t, val_fraction=val_fraction, pretrained=pretrained,
                       weights_file=(weights or {}).get(cfg.backbone))
    return cfg, tcfg.resolved(cfg.model)


# ---------------------------------------------------------------------- parsing


def load_space(path: str | os.PathLike) -> SearchSpace:
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file {path} does not exist (see search_spaces/ for examples)")
    return parse_space(path.read_text(encoding="utf-8"), str(path))


def parse_space(text: str, source: str = "<search space>") -> SearchSpace:
    """Parse and validate a space (format: module docstring, search_spaces/README.md)."""
    import yaml

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
                raise SpaceError(f"{where}: a mapping in a choice list is only allowed for layers, as "
                                 "{subsets_of: [a, b, c], min_size: K}")
            base = [normalize("layers", [l], where) for l in item["subsets_of"]]
            k = item.get("min_size", 1)
            if not isinstance(k, int) or not 1 <= k <= len(base):
                raise SpaceError(f"{where}: min_size must be between 1 and {len(base)}, got {k!r}")
            out += [",".join(c) for r in range(k, len(base) + 1) for c in itertools.combinations(base, r)]
        else:
            out.append(normalize(name, item, where))
    return tuple(dict.fromkeys(out))  # order kept, duplicates dropped


def _parse_dimension(name: str, spec: Any, source: str, known: set[str], dims: Mapping[str, Dimension],
                     fixed: Mapping[str, Any]) -> Dimension:
    where = f"{source}, dimension {name}"
    if not isinstance(spec, dict):
        raise SpaceError(f"{where}: expected a mapping such as {{choice: [...]}} or {{int: [low, high]}}, got {spec!r}")
    unknown = sorted(set(spec) - set(DIMENSION_KEYS), key=str)
    if unknown:
        raise SpaceError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(DIMENSION_KEYS)})")
    kinds = [k for k in ("choice", "int", "float") if k in spec]
    if len(kinds) != 1:
        raise SpaceError(f"{where}: give exactly one of choice, int, float")
    kind = kinds[0]

    def ref(key: str) -> str:
        r = spec[key]
        if r not in known:
            raise SpaceError(f"{where}: `{key}: {r}` must name a setting fixed or searched above {name!r} "
                             f"(known here: {', '.join(sorted(known)) or 'none'})")
        return r

    when: dict[str, tuple] = {}
    if "when" in spec:
        if not isinstance(spec["when"], dict) or not spec["when"]:
            raise SpaceError(f"{where}: `when` must be a mapping such as {{model: stfpm}}")
        for k, v in spec["when"].items():
            if k not in known:
                raise SpaceError(f"{where}: `when: {{{k}: ...}}` must name a setting fixed or searched above {name!r}")
            when[k] = _values(k, v, f"{where}, when {k}")
    if kind == "choice":
        if any(k in spec for k in ("log", "step", "at_most", "at_least")):
            raise SpaceError(f"{where}: log/step/at_most/at_least apply to int and float dimensions only")
        if "by" in spec:
            parent = ref("by")
            if not isinstance(spec["choice"], dict) or not spec["choice"]:
                raise SpaceError(f"{where}: with `by: {parent}`, `choice` maps each value of {parent} to a list")
            options = {normalize(parent, k, f"{where}, choice key"): _choice_list(name, v, f"{where}, {parent}={k}")
                       for k, v in spec["choice"].items()}
            return Dimension(name, "choice", by=parent, options=options, when=when)
        return Dimension(name, "choice", choices=_choice_list(name, spec["choice"], where), when=when)
    if SETTINGS[name] not in ("int", "float"):
        raise SpaceError(f"{where}: {name} takes names, so it must be a `choice`")
    if kind == "int" and SETTINGS[name] != "int":
        raise SpaceError(f"{where}: {name} is a real number: use `float: [low, high]`")
    if kind == "float" and SETTINGS[name] != "float":
        raise SpaceError(f"{where}: {name} is an integer: use `int: [low, high]`")
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
            r = spec[key]
            if r in DERIVED:
                limits[key] = r
                continue
            r = ref(key)
            if SETTINGS[r] not in ("int", "float"):
                raise SpaceError(f"{where}: `{key}: {r}` must be numeric (or one of: {', '.join(DERIVED)})")
            limits[key] = r
    return Dimension(name, kind, low=low, high=high, log=log, step=step, when=when, **limits)


def preview(space: SearchSpace, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n configurations as the search's seeded TPE sampler would propose them (random objective values told
    back), without training: what `tune --dry-run` prints."""
    import optuna
    import numpy as np

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, float(rng.random()))
    return out
