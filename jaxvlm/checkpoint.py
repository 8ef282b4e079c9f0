"""The one Orbax path: saving and restoring `<workdir>/checkpoints/<step>/` (STYLE.md §8).

Each step holds four items: `state` (a pytree of arrays, sharded or not), `data_iter` (the grain
iterator state), `config` and `manifest` (the frozen sources, see `jaxvlm.manifest`), the last
three as JSON. No pickle is written or read anywhere: Orbax stores arrays as tensorstore/OCDBT
and the rest as JSON, so reading a checkpoint never executes code.

Restores go into an abstract state (a pytree of `jax.ShapeDtypeStruct` carrying the *current*
mesh's shardings), so a checkpoint saved on one mesh restores on another device count. Shapes
are compared with the checkpoint's stored metadata first, so a mismatch names every leaf instead
of failing deep inside tensorstore.

Trainable-only saves (the default): the caller puts `split_params(params, mask)[0]` into `state`
and rebuilds the full tree with `merge_params(trainable, frozen)` after loading the frozen part
from the sources the manifest names.

Crash safety comes from Orbax: a step is written into `<step>.orbax-checkpoint-tmp` and renamed
when finalised, so a crash mid-save leaves no visible step; such leftovers are removed when a
writable `Checkpointer` opens the directory.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxvlm.manifest import (
    FrozenSourceError,
    detect_source_kind,
    hash_cache_path,
    make_manifest,
    source_entry,
    verify_manifest,
)
from jaxvlm.param_paths import (
    abbreviated,
    flatten_params,
    merge_params,
    path_string,
    split_params,
    unflatten_params,
)

__all__ = [
    "Checkpointer",
    "FrozenSourceError",
    "Restored",
    "check_compatible",
    "detect_source_kind",
    "flatten_params",
    "hash_cache_path",
    "make_manifest",
    "merge_params",
    "source_entry",
    "split_params",
    "unflatten_params",
    "verify_manifest",
]

ITEM_NAMES = ("state", "data_iter", "config", "manifest")
_MISSING = object()


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `Checkpointer.restore` returns; `data_iter` has the type saved (dict, str or bytes)."""

    step: int
    state: Any
    data_iter: dict | str | bytes
    config: dict
    manifest: dict


class Checkpointer:
    """Saves and restores steps of one workdir; also a context manager (`close` on exit).

    Saving a step that already exists is skipped (`save` logs it and returns False) unless
    `force=True`, which replaces it. With `async_save` the arrays are copied off the devices before
    `save` returns (so the caller may donate its buffers) and written in the background; an error
    raised there surfaces at the next `save`, `wait_until_finished` or `close`.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(workdir).expanduser().absolute() / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(
                f"no checkpoints in {self.directory.parent}: {self.directory} is missing"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not read_only,
            read_only=read_only,
            # Removes `<step>.orbax-checkpoint-tmp` directories left by a crash mid-save.
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
        )
        # Handlers, not just item names: with names alone a fresh process cannot read item metadata.
        handlers = {"state": ocp.StandardCheckpointHandler()}
        handlers.update({name: ocp.JsonCheckpointHandler() for name in ITEM_NAMES[1:]})
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def all_steps(self) -> list[int]:
        """Finalised steps on disk, ascending; an async save is listed once it is finalised."""
        if not self.directory.is_dir():
            return []
        return sorted(
            int(entry.name)
            for entry in self.directory.iterdir()
            if entry.name.isdigit() and entry.is_dir()
        )

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_iter: dict | str | bytes,
        config: Mapping[str, Any],
        manifest: Mapping[str, Any],
        force: bool = False,
    ) -> bool:
        """Saves one step; returns False when `step` exists and `force` is False (nothing written).

        `config` may be a dict or a `ConfigDict`; tuples are stored as JSON lists. The JSON items
        are checked here, so a value JSON cannot hold fails before anything is written.
        """
        step = int(step)
        json_items = {
            "data_iter": _encode_data_iter(data_iter),
            "config": _to_json_dict(config, "config"),
            "manifest": _to_json_dict(manifest, "manifest"),
        }
        if step in set(self.all_steps()) | set(self._manager.all_steps()):
            if not force:
                logging.info(
                    "checkpoint step %d already exists in %s; not saved", step, self.directory
                )
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            **{name: ocp.args.JsonSave(value) for name, value in json_items.items()},
        )
        # force=True bypasses Orbax's own policy, which silently skips steps below the latest one.
        self._manager.save(step, args=args, force=True)
        return True

    def restore(self, step: int | None = None, *, abstract_state: Any) -> Restored:
        """Restores `step` (None: the latest) onto the shardings carried by `abstract_state`."""
        step = self._resolve_step(step)
        self.check_shapes(step, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                **{name: ocp.args.JsonRestore() for name in ITEM_NAMES[1:]},
            ),
        )
        return Restored(
            step=step,
            state=restored["state"],
            data_iter=_decode_data_iter(restored["data_iter"]),
            config=restored["config"],
            manifest=restored["manifest"],
        )

    def read_config(self, step: int | None = None) -> dict:
        return self._read_json_item("config", step)

    def read_manifest(self, step: int | None = None) -> dict:
        return self._read_json_item("manifest", step)

    def read_data_iter(self, step: int | None = None) -> dict | str | bytes:
        return _decode_data_iter(self._read_json_item("data_iter", step))

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises ValueError naming every leaf whose saved shape differs from `abstract_state`'s,
        and every leaf present on one side only."""
        metadata = self._manager.item_metadata(step)["state"]
        saved = _leaf_shapes(metadata.tree if hasattr(metadata, "tree") else metadata)
        current = _leaf_shapes(abstract_state)
        problems = [
            f"{name}: checkpoint {saved[name]}, current {current[name]}"
            for name in sorted(saved.keys() & current.keys())
            if saved[name] != current[name]
        ]
        if only_saved := sorted(saved.keys() - current.keys()):
            problems.append(f"only in the checkpoint: {abbreviated(only_saved)}")
        if only_current := sorted(current.keys() - saved.keys()):
            problems.append(f"only in the current state: {abbreviated(only_current)}")
        if problems:
            raise ValueError(
                f"checkpoint {self.directory / str(step)} does not fit the current state: "
                + "; ".join(problems)
            )

    def wait_until_finished(self) -> None:
        """Blocks until background saves are finalised; re-raises an error one of them hit."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
        finally:
            self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exception_info) -> None:
        self.close()

    def _resolve_step(self, step: int | None) -> int:
        self._manager.wait_until_finished()
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"no checkpoints in {self.directory}: it holds no finished step"
            )
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(
                f"step {step} not found in {self.directory}; steps that exist: "
                + ", ".join(map(str, steps))
            )
        return int(step)

    def _read_json_item(self, name: str, step: int | None) -> dict:
        step = self._resolve_step(step)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()})
        )
        return restored[name]


def check_compatible(
    saved_config: Mapping[str, Any], current_config: Mapping[str, Any], keys: Sequence[str]
) -> None:
    """Raises ValueError naming every dotted key (e.g. "llm.dim") whose value differs between the
    checkpoint's config and the current one, with both values. Lists and tuples compare equal."""
    differences = []
    for key in keys:
        saved, current = _lookup(saved_config, key), _lookup(current_config, key)
        if _comparable(saved) != _comparable(current):
            differences.append(f"{key}: checkpoint {_shown(saved)}, current {_shown(current)}")
    if differences:
        raise ValueError(
            "the checkpoint's model shape differs from the current config: "
            + "; ".join(differences)
        )


def _encode_data_iter(data_iter: dict | str | bytes) -> dict:
    """grain's dataset iterators give a dict, its DataLoader iterator JSON bytes: keep the type."""
    if isinstance(data_iter, bytes):
        return {"kind": "bytes", "value": base64.b64encode(data_iter).decode("ascii")}
    if isinstance(data_iter, str):
        return {"kind": "str", "value": data_iter}
    return {"kind": "dict", "value": _to_json_dict(data_iter, "data_iter")}


def _decode_data_iter(stored: dict) -> dict | str | bytes:
    if stored["kind"] == "bytes":
        return base64.b64decode(stored["value"])
    return stored["value"]


def _to_json_dict(value: Any, item: str) -> dict:
    """A JSON round trip of `value` (a mapping or ConfigDict), so what is saved is what restores."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if not isinstance(value, Mapping):
        raise TypeError(f"checkpoint item {item!r} must be a dict, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError) as error:
        raise TypeError(f"checkpoint item {item!r} is not JSON-serialisable: {error}") from None


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """`{"a/b/0/c": shape}` for every array leaf; typed PRNG keys count as their key data."""
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        shapes[path_string(path)] = tuple(getattr(leaf, "shape", ()) or ())
    return shapes


def _lookup(config: Any, dotted_key: str) -> Any:
    node = config
    for part in dotted_key.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def _comparable(value: Any) -> Any:
    if value is _MISSING:
        return value
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.loads(json.dumps(value, default=repr))


def _shown(value: Any) -> str:
    return "<missing>" if value is _MISSING else repr(value)


def resolve_checkpoint_path(path: str | Path) -> tuple[Path, int | None]:
    """A jaxvlm workdir (latest step) or `<workdir>/checkpoints/<step>` → (workdir, step or None)."""
    path = Path(path).expanduser().absolute()
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, None
    raise FileNotFoundError(
        f"{path} is neither a jaxvlm workdir (with checkpoints/) nor a checkpoints/<step> directory"
    )


def read_params(path: str | Path, step: int | None = None) -> dict[str, Any]:
    """The parameters a jaxvlm checkpoint holds, as flat `{"a/b/c": numpy array}` on the host.

    For a trainable-only checkpoint these are the trainable parameters alone (the rest come from the
    sources its manifest names).
    """
    import numpy as np

    workdir, path_step = resolve_checkpoint_path(path)
    with Checkpointer(workdir, read_only=True) as checkpointer:
        step = checkpointer._resolve_step(step if step is not None else path_step)
        metadata = checkpointer._manager.item_metadata(step)["state"]
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), tree
        )
        restored = checkpointer._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    return {name: np.asarray(value) for name, value in restored["state"]["params"].items()}
