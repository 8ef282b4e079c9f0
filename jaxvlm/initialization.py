"""Building the train state: abstract shapes → shardings → load what exists → initialise the rest.

Order (STYLE.md §7): `jax.eval_shape` gives the abstract params with their logical names, hence the
shardings; pretrained parameters (`config.init_from`, components' `checkpoint`) are loaded straight into
those shardings; a jitted init with `out_shardings` computes **only** the missing leaves (XLA drops the
rest), so frozen weights are never materialised twice. A workdir that already holds a checkpoint resumes
from it: the saved (trainable or full) parameters, optimizer state, RNG, step and data-iterator state.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxvlm import cache, checkpoint, config_utils, importers, models, optim, sharding

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class StateSetup:
    state: Any  # TrainState
    tx: Any
    trainable_mask: Any
    shardings: Any  # TrainState of NamedShardings
    data_state: dict | None
    manifest: dict


def _train_state_class():
    from jaxvlm.train import TrainState  # local: train imports this module

    return TrainState


def abstract_params(config, model, mesh):
    """(abstract params, their shardings); no array is allocated."""
    boxed = jax.eval_shape(models.init_fn(model, config), jax.random.key(0))
    return nn.unbox(boxed), sharding.tree_shardings(boxed, mesh), boxed


def setup_state(
    config: ml_collections.ConfigDict,
    model,
    mesh,
    workdir: Path,
    cache_dir: Path,
    *,
    step: int | None = None,
    read_only: bool = False,
) -> StateSetup:
    """The state to train or evaluate: restored from `workdir`'s checkpoint `step` (default the
    latest) when one exists, else freshly built. `read_only` (evaluation) never writes to the
    workdir, so a run training there keeps its in-flight saves."""
    TrainState = _train_state_class()
    params_shape, params_sharding, boxed = abstract_params(config, model, mesh)
    mask = optim.trainable_mask(params_shape, config.trainable)
    tx = optim.build_optimizer(config, params_shape, mask)
    # Optimizer moments inherit their parameter's logical names (optax maps over the boxed leaves).
    opt_boxed = jax.eval_shape(tx.init, boxed)
    opt_sharding = sharding.tree_shardings(opt_boxed, mesh)
    replicated = sharding.replicated(mesh)
    shardings = TrainState(
        step=replicated, params=params_sharding, opt_state=opt_sharding, rng=replicated
    )
    latest, saved_manifest = None, None
    with checkpoint.Checkpointer(workdir, async_save=False, read_only=read_only) as checkpointer:
        latest = checkpointer.latest_step() if step is None else step
        if latest is not None:
            checkpoint.check_compatible(
                checkpointer.read_config(latest),
                config_utils.to_dict(config),
                config_utils.model_shape_keys(config),
            )
            saved_manifest = checkpointer.read_manifest(latest)
    if latest is not None and config.train.save_full_state:
        # Everything is in the checkpoint: its sources are history, not dependencies.
        manifest, params = saved_manifest, None
    else:
        manifest = frozen_manifest(config, cache_dir)
        if latest is not None:
            checkpoint.verify_manifest(
                saved_manifest, hash_cache_path=cache.hash_cache_path(cache_dir)
            )
            check_same_sources(saved_manifest, manifest)
        params = initial_params(config, model, mesh, params_shape, params_sharding)
    if latest is None:
        opt_state = jax.jit(tx.init, out_shardings=opt_sharding)(params)
        rng = jax.device_put(jax.random.key_data(jax.random.key(config.train.seed)), replicated)
        state = TrainState(
            step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
            params=params,
            opt_state=opt_state,
            rng=rng,
        )
        return StateSetup(state, tx, mask, shardings, None, manifest)

    abstract_opt = nn.unbox(opt_boxed)
    state, data_state = restore_state(
        config, workdir, latest, params, params_shape, mask, abstract_opt, shardings
    )
    logger.info("restored %s at step %d", workdir, latest)
    return StateSetup(state, tx, mask, shardings, data_state, manifest)


def initial_params(config, model, mesh, params_shape, params_sharding):
    """Pretrained leaves loaded into their shardings; only the missing ones initialised (jitted)."""
    loaded = load_pretrained(config, params_shape)
    flat_shape = checkpoint.flatten_params(params_shape)
    flat_sharding = checkpoint.flatten_params(params_sharding)
    # A `LeadingRows` value fills the first rows; its other rows come from the fresh init.
    partial = {k for k, v in loaded.items() if isinstance(v, importers.LeadingRows)}
    missing = [k for k in flat_shape if k not in loaded or k in partial]
    init = models.init_fn(model, config)

    def init_missing(rng):
        flat = checkpoint.flatten_params(nn.unbox(init(rng)))
        return {k: flat[k] for k in missing}

    rng = jax.random.key(config.train.seed)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        fresh = jax.jit(init_missing, out_shardings={k: flat_sharding[k] for k in missing})(rng)
    for key, value in loaded.items():
        target = flat_shape[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"pretrained parameter {key} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(target.shape)}"
            )
        if key in partial:
            rows = np.asarray(value.rows).astype(target.dtype)
            fresh[key] = jax.jit(
                lambda full, rows: full.at[: rows.shape[0]].set(rows),
                out_shardings=flat_sharding[key],
                donate_argnums=0,
            )(fresh[key], rows)
            continue
        fresh[key] = jax.device_put(np.asarray(value).astype(target.dtype), flat_sharding[key])
    if missing and loaded:
        logger.info("initialised %d parameter arrays, loaded %d", len(missing), len(loaded))
    return checkpoint.unflatten_params(fresh)


def load_pretrained(config, params_shape) -> dict[str, np.ndarray]:
    """Flat `{path: array}` from `config.init_from` and every component's `checkpoint` field."""
    flat_shape = checkpoint.flatten_params(params_shape)
    loaded: dict[str, np.ndarray] = {}
    whole_vlms: dict[str, dict[str, np.ndarray]] = {}  # a LLaVA directory is read once
    for component in config_utils.MODEL_COMPONENTS:
        if component in config and "checkpoint" in config[component]:
            source = config[component].checkpoint
            if source:
                kind = checkpoint.detect_source_kind(source)
                prefix = f"{component}/"
                vlm_importer = importers.vlm_importer(source) if kind == "hf" else None
                if vlm_importer is not None:
                    if source not in whole_vlms:
                        whole_vlms[source] = vlm_importer.load_params(source, config, flat_shape)
                    taken = {k: v for k, v in whole_vlms[source].items() if k.startswith(prefix)}
                elif kind in ("hf", "gguf"):
                    taken = importers.load_component(
                        component, source, config[component], flat_shape
                    )
                else:
                    params = checkpoint.read_params(source)
                    taken = {k: v for k, v in params.items() if k.startswith(prefix)}
                if not taken:
                    raise ValueError(
                        f"config.{component}.checkpoint={source} holds no parameters under {prefix}"
                    )
                loaded.update(taken)
    if config.init_from:
        params = checkpoint.read_params(config.init_from)
        matching = {k: v for k, v in params.items() if k in flat_shape}
        if not matching:
            raise ValueError(
                f"config.init_from={config.init_from} shares no parameter path with this model"
            )
        loaded.update(matching)
    unknown = sorted(set(loaded) - set(flat_shape))
    if unknown:
        raise ValueError(f"pretrained parameters not in the model: {unknown[:10]}")
    return loaded


def check_same_sources(saved_manifest: dict, current_manifest: dict) -> None:
    """A resumed run must read its frozen weights from the sources it was trained with."""
    saved, current = saved_manifest["sources"], current_manifest["sources"]
    for component in sorted(set(saved) | set(current)):
        before = saved.get(component, {}).get("path")
        now = current.get(component, {}).get("path")
        if before != now:
            key = "init_from" if component == "init_from" else f"{component}.checkpoint"
            raise checkpoint.FrozenSourceError(
                f"config.{key} is {now!r} but the checkpoint was trained from {before!r}"
            )


def frozen_manifest(config, cache_dir: Path) -> dict:
    """The manifest of pretrained sources this run depends on (INTERFACES.md §2)."""
    named = {
        component: config[component].checkpoint
        for component in config_utils.MODEL_COMPONENTS
        if component in config
        and "checkpoint" in config[component]
        and config[component].checkpoint
    }
    if config.init_from:
        named["init_from"] = config.init_from
    sources = {}
    for component, path in named.items():
        key = "init_from" if component == "init_from" else f"{component}.checkpoint"
        try:
            sources[component] = checkpoint.source_entry(
                path, hash_cache_path=cache.hash_cache_path(cache_dir)
            )
        except (OSError, ValueError) as error:
            raise checkpoint.FrozenSourceError(f"config.{key}: {error}") from None
    return checkpoint.make_manifest(sources)


def saved_state(state, mask, full_state: bool) -> dict:
    """What a checkpoint holds: trainable (or all) params, optimizer state, rng and step."""
    params = state.params if full_state else checkpoint.split_params(state.params, mask)[0]
    return {
        "step": state.step,
        "rng": state.rng,
        "params": checkpoint.flatten_params(params) if full_state else params,
        "opt_state": state.opt_state,
    }


def restore_state(config, workdir, step, params, params_shape, mask, abstract_opt, shardings):
    TrainState = _train_state_class()
    full = config.train.save_full_state
    abstract = saved_state(
        TrainState(
            step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
            params=_with_shardings(params_shape, shardings.params),
            opt_state=_with_shardings(abstract_opt, shardings.opt_state),
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=shardings.rng),
        ),
        mask,
        full,
    )
    with checkpoint.Checkpointer(workdir, read_only=True) as checkpointer:
        restored = checkpointer.restore(step, abstract_state=abstract)
    saved = restored.state
    if full:
        merged = checkpoint.unflatten_params(saved["params"])
    else:
        merged = checkpoint.merge_params(saved["params"], checkpoint.split_params(params, mask)[1])
    state = TrainState(
        step=saved["step"], params=merged, opt_state=saved["opt_state"], rng=saved["rng"]
    )
    return state, restored.data_iter


def _with_shardings(shapes, shardings_tree):
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings_tree
    )


def save_checkpoint(checkpointer, state, iterator, config, setup: StateSetup) -> None:
    checkpointer.save(
        int(state.step),
        state=saved_state(state, setup.trainable_mask, config.train.save_full_state),
        data_iter=iterator.get_state(),
        config=config_utils.to_dict(config),
        manifest=setup.manifest,
    )


def write_run_files(workdir: Path, config, tokenizer, preprocessing) -> None:
    """`config.json`, `tokenizer.json` (+ `tokenizer_config.json`: special-token names and chat
    template), `preprocessing.json` (INTERFACES.md §2)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(config_utils.to_dict(config), indent=2))
    tokenizer.save_directory(workdir)
    preprocessing.save(workdir / "preprocessing.json")


TEMPLATE_FROM_TOKENIZER = "from_tokenizer"


def run_tokenizer(config):
    """The tokenizer `config.data.tokenizer` names, checked against the model.

    "world": the synthetic world's; "llm": the one shipped with `config.llm.checkpoint`; else a
    path (HF directory, `.gguf`, jaxvlm workdir). A VLM's image placeholder
    (`config.template.image_placeholder`) is added as a special token when the tokenizer lacks it
    (a real LLM's embedding gets it through `num_added_embeddings`), and must then have the id
    `config.data.image_token_id`. Every id must have an embedding row in the LLM. A bridge-only
    stage (`config.llm.name="none"`: BLIP-2 stage 1) tokenises the bridge's own text, so there it
    is `bridge_tokenizer(config)`, and `config.data.tokenizer` must name the same source.
    """
    from jaxvlm import data as data_lib

    if config.llm.name == "none" and config.bridge.name != "none":
        tokenizer = bridge_tokenizer(config)
        same = Path(config.data.tokenizer).expanduser().absolute()
        if same != Path(config.bridge.tokenizer).expanduser().absolute():
            raise config_utils.ConfigError(
                f"config.data.tokenizer={config.data.tokenizer!r} but config.bridge.tokenizer="
                f"{config.bridge.tokenizer!r}: with no LLM (config.llm.name='none') the captions "
                "are the bridge's text; set both to the same tokenizer"
            )
        return tokenizer
    source = config.data.tokenizer
    if source == "world":
        tokenizer = data_lib.world_tokenizer()
    else:
        if source == "llm":
            if "checkpoint" not in config.llm or not config.llm.checkpoint:
                raise config_utils.ConfigError(
                    "config.data.tokenizer='llm' takes the tokenizer of config.llm.checkpoint, "
                    "which is empty"
                )
            source = config.llm.checkpoint
        try:
            tokenizer = data_lib.load_tokenizer(source)
        except ValueError as error:
            raise config_utils.ConfigError(f"config.data.tokenizer: {error}") from None
    if config.model == "vlm":
        placeholder = config.template.image_placeholder
        image_id = tokenizer.token_to_id(placeholder)
        if image_id is None:
            [image_id] = tokenizer.add_special_tokens([placeholder])
        if image_id != config.data.image_token_id:
            raise config_utils.ConfigError(
                f"config.data.image_token_id={config.data.image_token_id}, but the tokenizer "
                f"({config.data.tokenizer}) gives {placeholder!r} the id {image_id}"
            )
    if config.llm.name != "none" and "vocab_size" in config.llm:
        rows = config.llm.vocab_size + config.llm.get("num_added_embeddings", 0)
        if tokenizer.vocab_size > rows:
            raise config_utils.ConfigError(
                f"the tokenizer ({config.data.tokenizer}) has {tokenizer.vocab_size} tokens, more "
                f"than the LLM's {rows} embedding rows (config.llm.vocab_size + "
                "config.llm.num_added_embeddings)"
            )
    return tokenizer


# LAVIS's decoder-start token for a BERT WordPiece vocabulary (`add_special_tokens({"bos_token":
# "[DEC]"})`), at id 30522 of BERT's 30522 tokens.
DEC_TOKEN = "[DEC]"


def bridge_tokenizer(config):
    """The tokenizer of the bridge's own text side, `config.bridge.tokenizer`: the captions of a
    bridge-only stage (BLIP-2 stage 1; `run_tokenizer` returns it there) and the question that a
    Q-Former reads in the VQA fine-tune (`read_prompt`).

    "world": the synthetic world's (`<cls>`, `<dec>` reserved); else a path (an HF directory such
    as a BERT's, a jaxvlm workdir, a `.gguf` file). A WordPiece vocabulary has no decoder-start
    token: when `config.bridge.dec_token_id` is the tokenizer's size, `[DEC]` is added with that id,
    as LAVIS does. `cls_token_id` and `dec_token_id` must be ids of the tokenizer, and every id
    must have a row in the bridge's vocabulary (`config.bridge.vocab_size`).
    """
    from jaxvlm import data as data_lib

    bridge = config.bridge
    if "tokenizer" not in bridge:
        raise config_utils.ConfigError(
            f"config.bridge (name={bridge.name!r}) has no tokenizer field: it reads no text"
        )
    source = bridge.tokenizer
    if source == "world":
        tokenizer = data_lib.world_tokenizer()
    else:
        try:
            tokenizer = data_lib.load_tokenizer(source)
        except ValueError as error:
            raise config_utils.ConfigError(f"config.bridge.tokenizer: {error}") from None
    if "dec_token_id" in bridge and bridge.dec_token_id == tokenizer.vocab_size:
        if tokenizer.token_to_id(DEC_TOKEN) is None:
            tokenizer.add_special_tokens([DEC_TOKEN])
    for key in ("cls_token_id", "dec_token_id"):
        if key in bridge and tokenizer.id_to_token(bridge[key]) is None:
            raise config_utils.ConfigError(
                f"config.bridge.{key}={bridge[key]} is not an id of the bridge tokenizer "
                f"({source}: {tokenizer.vocab_size} tokens)"
            )
    if "vocab_size" in bridge and tokenizer.vocab_size > bridge.vocab_size:
        raise config_utils.ConfigError(
            f"the bridge tokenizer ({source}) has {tokenizer.vocab_size} tokens, more than "
            f"config.bridge.vocab_size={bridge.vocab_size}"
        )
    return tokenizer


def resolve_template(config, tokenizer) -> None:
    """`config.template.template = "from_tokenizer"` becomes the tokenizer's own chat template."""
    if config.template.template != TEMPLATE_FROM_TOKENIZER:
        return
    if not tokenizer.chat_template:
        raise config_utils.ConfigError(
            f"config.template.template='{TEMPLATE_FROM_TOKENIZER}', but the tokenizer "
            f"({config.data.tokenizer}) has no chat template"
        )
    with config.unlocked():
        config.template.template = tokenizer.chat_template
