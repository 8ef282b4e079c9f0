# Sourced by the launch scripts. XLA:CPU allocates each step's temporaries afresh; with glibc malloc
# every large buffer is a new mmap whose pages fault in again on every step (~40 % of a small model's
# step on 2 cores, bench/RESULTS.md). TCMalloc keeps and reuses that memory, as on Cloud TPU VMs.
# Preload it when it is installed (Debian: apt-get install libtcmalloc-minimal4) and nothing else is.
if [ -z "${LD_PRELOAD:-}" ]; then
  for candidate in /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
                   /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
                   /usr/lib/libtcmalloc_minimal.so.4; do
    if [ -f "$candidate" ]; then
      export LD_PRELOAD="$candidate"
      break
    fi
  done
fi
