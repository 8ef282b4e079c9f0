"""The jaxvlm cache: worlds, pretrained backbones and compiled programs under one directory.

Layout (INTERFACES.md §2): `<cache>/worlds/<config-hash>/`, `<cache>/backbones/<config-hash>/`,
`<cache>/compilation/`, `<cache>/hashes.json` (sha256 sidecar of frozen sources). Only CLI entry points
turn `--cache-dir` / `$XDG_CACHE_HOME` into the directory; library code receives it as an argument.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

DEFAULT_CACHE_DIR = Path("~/.cache/jaxvlm")


def resolve(cache_dir: str | Path | None) -> Path:
    """An absolute cache directory (the default when None)."""
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser().absolute()


def from_cli(flag_value: str | None, environ: Mapping[str, str]) -> Path:
    """`--cache-dir` wins; else `$XDG_CACHE_HOME/jaxvlm`; else `~/.cache/jaxvlm`."""
    if flag_value:
        return resolve(flag_value)
    xdg = environ.get("XDG_CACHE_HOME")
    return resolve(Path(xdg) / "jaxvlm" if xdg else None)


def worlds_dir(cache_dir: Path) -> Path:
    return cache_dir / "worlds"


def backbones_dir(cache_dir: Path) -> Path:
    return cache_dir / "backbones"


def hash_cache_path(cache_dir: Path) -> Path:
    return cache_dir / "hashes.json"


def enable_compilation_cache(cache_dir: Path) -> None:
    """Turns on JAX's persistent compilation cache (called by CLI entry points, never at import)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir / "compilation"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
