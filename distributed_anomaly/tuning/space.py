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
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from distributed_anomaly.config import ModelConfig, TrainConfig
from distributed_anomaly.data.sizes import parse_size, size_text
from distributed_anomaly.errors import UserError
from distributed_anomaly.models.specs import DEFAULT_BACKBONE, default_layers, get_spec

# Every setting a space may fix or search, and the kind of its values.
SETTINGS: dict[str, str] = {
    "model": "str",
    "backbone": "str",
    "layers": "layers",
    "n_features": "int",
    "image_size": "int",
    "coreset_ratio": "float",
    "num_neighbors": "int",
    "epochs": "int",
    "batch_size": "int",
    "lr": "float",
    "momentum": "float",
    "weight_decay": "float",
    "patience": "int",
}
MODEL_KEYS = ("model", "backbone", "layers", "n_features", "image_size", "coreset_ratio", "num_neighbors")
TRAIN_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "patience")
# Quantities derived from earlier choices that a bound may refer to.
DERIVED = {
    "channels": "total channels of the chosen layers on the chosen backbone (PADIM's and PatchCore's n_features bound)"
}
DIMENSION_KEYS = ("choice", "by", "int", "float", "log", "step", "at_most", "at_least", "when")
TOP_KEYS = ("version", "description", "fixed", "dimensions")
MAX_COMBINATIONS = 100_000


class SpaceError(UserError):
    """A search space file (or a --fix) that cannot be used; the message names the file and the dimension."""


def normalize(name: str, value: Any, where: str = "") -> Any:
    """A setting's value in canonical form: layers as "a,b,c", ints as int, floats as float, strings as str;
    image_size also as "HxW" (a non-square size; a square one is its int)."""
    kind = SETTINGS[name]
    prefix = f"{where}: " if where else ""
    if name == "image_size" and isinstance(value, str) and re.search(r"\d\s*[xX×]\s*\d", value):
        try:
            size = parse_size(value)
        except UserError as exc:
            raise SpaceError(f"{prefix}{exc}") from None
        return size if isinstance(size, int) else size_text(size)
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
    layers = ctx["layers"].split(",") if ctx.get("layers") else default_layers(spec, ctx.get("model", "padim"))
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
            raise SpaceError(
                f"dimension {self.name!r}: its range [{self.low:g}, {self.high:g}] is empty under its "
                f"constraints ({self._constraint_text()}) when {given}"
            )
        return (int(lo), int(hi)) if self.kind == "int" else (lo, hi)

    def _constraint_text(self) -> str:
        parts = [
            f"{self.name} <= {self.at_most}" if self.at_most else "",
            f"{self.name} >= {self.at_least}" if self.at_least else "",
        ]
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
            text = (
                f"one of {', '.join(map(str, self.choices))}"
                if self.by is None
                else f"per {self.by}: " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in self.options.items())
            )
        else:
            text = (
                f"{self.kind} in [{self.low:g}, {self.high:g}]"
                + (" (log)" if self.log else "")
                + (f" step {self.step:g}" if self.step else "")
            )
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

    def fix(self, assignments: Sequence[str]) -> SearchSpace:
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
                raise SpaceError(
                    f"--fix {text!r}: {self.source} has no dimension {name!r} (dimensions: "
                    f"{', '.join(d.name for d in dims) or 'none'}; fixed: {', '.join(fixed) or 'none'})"
                )
            d = dims[idx]
            value = normalize(name, raw, f"--fix {text}")
            if d.kind == "choice":
                allowed = d.choices if d.by is None else tuple(dict.fromkeys(itertools.chain(*d.options.values())))
                if value not in allowed:
                    raise SpaceError(
                        f"--fix {text!r}: {value} is not among the choices of {name!r} in {self.source} "
                        f"({', '.join(map(str, allowed))})"
                    )
            elif d.kind in ("int", "float") and (isinstance(value, str) or not d.low <= value <= d.high):
                raise SpaceError(
                    f"--fix {text!r}: {value} is outside the range of {name!r} in {self.source} "
                    f"([{d.low:g}, {d.high:g}])"
                )
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
                    raise SpaceError(
                        f"{self.source}: more than {MAX_COMBINATIONS} combinations of choices; "
                        "split the space into several files"
                    )
                yield dict(ctx)
                return
            d = self.dimensions[i]
            if not d.applies(ctx):
                yield from walk(i + 1, ctx)
                return
            if d.kind == "const":
                if d.by is not None and d.value not in d.choices_for(ctx):
                    raise SpaceError(
                        f"{d.name}={d.value} is not among the choices for {d.by}={ctx.get(d.by)} in "
                        f"{self.source}; fix {d.by} as well"
                    )
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


def trial_configs(
    sample: Mapping[str, Any],
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    pretrained: bool = True,
    weights: Mapping[str, str] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """The ModelConfig and (resolved) TrainConfig of one sampled configuration; raises UserError if invalid."""
    if "model" not in sample:
        raise SpaceError("no model: fix it (`fixed: {model: padim}`) or search it (`model: {choice: [padim, stfpm]}`)")
    m = {k: sample[k] for k in MODEL_KEYS if k in sample}
    if "layers" in m:
        m["layers"] = tuple(m["layers"].split(","))
    if isinstance(m.get("image_size"), str):
        m["image_size"] = parse_size(m["image_size"])
    cfg = ModelConfig(**m, seed=seed)
    t = {k: sample[k] for k in TRAIN_KEYS if k in sample}
    for k in ("epochs", "batch_size"):
        if k in t and t[k] < 1:
            raise SpaceError(f"{k} must be >= 1, got {t[k]}")
    tcfg = TrainConfig(
        **t, val_fraction=val_fraction, pretrained=pretrained, weights_file=(weights or {}).get(cfg.backbone)
    )
    return cfg, tcfg.resolved(cfg.model)


def preview(space: SearchSpace, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n configurations as the search's seeded TPE sampler would propose them (random objective values told
    back), without training: what `tune --dry-run` prints."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(space.sample(trial))
        study.tell(trial, float(rng.random()))
    return out
