#!/usr/bin/env bash
# Everything a CUDA machine must prove about fastreg, for contributors with a GPU for a short
# while (docs/gpu_check.md): build the CUDA kernels, run the tests with the CUDA cases, run
# them under compute-sanitizer, benchmark, profile. Uses the Python in PATH (or $PYTHON) and
# the torch already installed there; installs nothing else.
#
#   scripts/gpu_check.sh                      build, info, tests
#   scripts/gpu_check.sh memcheck_dropout     further stages, after a build in an earlier call
#   scripts/gpu_check.sh memcheck_rest racecheck
#   scripts/gpu_check.sh bench hosttime penalty_tables profile
#   OUT=/some/dir scripts/gpu_check.sh ...    where logs and results go (default gpu-check/)
#
# Stages run in the order given; a failing stage is reported and the next one still runs, so
# one call gathers everything. The exit status is 1 when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python || command -v python3)}
out=${OUT:-gpu-check}
mkdir -p "$out"
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(build info tests)

build() {
  # The machine's own arch only: one arch to compile instead of the default two.
  local arch
  arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  FASTREG_BUILD_OPS=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    "$python" -m pip install --no-build-isolation --no-deps -e . 2>&1
}

info() {
  "$python" -m fastreg.info
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv
}

tests() {
  # tests/, and bench/'s quick set once, untimed, through the correctness gate (the bench
  # stage gates the full set before timing it)
  "$python" -m pytest tests bench --bench-set quick -q -ra -p no:cacheprovider --junitxml="$out/junit.xml"
}

# compute-sanitizer: the CUDA cases only (their ids contain "cuda"); torch.compile ones are
# left out: they launch no fastreg kernel that the eager cases do not, and take minutes under
# the tool. Measured on an H100: memcheck ran about 220 of these tests in 260 s (the dropout
# files), so the files are split over two stages, each meant to fit a 10-minute call.
sanitize() {
  local tool=$1
  shift
  compute-sanitizer --tool "$tool" --error-exitcode 1 "$python" -m pytest -q -p no:cacheprovider "$@" -k "cuda and not compile"
}

memcheck_dropout() {
  sanitize memcheck tests/test_dropout_rng.py tests/test_dropout_ops.py tests/test_dropout_semantics.py
}

memcheck_rest() {  # misaligned inputs: the kernels' unvectorised paths
  sanitize memcheck tests/test_weight_penalty.py tests/test_weight_penalty_module.py tests/test_weight_penalty_errors.py \
    tests/test_weight_penalty_graphs.py tests/test_weight_penalty_cuda_launches.py tests/test_misaligned_inputs.py \
    tests/test_batch_norm.py
}

racecheck() {  # the kernels with shared memory
  sanitize racecheck tests/test_weight_penalty.py tests/test_weight_penalty_module.py tests/test_weight_penalty_errors.py \
    tests/test_weight_penalty_graphs.py tests/test_batch_norm.py
}

sanitizer() { memcheck_dropout && memcheck_rest && racecheck; }

bench() {
  # No torch.compile rows: 56 compiles would not fit one 10-minute call with the rest (the
  # other rows took 163 s on an H100). bench_compile adds them in a run of its own.
  "$python" -m fastreg.bench --set full --device cuda --no-compile --out "$out/bench" --overwrite
}

bench_compile() {
  "$python" -m fastreg.bench --set full --device cuda --compile --out "$out/bench-compile" --overwrite
}

hosttime() {
  # Is a case bound by the host or by the GPU? Per call: host time of queuing 200 calls (no
  # synchronisation inside) against GPU time (events, one sync). Host >= GPU means the
  # benchmark row times the host's launch path, not the kernels.
  "$python" - <<'PY'
import time, torch, fastreg, fastreg.functional as F
import fastreg.bench.penalty_baselines, fastreg.bench.penalty_inputs

def measure(name, fn, calls=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    host = (time.perf_counter() - begin) / calls
    end.synchronize()
    gpu = start.elapsed_time(end) / 1e3 / calls
    print(f"{name:<40} host {host * 1e6:8.1f} us   gpu {gpu * 1e6:8.1f} us")

params = fastreg.bench.penalty_inputs.resnet50_like_params(device="cuda", grads=True)
penalty = fastreg.WeightPenalty(params, l1=1e-5, l2=1e-4)
measure("penalty add_grad_ resnet50", penalty.add_grad_)
measure("penalty _foreach_ resnet50", lambda: fastreg.bench.penalty_baselines.foreach_penalty_(params, 1e-5, 1e-4))
for dtype in (torch.float32, torch.bfloat16):
    for n in (1 << 16, 16 << 20):
        x = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        for label, fn in (("fastreg", lambda x: F.dropout(x, 0.1)), ("torch", lambda x: torch.nn.functional.dropout(x, 0.1))):
            measure(f"dropout fwd {label} {dtype} {n}", lambda: fn(x))
            measure(f"dropout fwd+bwd {label} {dtype} {n}", lambda: torch.autograd.grad(fn(x), x, dy))
PY
}

penalty_tables() {
  # The weight penalty with 512-tensor argument tables (32 KB of kernel arguments: ResNet-50's
  # 161 tensors in one launch) against 128-tensor ones (4 KB: two launches), in alternating
  # processes so that a drifting GPU shows as a spread, not as a difference.
  for round in 1 2 3; do
    for large in 1 0; do
      FASTREG_CUDA_LARGE_KERNEL_ARGS=$large "$python" - <<'PY'
import os, statistics, time, torch, fastreg

tables = "128" if os.environ["FASTREG_CUDA_LARGE_KERNEL_ARGS"] == "0" else "512"
for name in ("resnet50", "gpt2_small"):
    params = getattr(fastreg.penalty, f"{name}_like_params")(device="cuda", grads=True)
    penalty = fastreg.WeightPenalty(params, l1=1e-5, l2=1e-4)
    for _ in range(10):
        penalty.add_grad_()
    hosts, gpus = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin = time.perf_counter()
        start.record()
        for _ in range(100):
            penalty.add_grad_()
        end.record()
        hosts.append((time.perf_counter() - begin) / 100)
        end.synchronize()
        gpus.append(start.elapsed_time(end) / 1e3 / 100)
    print(f"tables {tables:>3}  {name:<10}  gpu {statistics.median(gpus) * 1e6:7.1f} us"
          f"  (min {min(gpus) * 1e6:7.1f})  host {statistics.median(hosts) * 1e6:6.1f} us")
PY
    done
  done
}

profile() {
  # DRAM throughput of each fastreg kernel at 16M elements, as Nsight Compute sees it.
  ncu --kernel-name regex:"dropout|penalty|batch_norm" --launch-skip 2 --launch-count 12 \
    --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes.sum \
    "$python" - <<'EOF'
import torch, fastreg, fastreg.functional as F
import fastreg.bench.penalty_inputs
x = torch.randn(16 << 20, device="cuda", requires_grad=True)
for dtype in (torch.float32, torch.bfloat16):
    xd = x.detach().to(dtype).requires_grad_()
    for _ in range(2):
        y = F.dropout(xd, 0.1)
        torch.autograd.grad(y, xd, torch.ones_like(y))
params = fastreg.bench.penalty_inputs.resnet50_like_params(device="cuda", grads=True)
for _ in range(3):
    fastreg.WeightPenalty(params, l1=1e-5, l2=1e-4).add_grad_()
for memory_format in (torch.contiguous_format, torch.channels_last):
    xb = torch.randn(256, 64, 56, 56, device="cuda", dtype=torch.bfloat16).to(memory_format=memory_format)
    bn = fastreg.BatchNorm2d(64).cuda()
    xb.requires_grad_()
    for _ in range(2):
        torch.autograd.grad(bn(xb), xb, torch.ones_like(xb))
torch.cuda.synchronize()
EOF
}

declare -A seconds status
failed=0
for stage in "${stages[@]}"; do
  if ! declare -F "$stage" >/dev/null; then
    echo "gpu_check: unknown stage '$stage' (build info tests memcheck_dropout memcheck_rest racecheck sanitizer bench bench_compile hosttime penalty_tables profile)" >&2
    exit 2
  fi
  echo "== $stage (log: $out/$stage.log) =="
  start=$SECONDS
  "$stage" 2>&1 | tee "$out/$stage.log"
  code=${PIPESTATUS[0]}
  seconds[$stage]=$((SECONDS - start))
  status[$stage]=$([[ $code -eq 0 ]] && echo ok || echo "FAILED (exit $code)")
  [[ $code -eq 0 ]] || failed=1
done

echo
echo "== gpu_check summary =="
for stage in "${stages[@]}"; do printf '  %-10s %5d s  %s\n' "$stage" "${seconds[$stage]}" "${status[$stage]}"; done
exit $failed
