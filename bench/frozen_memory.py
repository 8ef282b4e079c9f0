"""Frozen towers cost no gradient or optimizer memory: AOT memory analysis of the compiled train step.

    python bench/frozen_memory.py [--config configs/backbones_pretrain.py:model=vit]

Compiles the same train step twice — everything trainable, and the image tower frozen (locked-image
tuning) — and prints XLA's `memory_analysis()` of each with the ratios. With the tower frozen, the
optimizer state shrinks by the tower's two Adam moments and the temporaries by its gradients.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp


def analyse(spec: str, trainable: tuple[str, ...] | None):
    from jaxvlm import config_utils, initialization, models, objectives, sharding, train

    overrides = {"trainable": trainable} if trainable else {}
    config = config_utils.load_config(spec, overrides)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model = models.build_model(config)
    with tempfile.TemporaryDirectory() as workdir:
        setup = initialization.setup_state(config, model, mesh, Path(workdir), Path(workdir))
    size, length, batch = config.preprocessing.image_size, config.data.max_text_len, 32
    example = {
        "image": jnp.zeros((batch, size, size, 3)),
        "text_tokens": jnp.zeros((batch, length), jnp.int32),
        "text_mask": jnp.ones((batch, length), jnp.int32),
    }
    step = train.compile_train_step(
        model=model,
        tx=setup.tx,
        loss_fn=objectives.get_objective(config),
        trainable_mask=setup.trainable_mask,
        mesh=mesh,
        config=config,
        state_shardings=setup.shardings,
        batch_shardings=jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), example),
    )
    stats = train.memory_analysis(step, setup.state, example)
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(setup.state.opt_state))
    return {
        "temp": stats.temp_size_in_bytes,
        "arguments": stats.argument_size_in_bytes,
        "optimizer_state": opt_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/backbones_pretrain.py:model=vit")
    args = parser.parse_args()
    full = analyse(args.config, None)
    frozen = analyse(
        args.config,
        ("text_encoder/.*", "image_projection/.*", "text_projection/.*", "log_inverse_temperature"),
    )
    print(f"{'':18s}{'all trainable':>16s}{'image tower frozen':>20s}{'ratio':>8s}")
    for key in ("optimizer_state", "temp", "arguments"):
        print(
            f"{key:18s}{full[key] / 2**20:14.2f}Mi{frozen[key] / 2**20:18.2f}Mi"
            f"{frozen[key] / max(full[key], 1):8.2f}"
        )


if __name__ == "__main__":
    main()
