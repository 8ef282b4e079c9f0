#!/usr/bin/env bash
# Every host of a Cloud TPU pod slice runs the same command; jax.distributed.initialize() finds the
# coordinator itself. WORKDIR must be a path every host sees (a shared filesystem or a mounted bucket).
# Run from a machine with gcloud:
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh CONFIG[:args] /mnt/shared/runs/name [flags...]
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG[:args] WORKDIR [flags...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG[:args] WORKDIR [flags...]}
shift 2
# Quote every argument for the remote shell (overrides may hold parentheses, quotes, globs).
remote=$(printf '%q ' python -m jaxvlm.train "--config=$config" "--workdir=$workdir" --multihost "$@")
gcloud compute tpus tpu-vm ssh "${TPU_NAME:?set TPU_NAME}" --zone="${ZONE:?set ZONE}" --worker=all \
  --command="cd ${REPO_DIR:-~/jaxvlm} && $remote"
