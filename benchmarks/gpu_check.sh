#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, run the GPU tests, then the GPU benchmarks.
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"])        # on the device
#   GPU_CHECK_STEPS="probe tests" bash benchmarks/gpu_check.sh          # a subset
#
# Everything lands in $OUT (the device tool returns at most 8 files from it): gpu_check.log (all output),
# and one JSON (+ PNG) per benchmark. Each step runs under its own deadline; a failing step is recorded
# in the summary at the end and the next one still runs. To add a step: write a function step_<name>
# and add <name> to STEPS.
set -u
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/.device/out}
mkdir -p "$OUT"
export REPO OUT
LOG=$OUT/gpu_check.log
SUMMARY=()
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# Not in the default list: warm_probe (benchmarks/kvikio_warm_probe.py, ~2-3 min; GPU_CHECK_STEPS=warm_probe),
# read_steps, fetch_groups and store_files (~1 min each), warm_files (~2 min), issue3 (~1.5 min: "build issue3" gives issue 3's table),
# udev (~1 min: creates /run/udev where absent, so put it last), cufile (~3 min: gives cuFile the udev entry it
# needs, removed after; bare cuFile against kvikio).
STEPS=(${GPU_CHECK_STEPS:-probe build tests codecs bench_gds bench_cli read_under_store})

export GDSCACHE_CUDA_LIB=$REPO/build/cuda/libgdscache_cuda.so

install() {
    # wheels carried in .whl/: kvikio-cu13, libkvikio-cu13, rapids-logger, pydantic and its deps (absent there)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$REPO
}

step_probe() {
    nvidia-smi -L; uname -r; df -hT "$REPO" /tmp; ls -ld /run/udev 2>&1; lsmod 2>/dev/null | grep -i nvidia_fs || echo "no nvidia_fs module"
    grep -nE '"allow_compat_mode"|"use_poll_mode"|"use_pci_p2pdma"|"force_compat_mode"' /etc/cufile.json 2>&1 | head
    python3 - <<'EOF'
import json, torch, kvikio, kvikio.defaults as d, kvikio.cufile_driver as drv
from io_backends.kvikio_backend import detect_io_mode
info = {"kvikio": kvikio.__version__, "torch": torch.__version__, "card": torch.cuda.get_device_name(),
        "compat_mode": str(d.get("compat_mode")), "compat_preferred": d.is_compat_mode_preferred(),
        "io_mode": detect_io_mode(kvikio)}
for key in ("num_threads", "task_size", "bounce_buffer_size", "gds_threshold", "auto_direct_io_read", "auto_direct_io_write"):
    info[key] = d.get(key)
try:
    info["libcufile"] = drv.libcufile_version()
    for key in ("is_gds_available", "major_version", "minor_version", "allow_compat_mode", "poll_mode"):
        info["driver." + key] = drv.get(key)
except Exception as exc:
    info["driver"] = repr(exc)
try:
    from cuda.bindings import cufile
    info["cuda.bindings.cufile"] = [n for n in dir(cufile) if n[0].isupper() and ("Prop" in n or "Descr" in n)]
except Exception as exc:
    info["cuda.bindings.cufile"] = repr(exc)
print(json.dumps(info, indent=1, default=str))
EOF
}

step_build() {
    # the codec kernels, as `pip install` builds them where nvcc exists (a failed build fails the step)
    set -o pipefail
    cmake -S . -B build/cuda -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null && cmake --build build/cuda -j 16 | tail -3
}

step_codecs() {
    python3 benchmarks/gpu_codecs.py --json "$OUT/gpu_codecs.json"
}

step_tests() {
    # the GPU tests, and the native library's host-memory tests (CI runs them only where nvcc built the library)
    local rc=0
    python3 -m pytest -m gpu tests --continue-on-collection-errors -q -rs -p no:cacheprovider || rc=1
    python3 -m pytest tests/core/test_native_reads.py tests/core/test_native_writes.py -q -rs -p no:cacheprovider || rc=1
    return $rc
}

step_read_steps() {
    # per-step times of one warm GPU chunk read (issue 3: where small chunks spend their time)
    python3 benchmarks/gpu_read_steps.py
}

step_bench_gds() {
    # GDS_BENCH_ARGS: e.g. "--skip-raw --shapes llama8b"; default: everything
    python3 benchmarks/bench_gds.py --dir "$REPO/.bench/gds" --total-gib "${GDS_TOTAL_GIB:-4}" \
        --out "$OUT/gds.json" --png "$OUT/gds.png" ${GDS_BENCH_ARGS:---breakdown}
}

step_bench_cli() {
    # the main job on the GPU: every codec, two chunk sizes, cold and warm, with the plot
    python3 -m gdscache.cli.main bench --path "$REPO/.bench/cli" --device cuda --chunk-size 256,1024 \
        --json "$OUT/bench_cli.json" --plot "$OUT/bench_cli.png" ${BENCH_CLI_ARGS:-}
}

issue3_bench() {
    # one of issue 3's runs into the JSON $1: raw 256-token chunks, 4 GiB, of Llama-8B (32 MiB), or with $2 = small
    # of a small model (1 MiB); store and cold/warm retrieve against the paired raw ceiling (benchmarks/RESULTS.md);
    # more options of `gdscache bench` after $2
    local shape=()
    [ "${2:-}" = small ] && shape=(--layers 16 --kv-heads 1 --head-dim 64)
    python3 -m gdscache.cli.main bench --path "$REPO/.bench/cli" --device cuda --codecs raw --chunk-size 256 \
        --total-size 4GiB "${shape[@]}" --json "$1" "${@:3}"
}

step_issue3() {
    issue3_bench "$OUT/issue3_llama.json" llama
    issue3_bench "$OUT/issue3_small.json" small
    issue3_bench "$OUT/issue3_small_sync.json" small --write-mode sync
}

step_warm_files() {
    # page-cache-warm retrieve against raw kvikio reads of one file and of the cache's own chunk files, and DRAM-tier
    # hits against one pinned host copy (issue 3)
    python3 benchmarks/gpu_warm_files.py --shape 32,8,128 --requests 8 --json "$OUT/warm_files_llama.json"
    python3 benchmarks/gpu_warm_files.py --shape 16,1,64 --requests 64 --json "$OUT/warm_files_small.json"
    python3 benchmarks/gpu_warm_files.py --shape 16,1,64 --requests 8 --tokens 32768 --json "$OUT/warm_files_small_32k.json"
    python3 benchmarks/gpu_warm_files.py --shape 16,1,64 --requests 4 --tokens 131072 --json "$OUT/warm_files_small_128k.json"
}

step_read_under_store() {
    # a warm retrieve's latency right after an async store of a Llama-8B request, against the same retrieve alone
    python3 benchmarks/gpu_read_under_store.py --json "$OUT/read_under_store.json"
}

step_store_files() {
    # GPU stores against raw kvikio writes: one file, and the bare per-request durable publication of chunk files
    python3 benchmarks/gpu_store_files.py --shape 16,1,64 --requests 64 --json "$OUT/store_files_small.json"
    python3 benchmarks/gpu_store_files.py --shape 32,8,128 --requests 4 --json "$OUT/store_files_llama.json"
}

step_udev() {
    # kvikio drives cuFile only where /run/udev exists, and these VMs have none. This creates it (only if absent;
    # removed after) to check that the backend, seeing cuFile without nvidia-fs, runs and reports kvikio's POSIX path
    # for every file: the io_mode test, then issue 3's small-shape run.
    local rc=0
    if [ ! -e /run/udev ]; then
        mkdir /run/udev && trap 'rmdir /run/udev' EXIT && trap 'exit 143' TERM INT
    fi
    python3 -m pytest tests/gpu/test_kvikio_gpu.py -k after_asking_cufile -q -rs -s -p no:cacheprovider || rc=$?
    issue3_bench "$OUT/udev_small.json" small || rc=$?
    return $rc
}

step_cufile() {
    # bare cuFile and kvikio through cuFile against kvikio's POSIX path and libgdscache_io (issue 3). cuFile identifies
    # a file's block device by its udev properties (ID_FS_TYPE, ID_FS_USAGE), and these VMs have no udev database, so
    # cuFile refuses their files; this writes the entry it asks for, for the device under .bench (only where absent;
    # the entry and the folders made for it are removed after), then runs the mode test, the raw engines on one file
    # and issue 3's runs through either path. UDEV_DIR: where udev's database is (tests/test_gpu_check.py).
    local rc=0 dev entry made=() udev=${UDEV_DIR:-/run/udev}
    mkdir -p "$REPO/.bench"
    dev=$(python3 -c 'import os, sys; s = os.stat(sys.argv[1]); print(f"{os.major(s.st_dev)}:{os.minor(s.st_dev)}")' \
        "$REPO/.bench") || return 1
    entry=$udev/data/b$dev
    if [ ! -e "$entry" ]; then
        [ -d "$udev/data" ] || made+=("$udev/data")
        [ -d "$udev" ] || made+=("$udev")
        trap "rm -f $(printf %q "$entry"); rmdir $(printf '%q ' "${made[@]}") 2>/dev/null; true" EXIT
        trap 'exit 143' TERM INT
        mkdir -p "$udev/data" && printf 'I:1\nE:DEVNAME=%s\nE:ID_FS_TYPE=%s\nE:ID_FS_USAGE=filesystem\n' \
            "$(findmnt -nvo SOURCE -T "$REPO/.bench")" "$(findmnt -no FSTYPE -T "$REPO/.bench")" > "$entry" || return 1
    fi
    cat "$entry"
    python3 -m pytest tests/gpu/test_kvikio_gpu.py -k cufile -q -rs -s -p no:cacheprovider || rc=$?
    python3 benchmarks/bench_gds.py --dir "$REPO/.bench/gds" --skip-cache --out "$OUT/gds_cufile.json" || rc=$?
    for shape in llama small; do  # through cuFile (its compat mode where no nvidia-fs), then kvikio's POSIX path
        (export KVIKIO_COMPAT_MODE=OFF; issue3_bench "$OUT/cufile_$shape.json" $shape) || rc=$?
        (export KVIKIO_COMPAT_MODE=ON; issue3_bench "$OUT/posix_$shape.json" $shape) || rc=$?
    done
    return $rc
}

step_fetch_groups() {
    # chunks per I/O task x I/O threads, 1 MiB and 32 MiB chunks (issue 3; FETCH_GROUPS_ARGS adds options)
    python3 benchmarks/gpu_fetch_groups.py --shape 16,1,64 --groups 1,8,128 --threads 1,8 \
        --json "$OUT/fetch_groups_small.json" ${FETCH_GROUPS_ARGS:-}
    python3 benchmarks/gpu_fetch_groups.py --shape 32,8,128 --request-chunks 32 --requests 2 --groups 1,4 \
        --threads 8 --json "$OUT/fetch_groups_llama.json" ${FETCH_GROUPS_ARGS:-}
}

step_warm_probe() {
    # why page-cache-warm kvikio reads run at 20 or 40 GB/s: write method x warm-up x file size (WARM_PROBE_ARGS)
    python3 benchmarks/kvikio_warm_probe.py --dir "$REPO/.bench/warm_probe" --json "$OUT/warm_probe.json" \
        ${WARM_PROBE_ARGS:-}
}

run_step() {
    # each step runs in a fresh bash under its deadline: it gets its own function and the helpers named here
    local name=$1 deadline=${2:-300} start rc
    start=$(date +%s)
    echo "=================== $name" | tee -a "$LOG"
    ( set -o pipefail; timeout "$deadline" bash -c "$(declare -f "step_$name" issue3_bench); step_$name" 2>&1 | tee -a "$LOG" )
    rc=$?
    SUMMARY+=("$name rc=$rc $(( $(date +%s) - start ))s")
}

echo "gpu_check $(date -u +%FT%TZ) on $(hostname)" | tee "$LOG"
install >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
for s in "${STEPS[@]}"; do
    case $s in
        tests) run_step tests 180 ;;
        bench_gds) run_step bench_gds 300 ;;
        bench_cli) run_step bench_cli 300 ;;
        warm_probe) run_step warm_probe 300 ;;
        fetch_groups) run_step fetch_groups 240 ;;
        issue3) run_step issue3 300 ;;
        udev) run_step udev 200 ;;
        cufile) run_step cufile 540 ;;
        warm_files) run_step warm_files 300 ;;
        store_files) run_step store_files 240 ;;
        *) run_step "$s" 60 ;;
    esac
done
printf '%s\n' "=================== summary" "${SUMMARY[@]}" | tee -a "$LOG"
