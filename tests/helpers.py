"""Shared test assertions: `from helpers import ...` (tests/ is on sys.path, as for conftest)."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import jax
import numpy as np

from jaxvlm import sharding

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


# The shrunk quickstart (conftest `quickstart_workdir`): tiny configs with enough LLaVA steps, a
# learning rate that moves a tiny LLM in them, and stage 2 on short-answer VQA turns only, so that
# in ~1 minute stage 2 learns the answer format the blind LLM never saw (scored on 40 questions).
def rewrite_safetensors(directory, change) -> None:
    """Rewrites an HF directory's model.safetensors with `change(tensors)` applied: it edits the
    dict of numpy arrays in place (whatever it returns), or returns a new dict."""
    from safetensors.numpy import save_file

    from jaxvlm.importers import HFCheckpoint

    checkpoint = HFCheckpoint(directory)
    tensors = {k: checkpoint.take(k) for k in checkpoint.keys()}
    changed = change(tensors)
    tensors = changed if isinstance(changed, dict) else tensors
    save_file(tensors, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})


def assert_parity(ours, reference, context: str = "") -> None:
    """INTERFACES.md §5: max |ours - ref| <= 1e-4 · max(1, max |ref|) (one bound for the array)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    assert ours.shape == reference.shape, f"shapes {ours.shape} vs {reference.shape} {context}"
    error = np.abs(ours - reference).max() if ours.size else 0.0
    bound = 1e-4 * max(1.0, np.abs(reference).max() if reference.size else 0.0)
    assert error <= bound, f"max |ours - ref| = {error:.3g} > {bound:.3g} {context}"


QUICKSTART_OVERRIDES = {
    "train.num_steps": 120,
    "optimizer.learning_rate": 3e-3,
    "evals.vqa.num_examples": 40,
    "data.instruction_mix.conversation": 0.0,
    "data.instruction_mix.detail": 0.0,
    "data.instruction_mix.complex_reasoning": 0.0,
    "data.instruction_mix.caption": 0.0,
}


def assert_logical_names(boxed_params, *, allow_none: bool = True) -> int:
    """Fails on any parameter that is not boxed with logical names from `sharding.LOGICAL_AXES`.

    Each boxed leaf needs one name per dimension; `None` (replicated on purpose, e.g. a conv
    kernel's spatial axes) is allowed unless `allow_none=False`. Returns the number of parameters
    checked.
    """
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    problems = []
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        if not isinstance(leaf, nn.Partitioned):
            problems.append(f"{where}: not boxed with nn.with_logical_partitioning")
            continue
        names = tuple(leaf.names)
        if len(names) != leaf.value.ndim:
            problems.append(f"{where}: {len(names)} names {names} for shape {leaf.value.shape}")
        unknown = [
            n for n in names if not (n is None and allow_none) and n not in sharding.LOGICAL_AXES
        ]
        if unknown:
            problems.append(
                f"{where}: unknown logical names {unknown} (known: {sharding.LOGICAL_AXES})"
            )
    assert not problems, "parameters without valid logical names:\n" + "\n".join(problems)
    assert leaves, "no parameters found"
    return len(leaves)
