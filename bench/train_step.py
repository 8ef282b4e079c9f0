"""One training step of our Llama LM against transformers `LlamaForCausalLM` + torch AdamW.

    python bench/train_step.py [--steps 5] [--warmup 2] [--device cpu]

Same run, same machine, config fixed: 4 layers, d256, 8 heads / 4 KV heads, MLP 688, vocab 2048,
batch 8, sequence 128, float32, unscanned layers as the world presets use on CPU. Reports the median of `--steps` timed steps after `--warmup` untimed ones,
compile time apart, achieved GFLOP/s, and the speed ratio (target: ours ≥ 1.3× faster on CPU).

Run it both ways; both frameworks share the process, hence the allocator:
    python bench/train_step.py                                   # glibc malloc
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python bench/train_step.py
XLA:CPU allocates each step's temporaries afresh, and with glibc every large buffer is a new mmap whose
pages fault in again each step; TCMalloc (what `launch/*.sh` preload when installed, as Cloud TPU VMs
do) reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

LAYERS, DIM, HEADS, KV_HEADS, MLP, VOCAB, BATCH, SEQ = 4, 256, 8, 4, 688, 2048, 8, 128


def parameter_count() -> int:
    head_dim = DIM // HEADS
    attention = DIM * HEADS * head_dim * 2 + DIM * KV_HEADS * head_dim * 2
    mlp = 3 * DIM * MLP
    return LAYERS * (attention + mlp + 2 * DIM) + VOCAB * DIM * 2 + DIM


def step_flops() -> float:
    """6·N·tokens for the matmuls with parameters + 12·L·B·T²·D for attention scores (fwd + bwd)."""
    tokens = BATCH * SEQ
    return 6 * parameter_count() * tokens + 12 * LAYERS * BATCH * SEQ * SEQ * DIM


def time_steps(step, warmup: int, steps: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, times


def ours(warmup: int, steps: int):
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from jaxvlm import models, objectives, optim, sharding, train
    from jaxvlm.llms.llama import Llama

    llm = Llama(
        vocab_size=VOCAB,
        dim=DIM,
        depth=LAYERS,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        head_dim=DIM // HEADS,
        mlp_dim=MLP,
        tie_embeddings=False,
        scan_layers=False,
    )
    model = models.LanguageModel(llm=llm)
    config = ml_collections.ConfigDict(
        {
            "optimizer": dict(
                learning_rate=1e-4,
                min_learning_rate=0.0,
                warmup_steps=0,
                schedule="constant",
                b1=0.9,
                b2=0.999,
                eps=1e-8,
                weight_decay=0.0,
                grad_clip_norm=0.0,
            ),
            "train": dict(num_steps=100, grad_accum_steps=1),
            "contrastive": dict(label_smoothing=0.0),
        }
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    tokens = jnp.zeros((1, SEQ), jnp.int32)
    boxed = jax.eval_shape(
        lambda r: model.init(r, tokens, mask=jnp.ones_like(tokens))["params"], jax.random.key(0)
    )
    shardings = sharding.tree_shardings(boxed, mesh)
    import flax.linen as nn

    params = jax.jit(
        lambda r: nn.unbox(model.init(r, tokens, mask=jnp.ones_like(tokens))["params"]),
        out_shardings=shardings,
    )(jax.random.key(0))
    mask = jax.tree.map(lambda _: True, params)
    tx = optim.build_optimizer(config, params, mask)
    state = train.TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(0)),
    )
    rng = np.random.default_rng(0)
    batch = {
        "tokens": jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32),
        "mask": jnp.ones((BATCH, SEQ), jnp.int32),
        "loss_mask": jnp.ones((BATCH, SEQ), jnp.int32),
    }
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_shardings = jax.tree.map(lambda x: sharding.batch_sharding(mesh, x.ndim), batch)
    compiled = train.compile_train_step(
        model=model,
        tx=tx,
        loss_fn=objectives.lm_loss,
        trainable_mask=mask,
        mesh=mesh,
        config=config,
        state_shardings=state_shardings,
        batch_shardings=batch_shardings,
    )
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    return time_steps(step, warmup, steps)


def reference(warmup: int, steps: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))

    def step():
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, warmup, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results = {}
    for name, fn in (("jaxvlm", ours), ("transformers", reference)):
        first, times = fn(args.warmup, args.steps)
        median = statistics.median(times)
        results[name] = {
            "first_step_s": first,
            "median_step_s": median,
            "gflops_per_s": step_flops() / median / 1e9,
        }
    ratio = results["transformers"]["median_step_s"] / results["jaxvlm"]["median_step_s"]
    results["speedup"] = ratio
    if args.json:
        print(json.dumps(results))
        return
    print(
        f"config: {LAYERS} layers, d{DIM}, {HEADS}/{KV_HEADS} heads, MLP {MLP}, vocab {VOCAB}, "
        f"batch {BATCH} x {SEQ}, {parameter_count() / 1e6:.2f} M params, "
        f"{step_flops() / 1e9:.1f} GFLOP/step"
    )
    for name in ("jaxvlm", "transformers"):
        r = results[name]
        print(
            f"{name:13s} median step {r['median_step_s'] * 1e3:8.1f} ms   "
            f"first (compile) {r['first_step_s']:6.2f} s   {r['gflops_per_s']:6.1f} GFLOP/s"
        )
    print(f"speedup (transformers / jaxvlm): {ratio:.2f}x  (target ≥ 1.3x)")


if __name__ == "__main__":
    main()
