"""The Serve model registry: IR folders (local, or in shared storage) named and versioned at start-up.

A request names a model; the registry says which export that is, and each replica gets a local copy of it
(downloaded once per node and export version for storage URIs).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distributed_anomaly import storage
from distributed_anomaly.errors import UserError
from distributed_anomaly.irformat import (
    IR_FILES,
    METADATA,
    VERSION_FILES,
    check_ir_files,
    check_model_bin,
    describe_ir,
    is_ir_dir,
    model_version,
)

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class ModelEntry:
    """One servable IR folder: a request names it by `name`; `version` identifies the exact export."""

    name: str
    path: str
    version: str
    info: dict = field(default_factory=dict)  # the metadata fields /metadata shows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelEntry:
        return cls(str(d["name"]), str(d["path"]), str(d["version"]), dict(d.get("info") or {}))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "path": self.path, **self.info}


def _split_named(spec: str) -> tuple[str | None, str]:
    """'NAME=PATH' -> (NAME, PATH); a plain path (even one containing '=') -> (None, PATH)."""
    name, sep, path = spec.partition("=")
    if sep and MODEL_NAME_RE.match(name) and not Path(spec).exists():
        return name, path
    return None, spec


def discover_models(specs: Iterable[str | os.PathLike]) -> dict[str, ModelEntry]:
    """IR folders, folders of IR folders, or NAME=IR_DIR -> {name: entry}, in the order given.

    A model is named after its folder (`ir/washer_padim` -> `washer_padim`) unless NAME= is given; a
    factory serving one model per product names the folders after the products. Duplicate or unusable
    names are refused here, at start-up, rather than by a confusing 404 later.
    """
    entries: dict[str, ModelEntry] = {}
    for spec in specs:
        name, raw = _split_named(os.fspath(spec))
        if storage.is_uri(raw):  # one IR folder in shared storage: every replica, on any node, fetches it
            uri = storage.normalize(raw)
            model_name = name or storage.split_last(uri)[1]
            _check_name(model_name, uri, entries)
            entries[model_name] = _remote_entry(model_name, uri)
            continue
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise UserError(f"--model {raw}: no such folder (expected an IR folder written by `export`)")
        if is_ir_dir(path):
            found = [(name or path.resolve().name, path)]
        else:
            if name is not None:
                raise UserError(f"--model {spec}: {raw} is not an IR folder (no model.xml); NAME= names one export")
            found = [(p.name, p) for p in sorted(path.iterdir()) if p.is_dir() and is_ir_dir(p)]
            if not found:
                raise UserError(f"--model {raw}: neither an IR folder (model.xml) nor a folder of IR folders")
        for model_name, ir in found:
            ir = ir.resolve()
            _check_name(model_name, str(ir), entries)
            check_ir_files(ir, {p.name for p in ir.iterdir() if p.is_file()})
            entries[model_name] = ModelEntry(model_name, str(ir), model_version(ir), describe_ir(ir))
    if not entries:
        raise UserError("no model given: pass at least one IR folder written by `export`")
    return entries


def _remote_entry(model_name: str, uri: str) -> ModelEntry:
    """The entry of an export in storage, from its small files only: start-up does not download model.bin
    (the replicas do, once each, in local_ir)."""
    present = storage.files(uri)
    if present is None:
        raise UserError(f"--model {uri}: no such folder (expected an IR folder written by `export`)")
    if METADATA not in present and present & set(IR_FILES):  # the marker an upload writes last: a copy without
        # it is an unfinished one, not an export
        raise UserError(
            f"--model {uri}: no complete export there ({METADATA}, copied last, is missing: an interrupted "
            "upload? rerun the command that uploaded it)"
        )
    check_ir_files(uri, present)
    with tempfile.TemporaryDirectory(prefix="da-ir-head-") as tmp:
        head = storage.fetch(uri, VERSION_FILES, tmp)
        return ModelEntry(model_name, uri, model_version(head), describe_ir(head))


def _check_name(model_name: str, where: str, entries: Mapping[str, ModelEntry]) -> None:
    if not MODEL_NAME_RE.match(model_name):
        raise UserError(
            f"model name {model_name!r} (from {where}) must be letters, digits, '_', '.' or '-' "
            "(name it with NAME=IR_DIR)"
        )
    if model_name in entries:
        raise UserError(
            f"two models are named {model_name!r} ({entries[model_name].path} and {where}); name one with NAME=IR_DIR"
        )


def local_ir(path: str, version: str | None = None) -> Path:
    """The IR folder on this machine: a local path as is; a storage URI's copy in the local model cache
    ($DISTRIBUTED_ANOMALY_CACHE, default ~/.cache/distributed_anomaly/models), downloaded once per export.
    With `version`, a copy of another export (the URI was re-exported since start-up) is refused."""
    if not storage.is_uri(path):
        return Path(path)
    cache = Path(os.environ.get("DISTRIBUTED_ANOMALY_CACHE", "~/.cache/distributed_anomaly")).expanduser() / "models"
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    if version and (cache / f"{key}-{version}" / METADATA).is_file():
        return cache / f"{key}-{version}"
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
    try:
        storage.download(path, tmp)
        found = model_version(tmp) if all((tmp / n).is_file() for n in VERSION_FILES) else None
        if found is None:
            raise UserError(f"{path} is not an IR folder written by `export` (no {', '.join(VERSION_FILES)})")
        if version and found != version:
            raise UserError(f"{path} now holds another export (version {found}, served {version}): redeploy")
        check_model_bin(tmp)  # the weights are the ones the version names (not a truncated or mixed copy)
        final = cache / f"{key}-{found}"
        try:
            os.replace(tmp, final)  # atomic: a replica never compiles a half-downloaded model
        except OSError:  # another replica on this node got there first: the same export, the same files
            pass
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
