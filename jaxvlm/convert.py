"""Import a Hugging Face directory or a llama.cpp `.gguf` file as a jaxvlm workdir.

  python -m jaxvlm.convert --from-hf DIR --to WORKDIR
  python -m jaxvlm.convert --from-gguf FILE --to WORKDIR

WORKDIR gets what a trained run has (INTERFACES.md §2): `config.json`, the tokenizer
(`tokenizer.json`, `tokenizer_config.json` with the special tokens and the chat template),
`preprocessing.json`, and one full-state checkpoint at step 0, usable as `--workdir` of generate
and evaluate, as `config.init_from`, and as a component's `checkpoint`. The config is
`configs/imported.py` filled from the checkpoint: the architecture from its config.json or GGUF
metadata (through the importers, with parity to transformers proven in tests/importers), the
tokenizer and chat template it ships with (a model without a template reads plain text; a LLaVA
reads its prompt as its processor does: write one `<image>` per image). Supported:
decoder-only LLMs (Llama, Qwen2, SmolLM2 GGUF, OPT), LLaVA (`LlavaForConditionalGeneration`:
its processor files give the image preprocessing and the number of image tokens) and BLIP-2 with
OPT (`Blip2ForConditionalGeneration`: prompts laid out as `Blip2Processor` does). The workdir is written to a temporary sibling
and renamed at the end, so a failed conversion leaves nothing behind; an existing WORKDIR is
refused.

`generate` and `evaluate` take `--checkpoint PATH` for the same sources and convert in memory
(`load_imported`), without writing anything.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path

from jaxvlm import cli, config_utils

logger = logging.getLogger(__name__)

PROGRAM = "jaxvlm.convert"

# HF model_type (config.json, or a GGUF's general.architecture) → our LLM module (config.llm.name).
LLM_NAMES = {"llama": "llama", "qwen2": "llama", "opt": "opt"}


def imported_config(source: str | Path, *, configs_dir: str | None = None):
    """(locked ConfigDict, Tokenizer) of the model at `source` (see the module docstring).

    Raises:
      ValueError: a source that is not an HF directory or a `.gguf` file, or a model type that
        cannot be imported (naming the supported ones).
    """
    from jaxvlm import importers, initialization, manifest

    source = Path(source).expanduser().absolute()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    kind = manifest.detect_source_kind(source)
    if kind == "jaxvlm":
        raise ValueError(f"{source} is already a jaxvlm workdir: pass it as --workdir")
    vlm = importers.vlm_importer(source) if kind == "hf" else None
    checkpoint = importers.open_checkpoint(source)
    model_type = checkpoint.model_type
    if vlm is None and model_type not in LLM_NAMES:
        supported = sorted([*LLM_NAMES, *importers.VLM_IMPORTERS])
        raise importers.CheckpointImportError(
            f"{source}: model_type {model_type!r} cannot be converted (supported: "
            f"{', '.join(supported)})"
        )
    configs = config_utils.find_configs_dir(configs_dir)
    if vlm is not None:
        spec = f"{configs / 'imported.py'}:llm=llama,model=vlm"
        positions = checkpoint.hf_config.get("text_config", {}).get("max_position_embeddings")
    else:
        spec = f"{configs / 'imported.py'}:llm={LLM_NAMES[model_type]}"
        positions = checkpoint.hf_config.get("max_position_embeddings")
    config = config_utils.load_config(spec)
    with config.unlocked():
        config.trainable = ()  # an imported checkpoint carries no optimizer state
        components = ("encoder", "bridge", "llm") if vlm is not None else ("llm",)
        for component in components:
            config[component].checkpoint = str(source)
        if positions:
            config.data.max_text_len = int(positions)
    overrides = vlm.vlm_config(source) if vlm is not None else {}
    if vlm is not None:
        vlm.update_config(config, overrides)
        with config.unlocked():
            config.template.image_placeholder = vlm.processor(source).image_token
    importers.resolve_architectures(config)
    tokenizer = initialization.run_tokenizer(config)
    if tokenizer.chat_template and vlm is None:
        initialization.resolve_template(config, tokenizer)
    elif "template" in overrides:  # the importer's processor layout (BLIP-2: images, BOS, text)
        logger.info("%s: prompts are laid out as its processor does", source)
    else:
        # A VLM's HF template takes structured content ([{"type": "image"}, ...]), not our text
        # with placeholders: its prompts are read as its processor reads them.
        logger.info("%s: prompts are read without a chat template", source)
        with config.unlocked():
            config.template.template = ""
    config.lock()
    return config, tokenizer


def _build(config):
    """(mesh, model) for an imported config on every local device."""
    from jaxvlm import models, sharding

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    return mesh, models.build_model(config)


def load_imported(source: str | Path, *, configs_dir: str | None = None):
    """An `evaluate.LoadedRun` of the model at `source`, converted in memory (nothing written)."""
    from jaxvlm import data as data_lib
    from jaxvlm import initialization
    from jaxvlm.evaluate import LoadedRun

    config, tokenizer = imported_config(source, configs_dir=configs_dir)
    mesh, model = _build(config)
    params_shape, params_sharding, _ = initialization.abstract_params(config, model, mesh)
    params = initialization.initial_params(config, model, mesh, params_shape, params_sharding)
    return LoadedRun(
        workdir=Path(config.llm.checkpoint),
        config=config,
        step=0,
        model=model,
        params=params,
        tokenizer=tokenizer,
        preprocessing=data_lib.ImagePreprocessing.from_config(config.preprocessing),
        mesh=mesh,
    )


def convert(
    source: str | Path,
    to: str | Path,
    *,
    cache_dir: str | Path | None = None,
    configs_dir: str | None = None,
) -> Path:
    """Writes the workdir `to` for the model at `source`; returns its absolute path."""
    from jaxvlm import cache, checkpoint, initialization
    from jaxvlm import data as data_lib

    to = Path(to).expanduser().absolute()
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise FileExistsError(f"--to {to} already exists and is not empty; choose a new directory")
    config, tokenizer = imported_config(source, configs_dir=configs_dir)
    cache_dir = cache.resolve(cache_dir)
    mesh, model = _build(config)
    to.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{to.name}.converting-", dir=to.parent))
    partial.chmod(0o755)  # mkdtemp's 0o700 would make the workdir private
    try:
        setup = initialization.setup_state(config, model, mesh, partial, cache_dir)
        preprocessing = data_lib.ImagePreprocessing.from_config(config.preprocessing)
        initialization.write_run_files(partial, config, tokenizer, preprocessing)
        with checkpoint.Checkpointer(partial, async_save=False) as checkpointer:
            checkpointer.save(
                0,
                state=initialization.saved_state(setup.state, setup.trainable_mask, True),
                data_iter={},
                config=config_utils.to_dict(config),
                manifest=setup.manifest,
            )
        if to.exists():
            to.rmdir()  # empty (checked above)
        partial.rename(to)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("converted %s to %s", config.llm.checkpoint, to)
    return to


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROGRAM}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="DIR", help="a Hugging Face model directory")
    source.add_argument("--from-gguf", metavar="FILE", help="a llama.cpp .gguf file")
    parser.add_argument("--to", required=True, metavar="DIR", help="the new workdir")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--configs-dir", default=None, help="default: the repository's configs/")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m jaxvlm.convert` (see the module docstring, which is its --help)."""
    args = _parser().parse_args(argv)
    cli.setup_logging()
    with cli.user_errors(PROGRAM):
        if args.from_gguf is not None and not str(args.from_gguf).endswith(".gguf"):
            raise ValueError(f"--from-gguf {args.from_gguf}: expected a .gguf file")
        if args.from_hf is not None and not Path(args.from_hf).is_dir():
            raise FileNotFoundError(f"--from-hf {args.from_hf} is not a directory")
        cache_dir = cli.cache_dir_from(args.cache_dir)
        cli.start_runtime(cache_dir)
        workdir = convert(
            args.from_hf or args.from_gguf,
            args.to,
            cache_dir=cache_dir,
            configs_dir=args.configs_dir,
        )
    print(workdir)


if __name__ == "__main__":
    main()
