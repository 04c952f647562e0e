"""Where results go: a local folder, a shared mount (NFS) or an object-store URI, through pyarrow's filesystems.

Ray Train and Tune write their checkpoints and trial folders through the same pyarrow layer (their
`storage_path`), so one `--storage` value names one place for every writer, on every node: the Train workers
and Tune trials write there directly, and the driver copies its own files (run directories, search results,
the exported model) there with `upload`. Accepted: a local or mounted path ("/shared/runs"), "file://",
"s3://bucket/prefix" (options in the query string, e.g. "?endpoint_override=minio:9000&scheme=http"),
"gs://", "hdfs://", or any URI pyarrow's FileSystem.from_uri understands.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from distributed_anomaly.errors import UserError


def is_uri(location: str) -> bool:
    return "://" in location


def normalize(location: str | os.PathLike) -> str:
    """A URI as given (trailing slashes dropped); a local path made absolute (Ray needs absolute storage paths)."""
    location = str(location)
    if is_uri(location):
        head, sep, query = location.partition("?")
        return head.rstrip("/") + sep + query
    return str(Path(location).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """base/part/...; for a URI the parts go before its query string (s3://b/p?endpoint_override=... stays valid)."""
    if not is_uri(base):
        return str(Path(base, *parts))
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def counterpart(storage: str, local_dir: str | os.PathLike) -> str:
    """A local output folder's place in shared storage: STORAGE/<folder name> (run, TUNE_DIR or pipeline OUT)."""
    return join(normalize(storage), Path(local_dir).resolve().name)


def split_last(location: str) -> tuple[str, str]:
    """(parent, last name) of a path or URI, the query string staying with the parent."""
    if not is_uri(location):
        p = Path(location).resolve()
        return str(p.parent), p.name
    head, sep, query = location.partition("?")
    parent, _, name = head.rstrip("/").rpartition("/")
    return parent + sep + query, name


def filesystem(location: str):
    """(pyarrow FileSystem, path inside it) for a path or URI; a clear error for one pyarrow cannot open."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).resolve())
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as exc:  # ArrowInvalid (unknown scheme, bad query), OSError (no credentials, no connection)
        raise UserError(f"cannot open storage {location!r}: {exc}") from exc


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def files(location: str) -> set[str] | None:
    """The names of the files directly in the folder at location (one listing); None if no folder is there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    return {i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File}


def remove_tree(location: str) -> None:
    """Delete a folder and everything in it; nothing there is fine."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def upload(local: str | os.PathLike, location: str, marker: str | None = None) -> str:
    """Copy the contents of a local folder into location (created if needed; files there are replaced), or one
    local file to location (the file's own path or URI).

    Object stores have no folder rename, so a reader may see a partly copied folder while this runs. `marker`
    names the folder's completion file (config.json of a run, metadata.json of an export, summary.json of a
    search): the copy already there loses its marker first, every other file is copied, the marker last, so a
    folder without it is an unfinished copy (`complete` says no) and a rerun copies it again. The local folder
    stays the source of truth: every "is this stage finished?" decision reads it.
    """
    local = Path(local).resolve()
    fs, path = filesystem(location)
    if marker is not None and not (local / marker).is_file():
        raise UserError(f"{local} is not complete ({marker} is missing): nothing uploaded to {location}")
    try:
        fs.create_dir(path if local.is_dir() else path.rsplit("/", 1)[0], recursive=True)
        if marker is None:
            _copy(local, path, fs)
            return location
        target = f"{path.rstrip('/')}/{marker}"
        if fs.get_file_info(target).type != pafs.FileType.NotFound:
            fs.delete_file(target)  # from now on the copy there reads as unfinished
        for entry in sorted(local.iterdir()):
            if entry.name != marker:
                _copy(entry, f"{path.rstrip('/')}/{entry.name}", fs)
        _copy(local / marker, target, fs)
    except OSError as exc:
        raise UserError(f"cannot write to storage {location}: {exc}") from exc
    return location


def _copy(local: Path, path: str, fs) -> None:
    if local.is_dir():
        fs.create_dir(path, recursive=True)  # copy_files creates the folders below path, not path itself
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def complete(location: str, marker: str) -> bool:
    """A folder uploaded with `upload(..., marker)` that finished: its marker is there."""
    return exists(join(location, marker))


def read_bytes(location: str) -> bytes | None:
    """The contents of one (small) file at location; None if nothing is there."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as src:
            return src.read()
    except OSError as exc:
        raise UserError(f"cannot read {location}: {exc}") from exc


def download(location: str, local_dir: str | os.PathLike) -> Path:
    """Copy the contents of a folder at location into local_dir (created); returns local_dir."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise UserError(f"{location} is not a folder (nothing there, or a file)")
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    try:
        pafs.copy_files(path, str(local.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as exc:
        raise UserError(f"cannot read storage {location}: {exc}") from exc
    return local


def fetch(location: str, names: tuple[str, ...], local_dir: str | os.PathLike) -> Path:
    """Copy the named files of the folder at location into local_dir (the small files of a model, not all)."""
    fs, path = filesystem(location)
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    for name in names:
        try:
            with fs.open_input_stream(f"{path.rstrip('/')}/{name}") as src:
                (local / name).write_bytes(src.read())
        except OSError as exc:
            raise UserError(f"cannot read {join(location, name)}: {exc}") from exc
    return local


def list_tree(location: str) -> list[str]:
    """The files below the folder at location, as sorted '/'-separated paths relative to it (one recursive
    listing; names starting with '.' at any level are left out: temporary files of an unfinished write)."""
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise UserError(f"{location} is not a folder (nothing there, or a file)")
    base = path.rstrip("/") + "/"
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as exc:
        raise UserError(f"cannot list {location}: {exc}") from exc
    rel = [
        i.path[len(base) :] if i.path.startswith(base) else i.base_name for i in infos if i.type == pafs.FileType.File
    ]
    return sorted(r for r in rel if not any(part.startswith(".") for part in r.split("/")))


def put_bytes(location: str, data: bytes) -> str:
    """Write one file at location (parent folders created) under a temporary '.' name, then move it into place:
    a reader never sees half a file (object stores: the move is a copy, the temporary name is still hidden)."""
    fs, path = filesystem(location)
    parent, _, name = path.rstrip("/").rpartition("/")
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(tmp) as dst:
            dst.write(data)
        fs.move(tmp, path)
    except OSError as exc:
        raise UserError(f"cannot write {location}: {exc}") from exc
    return location
