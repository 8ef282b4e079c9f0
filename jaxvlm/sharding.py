"""The one place that says how arrays are laid out on devices.

The mesh has three axes, `MESH_AXES = ("data", "fsdp", "tensor")`. Every parameter carries logical axis
names from the closed vocabulary `LOGICAL_AXES`; `LOGICAL_AXIS_RULES` maps them to mesh axes. A config only
chooses the mesh shape (`config.mesh = dict(data=-1, fsdp=1, tensor=1)`); changing a rule is a reviewed
edit of the table below, never a config knob.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The axes a global batch is split over (data parallel and fully-sharded data parallel alike).
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXES = (
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv",
    "vocab",
    "queries",
    "patches",
    "layers",
    "media",
)

# Rule order matters: for each logical name flax takes the first rule whose mesh axis is not yet used
# by another dimension of the same array. Parameters are sharded over `fsdp` on their embedding
# dimension (ZeRO-3 style) and over `tensor` on their head / MLP / vocabulary dimension (Megatron
# style); activations are sharded over both batch axes. Names mapped to None stay replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("queries", None),
    ("patches", None),
    ("layers", None),
    ("media", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves `config.mesh` (one axis may be -1: "the rest") to a shape whose product is `num_devices`."""
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ValueError(
            f"config.mesh has unknown axes {sorted(unknown)}; the axes are {MESH_AXES}"
        )
    sizes = [int(mesh_config[name]) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(
            f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes, strict=True))}"
        )
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes, strict=True))}"
        )
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, sizes, strict=True))}: {num_devices} devices are not divisible "
                f"by the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes, strict=True))} has {math.prod(sizes)} devices but "
            f"{num_devices} are available; the product of the mesh axes must equal the device count"
        )
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh.

    Axis types are Auto on purpose: jax 0.10.2 defaults `jax.make_mesh` to Explicit axes, which turns
    shardings into types and rejects the GSPMD-style propagation the rest of the code relies on.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    device_array = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_sharding(logical_spec: Sequence[str | None] | None, mesh: Mesh) -> NamedSharding:
    """One array's logical axis names → its NamedSharding on `mesh`."""
    if logical_spec is None:
        return NamedSharding(mesh, PartitionSpec())
    spec = nn.logical_to_mesh_axes(tuple(logical_spec), LOGICAL_AXIS_RULES)
    return NamedSharding(mesh, _drop_trivial_axes(spec, mesh))


def _drop_trivial_axes(spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
    """Keeps specs printable and stable: mesh axes of size 1 shard nothing."""
    out = []
    for entry in spec:
        names = entry if isinstance(entry, tuple) else (entry,)
        names = tuple(n for n in names if n is not None and mesh.shape[n] > 1)
        out.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*out)


def tree_shardings(abstract_tree, mesh: Mesh):
    """Shardings for a tree of (possibly `nn.Partitioned`-boxed) leaves.

    Boxed leaves use their logical names; unboxed leaves (step counters, rng keys, optimizer counts)
    are replicated. The result has the structure of `nn.unbox(abstract_tree)`.
    """

    def leaf_sharding(leaf):
        if isinstance(leaf, nn.Partitioned):
            return logical_to_sharding(leaf.names, mesh)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(
        leaf_sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )


def logical_specs(boxed_tree):
    """The logical names of every boxed leaf (None for unboxed ones), in the unboxed structure."""
    return jax.tree.map(
        lambda leaf: tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None,
        boxed_tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading dimension split over the batch axes, the rest replicated."""
    batch_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    lead = None if not batch_axes else batch_axes[0] if len(batch_axes) == 1 else batch_axes
    return NamedSharding(mesh, PartitionSpec(lead, *([None] * (ndim - 1))))


def batch_shardings(mesh: Mesh, batch) -> dict:
    """A batch sharding per leaf of `batch` (a dict of arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: batch_sharding(mesh, np.ndim(x) or len(x.shape)), batch)


def num_batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(
    global_batch: int, mesh: Mesh, what: str = "config.data.batch_size"
) -> None:
    shards = num_batch_shards(mesh)
    if global_batch % shards:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the mesh's batch axes "
            f"(data × fsdp = {shards}); choose a multiple of {shards}"
        )


def with_gathered_batch(fn: Callable, mesh: Mesh, num_local_args: int) -> Callable:
    """Wraps `fn(*local_args, *gathered_args)` in a `shard_map` over the batch axes.

    Each device sees its own batch shard of the first `num_local_args` arguments and, for the remaining
    arguments, the batch **all-gathered across every batch axis** (contrastive negatives: CLIP, BLIP-2
    ITC). `fn` returns per-example values `[b, ...]` for its local rows; the wrapper returns them
    re-assembled as a global `[B, ...]` array, so the caller averages exactly as on one device. Also
    returns, as `fn`'s second argument group, the global row offset of the local shard so `fn` can find
    the positive pairs inside the gathered batch.

    `fn(offset, *local_args, *gathered_args) -> per_example [b, ...]`.
    """
    batch_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    if not batch_axes:
        return lambda *args: fn(
            jnp.zeros((), jnp.int32), *args[:num_local_args], *args[num_local_args:]
        )

    batch_spec = PartitionSpec(batch_axes)

    def per_shard(*args):
        local, to_gather = args[:num_local_args], args[num_local_args:]
        gathered = [jax.lax.all_gather(x, batch_axes, axis=0, tiled=True) for x in to_gather]
        local_size = local[0].shape[0] if local else to_gather[0].shape[0]
        offset = jax.lax.axis_index(batch_axes) * local_size
        return fn(offset, *local, *gathered)

    def wrapped(*args):
        return jax.shard_map(
            per_shard,
            mesh=mesh,
            in_specs=tuple(batch_spec for _ in args),
            out_specs=batch_spec,
            check_vma=False,
        )(*args)

    return wrapped
