"""Training: `TrainState`, the pure `train_step`, `compile_train_step`, `train(config, workdir)`, `main()`.

    python -m jaxvlm.train --config=configs/backbones_pretrain.py:model=lm,size=tiny --workdir=runs/lm

One loop serves every job (backbone pretraining, every bridge stage): what differs is config — the model
(`MODELS`), the objective (`OBJECTIVES`), the trainable regexes, the data task and the evaluators.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxvlm import (
    backbones,
    cache,
    checkpoint,
    config_utils,
    evals,
    importers,
    initialization,
    metric_writer,
    models,
    objectives,
    optim,
    sharding,
)
from jaxvlm import data as data_lib

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
    """Pure data: checkpointing and resharding are pytree operations."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def partition(tree, mask):
    """(leaves where mask is True, leaves where it is False), each with None in the other's places."""
    keep = jax.tree.map(lambda m, x: x if m else None, mask, tree)
    drop = jax.tree.map(lambda m, x: None if m else x, mask, tree)
    return keep, drop


def combine(mask, trainable, frozen):
    """Inverse of `partition`."""
    return jax.tree.map(
        lambda m, t, f: t if m else f, mask, trainable, frozen, is_leaf=lambda x: x is None
    )


def split_micro_batches(batch, num_micro: int):
    """`[B, ...]` → `[num_micro, B / num_micro, ...]`, micro-batch k = rows k, k+n, k+2n, ...

    Strided rather than contiguous, so every device keeps its own rows and no data moves.
    """

    def split(x):
        x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    return jax.tree.map(split, batch)


def train_step(state, batch, *, model, tx, loss_fn, trainable_mask, mesh, config):
    """One optimizer step over `config.train.grad_accum_steps` micro-batches.

    Gradients are taken only with respect to the trainable partition of the parameters; micro-batch
    gradients are combined weighted by each micro-batch's `metrics["weight"]` (its token or example
    count), so accumulation equals one large batch for token-averaged losses.
    """
    rng, step_rng = jax.random.split(state.rng)
    trainable, frozen = partition(state.params, trainable_mask)

    def weighted_loss(trainable_params, micro_batch, micro_rng):
        params = combine(trainable_mask, trainable_params, frozen)
        loss, metrics = loss_fn(model, params, micro_batch, micro_rng, mesh=mesh, config=config)
        return loss * metrics["weight"], metrics

    grad_fn = jax.grad(weighted_loss, has_aux=True)
    micro_batches = split_micro_batches(batch, config.train.grad_accum_steps)
    micro_rngs = jax.random.split(step_rng, config.train.grad_accum_steps)

    def accumulate(carry, inputs):
        grads, sums = carry
        micro_grads, metrics = grad_fn(trainable, *inputs)
        weight = metrics["weight"]
        sums = {k: sums[k] + (v if k == "weight" else v * weight) for k, v in metrics.items()}
        return (jax.tree.map(jnp.add, grads, micro_grads), sums), None

    first = (jax.tree.map(lambda x: x[0], micro_batches), micro_rngs[0])
    metric_shapes = jax.eval_shape(grad_fn, trainable, *first)[1]
    zeros = (
        jax.tree.map(jnp.zeros_like, trainable),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
    )
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro_batches, micro_rngs))

    total_weight = jnp.maximum(sums.pop("weight"), 1e-9)
    grads = jax.tree.map(lambda g: g / total_weight, grads)
    metrics = {k: v / total_weight for k, v in sums.items()}
    metrics["grad_norm"] = optax.tree.norm(grads)
    # Frozen leaves get zeros that `set_to_zero` never reads (XLA drops them).
    full_grads = combine(trainable_mask, grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
    new_trainable = optax.apply_updates(trainable, partition(updates, trainable_mask)[0])
    params = combine(trainable_mask, new_trainable, frozen)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def compile_train_step(
    *, model, tx, loss_fn, trainable_mask, mesh, config, state_shardings, batch_shardings
):
    """The one place that states shardings and donation of the train step."""
    step = functools.partial(
        train_step,
        model=model,
        tx=tx,
        loss_fn=loss_fn,
        trainable_mask=trainable_mask,
        mesh=mesh,
        config=config,
    )

    def traced(state, batch):
        with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
            return step(state, batch)

    jitted = jax.jit(
        traced,
        in_shardings=(state_shardings, batch_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return _MeshBound(jitted, mesh)


class _MeshBound:
    """Calls (and lowers) a jitted function with `mesh` as the current mesh."""

    def __init__(self, jitted, mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)


def memory_analysis(compiled_step, state, batch):
    """AOT memory statistics of the compiled step (frozen-sized gradient buffers show up here)."""
    return compiled_step.lower(state, batch).compile().memory_analysis()


@dataclasses.dataclass
class TrainData:
    """The training input of one process: its iterator, and how its slices become global arrays."""

    world: Any
    tokenizer: Any
    preprocessing: Any
    iterator: Any
    global_batch_size: int
    mesh: Any

    def next_global_batch(self) -> dict:
        local = next(self.iterator)
        return {
            key: jax.make_array_from_process_local_data(
                sharding.batch_sharding(self.mesh, np.ndim(value)),
                np.asarray(value),
                (self.global_batch_size, *np.shape(value)[1:]),
            )
            for key, value in local.items()
        }


def setup_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch_divisible(config.data.batch_size, mesh)
    logger.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
    return mesh


def setup_data(config: ml_collections.ConfigDict, cache_dir: Path, mesh, tokenizer) -> TrainData:
    """The training iterator over `config.data`, tokenised by `tokenizer` (`run_tokenizer`)."""
    world = data_lib.open_world(config.data.world, cache_dir)
    preprocessing = data_lib.ImagePreprocessing.from_config(config.preprocessing)
    process_count = jax.process_count()
    if config.data.batch_size % process_count:
        raise config_utils.ConfigError(
            f"config.data.batch_size={config.data.batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    split = tuple(config.data.split)
    if config.data.task != "text":
        if len(split) != 1:
            raise config_utils.ConfigError(
                f"config.data.split={split}: the {config.data.task} task reads one scene split"
            )
        split = split[0]
    conversation = None
    if config.data.task in ("llava_captions", "instructions"):
        from jaxvlm import vlm

        conversation = vlm.conversation_format(config, tokenizer)
    iterator = data_lib.make_train_iterator(
        config.data.task,
        world,
        tokenizer,
        preprocessing,
        split=split,
        global_batch_size=config.data.batch_size,
        max_text_len=config.data.max_text_len,
        seed=config.train.seed,
        process_index=jax.process_index(),
        process_count=process_count,
        worker_count=config.data.worker_count,
        conversation=conversation,
        texts_per_row=config.data.texts_per_row,
        text_packing=config.data.text_packing,
        augment=config.data.augment,
        encoder_decoder=models.encoder_decoder_split(config, tokenizer),
    )
    return TrainData(world, tokenizer, preprocessing, iterator, config.data.batch_size, mesh)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    devices=None,
) -> dict:
    """Runs `config` in `workdir`, resuming from its latest checkpoint; on `devices` (default all).

    Returns `{"step", "losses": {step: loss}, "evals": {name: {metric: value}}, "state"}`.
    """
    config_utils.validate(config)
    workdir = Path(workdir).absolute()
    cache_dir = cache.resolve(cache_dir)
    backbones.resolve_sources(config, cache_dir)
    config_utils.make_source_paths_absolute(config)
    importers.resolve_architectures(config)  # an HF directory's config.json sets the architecture
    is_main = jax.process_index() == 0
    mesh = setup_mesh(config, devices)
    tokenizer = initialization.run_tokenizer(config)
    initialization.resolve_template(config, tokenizer)
    data = setup_data(config, cache_dir, mesh, tokenizer)
    model = models.build_model(config)
    setup = initialization.setup_state(config, model, mesh, workdir, cache_dir)
    if is_main:
        initialization.write_run_files(workdir, config, data.tokenizer, data.preprocessing)
    if setup.data_state is not None:
        data.iterator.set_state(setup.data_state)
    first_batch = data.next_global_batch()
    compiled = compile_train_step(
        model=model,
        tx=setup.tx,
        loss_fn=objectives.get_objective(config),
        trainable_mask=setup.trainable_mask,
        mesh=mesh,
        config=config,
        state_shardings=setup.shardings,
        batch_shardings=jax.tree.map(lambda x: x.sharding, first_batch),
    )
    evaluators = evals.setup_evals(config, model, mesh, data)
    writer = metric_writer.MetricWriter(workdir, enabled=is_main)
    writer.truncate_after(int(setup.state.step))
    checkpointer = checkpoint.Checkpointer(
        workdir, max_to_keep=config.train.keep_checkpoints, async_save=config.train.async_checkpoint
    )
    state, losses, eval_results = setup.state, {}, {}
    loop = TrainLoop(
        config, writer, enabled=is_main and config.train.progress_bar, first_step=int(state.step)
    )
    try:
        batch = first_batch
        for step in loop.steps():
            state, metrics = compiled(state, batch)
            losses.update(loop.record(step, metrics))
            if step % config.train.checkpoint_every == 0 or step == config.train.num_steps:
                initialization.save_checkpoint(checkpointer, state, data.iterator, config, setup)
            eval_results = (
                evals.run_evals(
                    evaluators, state.params, step, writer, final_step=config.train.num_steps
                )
                or eval_results
            )
            if step < config.train.num_steps:
                batch = data.next_global_batch()
        losses.update(loop.flush())
        if not eval_results:  # a finished run resumed: evaluate what it has
            eval_results = evals.run_evals(
                evaluators, state.params, int(state.step), writer, force=True
            )
    finally:
        loop.close()
        checkpointer.wait_until_finished()
        checkpointer.close()
        writer.close()
        data.iterator.close()  # grain worker processes and their shared memory
    return {"step": int(state.step), "losses": losses, "evals": eval_results, "state": state}


class TrainLoop:
    """Step range, progress bar, and per-window metric logging with a NaN guard."""

    def __init__(self, config, writer, *, enabled: bool, first_step: int):
        self.config, self.writer, self.first_step = config, writer, first_step
        self.pending: list = []
        self.window_start, self.last_time = first_step, time.perf_counter()
        self.progress = metric_writer.progress_bar(first_step, config.train.num_steps, enabled)

    def steps(self):
        return range(self.first_step + 1, self.config.train.num_steps + 1)

    def record(self, step: int, metrics) -> dict[int, float]:
        self.pending.append((step, metrics))
        self.progress.update(1)
        if step % self.config.train.log_every == 0 or step == self.config.train.num_steps:
            return self.flush()
        return {}

    def flush(self) -> dict[int, float]:
        if not self.pending:
            return {}
        fetched, self.pending = jax.device_get(self.pending), []
        step = fetched[-1][0]
        losses = {s: float(m["loss"]) for s, m in fetched}
        bad = [s for s, loss in losses.items() if not math.isfinite(loss)]
        if bad:
            raise FloatingPointError(
                f"loss is {losses[bad[0]]} at step {bad[0]} (window of steps "
                f"{self.window_start + 1}–{step}); lower config.optimizer.learning_rate or check data"
            )
        now = time.perf_counter()
        summary = {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[-1][1]}
        # The update of step k used schedule(k - 1): optax counts updates from 0.
        summary["learning_rate"] = optim.learning_rate_at(self.config, step - 1)
        summary["steps_per_second"] = len(fetched) / max(now - self.last_time, 1e-9)
        self.last_time, self.window_start = now, step
        self.writer.write(step, {f"train/{k}": v for k, v in summary.items()})
        self.progress.set_postfix(loss=f"{summary['loss']:.4f}")
        return losses

    def close(self):
        self.progress.close()


def main(argv=None) -> None:
    from jaxvlm import cli  # local: absl flags are defined by the CLI module only

    cli.train_main(argv)


if __name__ == "__main__":
    main()
