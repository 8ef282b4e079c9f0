#!/usr/bin/env bash
# One process on this machine (all its devices).
#   launch/local.sh configs/backbones_pretrain.py:model=lm runs/world_lm [--config.train.num_steps=100 ...]
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG[:args] WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG[:args] WORKDIR [flags...]}
shift 2
source "$(dirname "$0")/cpu_allocator.sh"
exec python -m jaxvlm.train --config="$config" --workdir="$workdir" "$@"
