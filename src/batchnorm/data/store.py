"""Finding a data set's files on disk, verifying them, and downloading them into the cache.

Where :func:`locate` looks, in order (the first folder holding every file wins):

1. ``data_dir`` (the CLI's ``--data-dir``), if given — and then *only* there: a mistyped path is an
   error, not a silent download;
2. ``$BATCHNORM_DATA``;
3. folders where OS packages install the data set (e.g. Debian's ``/usr/share/datasets/...``);
4. the per-user cache, ``<cache root>/data/<name>`` (the cache root is ``$BATCHNORM_CACHE`` or
   ``~/.cache/batchnorm``, shared with the compiled kernels);
5. a download from the data set's mirrors into the cache, if ``download`` is true.

A folder given in 1 or 2 may hold the files itself or in a subfolder named after the data set
(``$BATCHNORM_DATA/mnist/``; CIFAR-10 also in ``cifar-10-batches-py/``, the folder its archive
unpacks to), so one root can serve several data sets.

Downloads are atomic: each file is written to a temporary file next to its destination, its content
md5 is verified, and only then is it renamed into place; a failed or interrupted download leaves
nothing behind. A data set distributed as one archive (CIFAR-10) is downloaded to a temporary file,
the archive's md5 is verified, and its files are extracted the same way, one by one; the archive is
deleted afterwards. Without network, the error lists every place that was searched and how to fix it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .._atomic import atomic_path
from .._cache import cache_root
from .idx import IdxError, read_bytes
from .sources import ArchiveSpec, DatasetSpec, FileSpec

__all__ = [
    "ENV_VAR",
    "ChecksumError",
    "CorruptFileError",
    "DataError",
    "DatasetNotFoundError",
    "cache_dir",
    "fetch",
    "locate",
    "read_verified",
]

ENV_VAR = "BATCHNORM_DATA"
_TIMEOUT_S = 30.0


class DataError(RuntimeError):
    """Base class of the data loader's errors; every message names the file and what to do."""


class DatasetNotFoundError(DataError):
    """The data set is in none of the places searched, and could not be downloaded."""


class CorruptFileError(DataError):
    """A file is there but truncated, corrupted, or not the expected content."""


class ChecksumError(CorruptFileError):
    """A file decompresses fine but its content md5 is not the data set's."""


def cache_dir(spec: DatasetSpec) -> Path:
    """The per-user cache folder of a data set."""
    return cache_root() / "data" / spec.name


def _find(folder: Path, f: FileSpec) -> Path | None:
    for name in f.names:
        if (folder / name).is_file():
            return folder / name
    return None


def _missing(folder: Path, spec: DatasetSpec) -> list[str]:
    return [f.name for f in spec.files.values() if _find(folder, f) is None]


def _describe(folder: Path, spec: DatasetSpec) -> str:
    if not folder.is_dir():
        return "no such folder"
    missing = _missing(folder, spec)
    return f"missing {', '.join(missing)}" if missing else "complete"


def _roots(folder: Path, spec: DatasetSpec) -> list[Path]:
    return [folder, folder / spec.name, *(folder / a for a in spec.aliases)]


def _fix(spec: DatasetSpec) -> str:
    names = ", ".join(f.name for f in spec.files.values())
    unpack = (
        f" (unpack {spec.archive.name}: they are in its {spec.archive.folder}/ folder)"
        if spec.archive
        else ""
    )
    return (
        f"To fix: put the files ({names}){unpack} in a folder and pass it with --data-dir (or "
        f"data_dir=...), or set {ENV_VAR} to it (or to a folder with a '{spec.name}/' subfolder), "
        f"or copy them into {cache_dir(spec)}; with network access they are downloaded there "
        "automatically."
    )


def locate(
    spec: DatasetSpec, data_dir: str | os.PathLike | None = None, *, download: bool = True
) -> Path:
    """The folder that holds every file of ``spec`` (see the module docstring for the search order).

    Raises :class:`DatasetNotFoundError` listing every place searched (and each download error).
    """
    if data_dir is not None:
        roots = _roots(Path(data_dir).expanduser(), spec)
        for root in roots:
            if root.is_dir() and not _missing(root, spec):
                return root
        looked = "\n".join(f"  - {r}: {_describe(r, spec)}" for r in roots)
        raise DatasetNotFoundError(
            f"{spec.name}: the folder given as data_dir/--data-dir does not hold the data set.\n"
            f"Looked in:\n{looked}\n"
            f"Point it at the folder with {', '.join(f.name for f in spec.files.values())} "
            "(gzip-compressed or not), or leave it out to search the usual places."
        )
    searched: list[tuple[str, Path]] = []
    env = os.environ.get(ENV_VAR)
    if env:
        searched += [(f"${ENV_VAR}", r) for r in _roots(Path(env).expanduser(), spec)]
    searched += [("installed by an OS package", Path(d)) for d in spec.system_dirs]
    searched.append(("per-user cache", cache_dir(spec)))
    for _, root in searched:
        if root.is_dir() and not _missing(root, spec):
            return root
    lines = [f"  - {r} ({how}): {_describe(r, spec)}" for how, r in searched]
    if not env:
        lines.insert(0, f"  - ${ENV_VAR}: not set")
    if download:
        try:
            return fetch(spec)
        except DatasetNotFoundError as exc:
            lines.append(f"  - download into {cache_dir(spec)}: failed\n{exc}")
    else:
        lines.append("  - download: not attempted (download=False / --no-download)")
    raise DatasetNotFoundError(
        f"{spec.name}: data set not found.\nLooked in:\n" + "\n".join(lines) + "\n" + _fix(spec)
    )


def read_verified(path: Path, f: FileSpec) -> bytes:
    """The decompressed content of ``path``, checked against ``f.content_md5``."""
    in_cache = cache_root().resolve() in path.resolve().parents
    todo = (
        "Delete it; the next run downloads it again."
        if in_cache
        else f"Replace it with a good copy of {f.name} (content md5 {f.content_md5})."
    )
    try:
        content = read_bytes(path)
    except IdxError as exc:
        raise CorruptFileError(f"{exc}. {todo}") from exc
    except OSError as exc:
        raise CorruptFileError(f"{path} cannot be read ({exc}). {todo}") from exc
    md5 = hashlib.md5(content).hexdigest()
    if md5 != f.content_md5:
        raise ChecksumError(
            f"{path} is not the expected file: its decompressed content has md5 {md5}, expected "
            f"{f.content_md5} ({len(content):,} bytes). It may be a different data set, a partial "
            f"download or damaged. {todo}"
        )
    return content


def fetch(spec: DatasetSpec, *, timeout: float = _TIMEOUT_S) -> Path:
    """Download the missing files of ``spec`` into its cache folder, verifying each; return the folder.

    Each file is tried from every mirror in turn. Files already in the cache are kept (they are
    verified when loaded). Raises :class:`DatasetNotFoundError` listing each failed attempt.
    """
    folder = cache_dir(spec)
    _remove_stale_parts(folder)
    errors: list[str] = []
    if spec.archive is not None:
        missing = [f for f in spec.files.values() if _find(folder, f) is None]
        if not missing:
            return folder
        for mirror in spec.mirrors:
            url = mirror + spec.archive.name
            try:
                _fetch_archive(url, folder, spec.archive, missing, timeout)
                return folder
            except (urllib.error.URLError, OSError, DataError, tarfile.TarError) as exc:
                reason = getattr(exc, "reason", None) or exc
                errors.append(f"      {url}: {reason}")
        if not spec.mirrors:
            errors.append(f"      {spec.archive.name}: no mirror is known for {spec.name}")
        raise DatasetNotFoundError("\n".join(errors))
    for f in spec.files.values():
        if _find(folder, f) is not None:
            continue
        for mirror in spec.mirrors:
            url = mirror + f.name
            try:
                _fetch_file(url, folder / f.name, f, timeout)
                break
            except (urllib.error.URLError, OSError, DataError) as exc:
                reason = getattr(exc, "reason", None) or exc
                errors.append(f"      {url}: {reason}")
        else:
            if not spec.mirrors:
                errors.append(f"      {f.name}: no mirror is known for {spec.name}")
            raise DatasetNotFoundError("\n".join(errors))
    return folder


def _remove_stale_parts(folder: Path, max_age_s: float = 3600.0) -> None:
    """Temporary files of downloads killed hard (SIGKILL, power loss) that no process still writes."""
    if not folder.is_dir():
        return
    now = time.time()
    for part in folder.glob(".*.part"):
        with contextlib.suppress(OSError):
            if now - part.stat().st_mtime > max_age_s:
                part.unlink()


def _fetch_file(url: str, dest: Path, f: FileSpec, timeout: float) -> None:
    with atomic_path(dest) as tmp:  # renamed into place only if no exception escapes
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        try:
            content = read_bytes(tmp)
        except IdxError as exc:
            raise CorruptFileError(f"the download is not a valid gzip file ({exc})") from exc
        md5 = hashlib.md5(content).hexdigest()
        if md5 != f.content_md5:
            raise ChecksumError(
                f"the download's content has md5 {md5}, expected {f.content_md5}; discarded"
            )


def _fetch_archive(
    url: str, folder: Path, archive: ArchiveSpec, files: list[FileSpec], timeout: float
) -> None:
    """Download ``url`` (a .tar.gz), check its md5, extract ``files`` from it (each verified)."""
    folder.mkdir(parents=True, exist_ok=True)
    # A temporary name that _remove_stale_parts recognizes, should this process be killed.
    tmp = folder / f".{archive.name}.{os.getpid()}.part"
    try:
        md5 = hashlib.md5()
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                out.write(chunk)
        if md5.hexdigest() != archive.md5:
            raise ChecksumError(
                f"the download has md5 {md5.hexdigest()}, expected {archive.md5}; discarded"
            )
        with tarfile.open(tmp, "r:gz") as tar:
            for f in files:
                member = f"{archive.folder}/{f.name}"
                try:
                    source = tar.extractfile(member)
                except KeyError:
                    source = None
                if source is None:
                    raise CorruptFileError(f"the archive has no file {member}")
                content = source.read()
                got = hashlib.md5(content).hexdigest()
                if got != f.content_md5:
                    raise ChecksumError(
                        f"{member} in the archive has md5 {got}, expected {f.content_md5}"
                    )
                with atomic_path(folder / f.name) as part:
                    part.write_bytes(content)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
