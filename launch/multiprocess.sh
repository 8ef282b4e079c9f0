#!/usr/bin/env bash
# N processes on localhost, each with D forced CPU devices, talking over gloo: the multi-host code path
# on one machine (tests use it to check that 2 processes train exactly like 1).
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/multiprocess.sh CONFIG[:args] WORKDIR [flags...]
set -euo pipefail
config=${1:?usage: launch/multiprocess.sh CONFIG[:args] WORKDIR [flags...]}
workdir=${2:?usage: launch/multiprocess.sh CONFIG[:args] WORKDIR [flags...]}
shift 2
source "$(dirname "$0")/cpu_allocator.sh"
num_processes=${NUM_PROCESSES:-2}
devices=${DEVICES_PER_PROCESS:-2}
port=${COORDINATOR_PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    python -m jaxvlm.train --config="$config" --workdir="$workdir" --multihost \
    --coordinator="127.0.0.1:$port" --num-processes="$num_processes" --process-id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
