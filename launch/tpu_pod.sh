#!/usr/bin/env bash
# Every host of a Cloud TPU pod slice runs the same command; jax.distributed.initialize() finds the
# coordinator itself. Run from a machine with gcloud:
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh CONFIG[:args] gs://bucket/runs/name [flags...]
set -euo pipefail
config=${1:?usage: launch/tpu_pod.sh CONFIG[:args] WORKDIR [flags...]}
workdir=${2:?usage: launch/tpu_pod.sh CONFIG[:args] WORKDIR [flags...]}
shift 2
gcloud compute tpus tpu-vm ssh "${TPU_NAME:?set TPU_NAME}" --zone="${ZONE:?set ZONE}" --worker=all \
  --command="cd ${REPO_DIR:-~/jaxvlm} && python -m jaxvlm.train --config='$config' --workdir='$workdir' --multihost $*"
