"""What every command line shares: logging to stderr, one-line errors, the cache, multi-host start.

Entry points are `python -m jaxvlm.<name>`; this module holds the `train` flags (absl +
`ml_collections.config_flags`, INTERFACES.md §1) and the helpers the argparse CLIs reuse. It is the only
place, with `launch/`, that reads environment variables.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Errors a user can cause and fix: reported as one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for noisy in ("jax._src", "orbax", "tensorstore", "etils", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax reports read-only opens as warnings


@contextlib.contextmanager
def user_errors(program: str) -> Iterator[None]:
    """Turns a user error into one line on stderr and exit status 2."""
    try:
        yield
    except USER_ERRORS as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if isinstance(error, KeyError):
            message = f"missing key {message}"
        print(f"{program}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def cache_dir_from(flag_value: str | None) -> Path:
    from jaxvlm import cache

    return cache.from_cli(flag_value, os.environ)


def start_runtime(cache_dir: Path) -> None:
    """The JAX settings every CLI wants: the persistent compilation cache; grain flags parsed."""
    from absl import flags

    from jaxvlm import cache

    cache.enable_compilation_cache(cache_dir)
    if not flags.FLAGS.is_parsed():  # grain worker processes read absl flags
        flags.FLAGS.mark_as_parsed()


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize` (CPU processes talk over gloo collectives)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not coordinator:  # TPU pods and Slurm: JAX finds the cluster itself
        jax.distributed.initialize()
        return
    if num_processes < 1 or process_id < 0:
        raise ValueError("--coordinator needs --num-processes N and --process-id I as well")
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )


TRAIN_USAGE = """usage: python -m jaxvlm.train --config=configs/NAME.py[:key=value,...] --workdir=DIR
                             [--config.KEY=VALUE ...] [--cache-dir=DIR]
                             [--multihost [--coordinator=HOST:PORT --num-processes=N --process-id=I]]

Runs the experiment a config file describes, in DIR; resumes when DIR holds a checkpoint. Any config
field can be overridden (--config.optimizer.learning_rate=3e-4); a misspelt key is an error. Example:
  python -m jaxvlm.train --config=configs/backbones_pretrain.py:model=lm,size=tiny --workdir=runs/lm
"""


def train_main(argv: list[str] | None = None) -> None:
    """`python -m jaxvlm.train --config PATH[:args] --workdir DIR [--config.key=value ...]`."""
    from absl import flags
    from ml_collections import config_flags

    program = "jaxvlm.train"
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "Config file and argument: configs/NAME.py[:key=value,...]",
        flag_values=flag_values,
        lock_config=True,
    )
    flags.DEFINE_string(
        "workdir",
        None,
        "Run directory (created; resumed when it holds a checkpoint)",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "cache-dir",
        None,
        "Cache of worlds and backbones (default $XDG_CACHE_HOME/jaxvlm or ~/.cache/jaxvlm)",
        flag_values=flag_values,
    )
    flags.DEFINE_bool(
        "multihost", False, "Start with jax.distributed.initialize()", flag_values=flag_values
    )
    flags.DEFINE_string(
        "coordinator", "", "HOST:PORT of process 0 (with --multihost)", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "num-processes", 0, "Number of processes (with --multihost)", flag_values=flag_values
    )
    flags.DEFINE_integer(
        "process-id", -1, "This process's index (with --multihost)", flag_values=flag_values
    )
    flags.DEFINE_bool("verbose", False, "Debug logging", flag_values=flag_values)
    argv = [program, *(sys.argv[1:] if argv is None else argv)]
    if any(arg in ("-h", "--help", "-help", "--helpfull") for arg in argv[1:]):
        print(TRAIN_USAGE)
        print(flag_values.get_help())
        return
    with user_errors(program):
        config_spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
        if "--config" in argv[:-1]:
            config_spec = argv[argv.index("--config") + 1]
        if config_spec and not Path(config_spec.partition(":")[0]).is_file():
            raise FileNotFoundError(f"config file {config_spec.partition(':')[0]} does not exist")
        try:
            flag_values(argv)
        except flags.Error as error:
            # absl wraps the config's own error; its last line is the one that names the problem.
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise ValueError(lines[-1] if lines else str(error)) from None
        if flag_values["config"].value is None or not flag_values["workdir"].value:
            raise ValueError("--config and --workdir are required (see --help)")
        config = flag_values["config"].value
        setup_logging(flag_values["verbose"].value)
        from jaxvlm import config_utils, train

        config_utils.validate(config)  # before anything is created
        if flag_values["multihost"].value:
            initialize_distributed(
                flag_values["coordinator"].value,
                flag_values["num-processes"].value,
                flag_values["process-id"].value,
            )
        cache_dir = cache_dir_from(flag_values["cache-dir"].value)
        start_runtime(cache_dir)
        summary = train.train(config, flag_values["workdir"].value, cache_dir=cache_dir)
        for name, metrics in summary["evals"].items():
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            logging.getLogger("jaxvlm").info("eval %s at step %d: %s", name, summary["step"], shown)
