#!/usr/bin/env bash
# One process per GPU under Slurm; jax.distributed.initialize() reads the Slurm environment.
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 launch/gpu_slurm.sh CONFIG[:args] WORKDIR [flags...]
#SBATCH --job-name=jaxvlm
#SBATCH --output=%x-%j.out
set -euo pipefail
config=${1:?usage: sbatch launch/gpu_slurm.sh CONFIG[:args] WORKDIR [flags...]}
workdir=${2:?usage: sbatch launch/gpu_slurm.sh CONFIG[:args] WORKDIR [flags...]}
shift 2
srun python -m jaxvlm.train --config="$config" --workdir="$workdir" --multihost "$@"
