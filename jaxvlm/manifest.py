"""The manifest of frozen sources a trainable-only checkpoint depends on (INTERFACES.md §2).

A trainable-only checkpoint holds what training changed; the frozen weights come from their
sources (a Hugging Face directory, a `.gguf` file, or another jaxvlm workdir / checkpoint). The
manifest records each source's absolute path, its kind and a sha256 per file, so that a later
load fails loudly when a source moved or changed instead of silently rebuilding a different
model:

    {"format_version": 1,
     "sources": {"llm": {"path": "/abs/model.gguf", "kind": "gguf",
                         "files": {"model.gguf": "<sha256>"}}}}

Hashing a multi-GB file takes seconds, so hashes are cached in one JSON file keyed by (path,
size, mtime); `verify_manifest(..., full=True)` (the CLIs' `--verify`) re-hashes everything. The
cache lives where the caller says (e.g. `<cache-dir>/hashes.json`), never beside the sources,
which may be read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
SOURCE_KINDS = ("hf", "gguf", "jaxvlm")
DEFAULT_HASH_CACHE_PATH = Path("~/.cache/jaxvlm/hashes.json")
# Files a jaxvlm run keeps appending to or rewriting; they are logs, not model content.
RUN_LOG_NAMES = frozenset({"metrics.jsonl", "tensorboard"})
# Orbax writes a step into `<step>.orbax-checkpoint-tmp...` and renames it when finalised.
ORBAX_TMP_MARKER = ".orbax-checkpoint-tmp"
_CHUNK_BYTES = 1 << 20


class FrozenSourceError(ValueError):
    """A frozen source named in a manifest is missing or its content changed."""


def hash_cache_path(cache_dir: str | os.PathLike) -> Path:
    """Where the hash cache lives inside a `--cache-dir`."""
    return Path(cache_dir) / "hashes.json"


class HashCache:
    """sha256 per file, keyed by absolute path and valid while (size, mtime_ns) are unchanged."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path if path is not None else DEFAULT_HASH_CACHE_PATH).expanduser()
        self.entries: dict[str, dict[str, Any]] = {}
        self.changed = False
        if self.path.is_file():
            try:
                self.entries = dict(json.loads(self.path.read_text()))
            except (OSError, ValueError) as error:  # A corrupt cache only costs re-hashing.
                logging.warning("ignoring unreadable hash cache %s: %s", self.path, error)

    def sha256(self, file: Path, *, use_cache: bool = True) -> str:
        """The file's sha256, from the cache when its size and mtime match the cached entry."""
        key = os.path.abspath(file)
        status = os.stat(key)
        cached = self.entries.get(key)
        if (
            use_cache
            and cached is not None
            and cached.get("size") == status.st_size
            and cached.get("mtime_ns") == status.st_mtime_ns
        ):
            return cached["sha256"]
        digest = sha256_file(key)
        self.entries[key] = {
            "size": status.st_size,
            "mtime_ns": status.st_mtime_ns,
            "sha256": digest,
        }
        self.changed = True
        return digest

    def save(self) -> None:
        """Writes the cache atomically; a cache that cannot be written is only a warning."""
        if not self.changed:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
            with os.fdopen(handle, "w") as stream:
                json.dump(self.entries, stream, indent=0, sort_keys=True)
            os.replace(temporary, self.path)
            self.changed = False
        except OSError as error:
            logging.warning("could not write hash cache %s: %s", self.path, error)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def detect_source_kind(path: str | os.PathLike) -> str:
    """ "gguf" for a `.gguf` file, "jaxvlm" for one of our workdirs or step directories, "hf" for a
    directory holding `config.json`; anything else is an error naming the path."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        if (path / "checkpoints").is_dir() or (path / "state").is_dir():
            return "jaxvlm"
        if (path / "config.json").is_file():
            return "hf"
    raise FrozenSourceError(
        f"{path} is not a frozen source: expected a .gguf file, a Hugging Face directory "
        "(config.json + safetensors) or a jaxvlm workdir / checkpoint directory"
    )


def _source_files(root: Path, kind: str) -> Iterator[Path]:
    """The files whose content defines a source, sorted; hidden files and run logs are skipped."""
    if kind == "gguf":
        yield root
        return
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(
            name
            for name in subdirectories
            if not name.startswith(".")
            and ORBAX_TMP_MARKER not in name
            and not (kind == "jaxvlm" and name in RUN_LOG_NAMES)
        )
        for name in sorted(names):
            if name.startswith(".") or (kind == "jaxvlm" and name in RUN_LOG_NAMES):
                continue
            yield Path(directory) / name


def _relative_name(file: Path, root: Path, kind: str) -> str:
    return file.name if kind == "gguf" else file.relative_to(root).as_posix()


def source_entry(
    path: str | os.PathLike,
    kind: str | None = None,
    *,
    hash_cache_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """`{"path": absolute, "kind": kind, "files": {relative_name: sha256}}` for one frozen source.

    `kind` is "hf", "gguf" or "jaxvlm", detected when None. Hidden files and directories are
    skipped. A jaxvlm source may be a whole workdir (every file except `metrics.jsonl`,
    `tensorboard/` and unfinished Orbax steps) or one `checkpoints/<step>` directory — the latter
    pins the step, so later training in that workdir does not invalidate the manifest.
    """
    absolute = Path(os.path.abspath(Path(path).expanduser()))
    if not absolute.exists():
        raise FrozenSourceError(f"frozen source {absolute} does not exist")
    kind = detect_source_kind(absolute) if kind is None else kind
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {kind!r} for {absolute}")
    if (kind == "gguf") != absolute.is_file():
        expected = "a file" if kind == "gguf" else "a directory"
        raise FrozenSourceError(f"a {kind!r} source must be {expected}, got {absolute}")
    cache = HashCache(hash_cache_path)
    files = {
        _relative_name(file, absolute, kind): cache.sha256(file)
        for file in _source_files(absolute, kind)
    }
    cache.save()
    if not files:
        raise FrozenSourceError(f"frozen source {absolute} ({kind}) holds no files")
    return {"path": str(absolute), "kind": kind, "files": files}


def make_manifest(sources: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """`{"format_version": 1, "sources": {component: source_entry, ...}}` (components sorted)."""
    for component, entry in sources.items():
        missing = {"path", "kind", "files"} - set(entry)
        if missing:
            raise ValueError(f"manifest source {component!r} lacks {sorted(missing)}")
    return {
        "format_version": FORMAT_VERSION,
        "sources": {name: dict(sources[name]) for name in sorted(sources)},
    }


def verify_manifest(
    manifest: Mapping[str, Any],
    *,
    full: bool = False,
    hash_cache_path: str | os.PathLike | None = None,
) -> None:
    """Raises `FrozenSourceError` (one line) naming every component whose file is missing or
    changed. `full=True` re-hashes every file, ignoring the cache (then refreshed with the new
    hashes); otherwise a file whose size and mtime match the cache is not read.
    """
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FrozenSourceError(
            f"manifest format_version {version!r} is not supported "
            f"(this jaxvlm reads {FORMAT_VERSION})"
        )
    cache = HashCache(hash_cache_path)
    problems = []
    for component, entry in manifest["sources"].items():
        root = Path(entry["path"])
        where = f"frozen source {component!r} ({entry['kind']} {root})"
        if not root.exists():
            problems.append(f"{where} is missing")
            continue
        for name, recorded in entry["files"].items():
            file = root if entry["kind"] == "gguf" else root / name
            if not file.is_file():
                problems.append(f"{where}: file {name} is missing")
                continue
            current = cache.sha256(file, use_cache=not full)
            if current != recorded:
                problems.append(
                    f"{where}: file {name} changed (sha256 {recorded[:12]}… recorded, "
                    f"{current[:12]}… now)"
                )
    cache.save()
    if problems:
        raise FrozenSourceError(
            "; ".join(problems) + " — restore the original files or re-run the stage that used them"
        )
