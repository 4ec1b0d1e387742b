#!/usr/bin/env bash
# One check on a machine with an NVIDIA GPU: build, every CUDA test, every benchmark, one table.
#
#   bash benchmarks/gpu_check.sh            # logs and benchmark tables go to $OUT or /tmp/gpu_check
#   bash benchmarks/gpu_check.sh --quick    # under 5 minutes: build for this GPU only, the
#                                           # first-use selftest, the CUDA tests, the kernels' benchmarks
#
# Uses the installed torch (the GPU machines have no registry access), so it installs scratchformer
# with --no-deps. Must finish inside 8 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
rows=()
failed=0

step() {  # step NAME COMMAND...: run it, log to $out/NAME.log, add a row to the table
  local name=$1 start status
  shift
  start=$(date +%s)
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then status=pass; else status=FAIL; failed=1; fi
  tail -n 5 "$out/$name.log"
  rows+=("| $name | $status | $(($(date +%s) - start)) s | $name.log |")
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
if [ $quick = 1 ]; then  # machine code for this GPU only: a third of the default build's time
  export TORCH_CUDA_ARCH_LIST=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
fi
step build env SCRATCHFORMER_CUDA=1 python -m pip install -v --no-build-isolation --no-deps --no-cache-dir .
step info python -c "import scratchformer; print(scratchformer.build_info())"
# Whether a rejected input reaches Python as an error or kills the process (each case alone).
step unwind_check python tools/unwind_check.py
step selftest scratchformer selftest
[ $quick = 1 ] || step ptxas python tools/check_ptxas.py
step cuda_tests python -m pytest -m cuda -v -p no:cacheprovider tests
# The kernels' own benchmarks and the loss curves first: if the time runs out, the logs in $out
# already hold what matters most.
step bench_attention python benchmarks/bench_attention.py --out "$out" $([ $quick = 1 ] && echo "--reps 5")
step bench_layernorm python benchmarks/bench_layernorm.py --out "$out" $([ $quick = 1 ] && echo "--reps 10")
step bench_host python benchmarks/bench_host.py --out "$out"
step bench_masks python benchmarks/bench_masks.py --out "$out" $([ $quick = 1 ] && echo "--reps 5")
[ $quick = 1 ] || step train_curves python benchmarks/train_curves.py --steps 200 --backends fused,reference --out "$out"
for bench in benchmarks/bench_*.py; do
  [ $quick = 1 ] && break
  name=$(basename "$bench" .py)
  case $name in bench_attention | bench_layernorm | bench_host | bench_masks) continue ;; esac
  step "$name" python "$bench" --out "$out"
done

echo
cat "$out/info.log"
echo
echo "| step | result | time | log |"
echo "| --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
for table in "$out"/*.md; do
  [ -e "$table" ] && { echo; cat "$table"; }
done
exit $failed
