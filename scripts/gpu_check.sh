#!/usr/bin/env bash
# The prepared GPU check (issue #16): at most ~8 minutes on one H100/H200, fail-soft.
#
# Every step runs under its own timeout; its exit code and seconds go to summary.tsv and the
# script goes on. Files land under $WORK; $OUT (the device tool's output folder; default ./gpu_out) gets
# summary.tsv and gpu_check.tgz.
# Steps:
#   env        GPU, driver, torch/CUDA/cuBLAS/jax versions
#   pytest     the gpu-marked tests (fp8 _scaled_mm against the accumulator model, generator identity,
#              the flight recorder's C++ op log with CUDA's backward thread: compiled there, ~20 s,
#              torch.compile'd graphs counted and an eager capture naming a fused GELU: Triton, ~30 s, ...)
#   quick      `chipcheck run --profile quick` on the GPU: every default probe, expect pass
#   inject     the matmul probe with one flipped bit per output dtype: expect wrong in every case,
#              the flipped bit reported
#   check      reads both JSON runs: verdicts per case, the finding per dtype, bandwidth vs spec
#   burn       the burn probe (bf16 GEMMs, NVML samples), then with one flipped bit: expect pass, wrong
#   burn_check both burn runs read back: NVML's temperature, power and clocks are in the metrics
#   burnin     a minute of `--profile burnin --probes burn` (8192^3 bf16, fp32): pass, power-limit reasons read
#   list       `chipcheck list`: discovery with NVML (UUID, serial, VBIOS, driver)
#   repro      capture one model step on the GPU with a flipped bit, shrink with --reference cpu64,
#              run the emitted repro.py there
#   fused      one flipped bit in flash attention's output, in cuDNN attention's dq and in cuDNN batch
#              norm's dx, captured and replayed against cpu64: the op named (reproducers/fused.py
#              stands in for the kernels)
#   terms      backward kernels whose gradient cancels (cuDNN batch norm, layer norm, softmax, the SDPA
#              flash/efficient/cuDNN kernels over identical values) replayed against cpu64: expect clean
#              (reproducers/terms.py reads the CUDA kernels' argument layouts)
#   overhead   matmul probe (every oracle) vs bare torch.matmul at 8192^3 bf16 (target <= 1.03)
#   jax        `chipcheck run --backend jax --probes matmul` (when jax[cuda] is installed)
# Not covered on one GPU: collectives, model_dp and links need two or more devices, so NCCL is not
# exercised here (the quick run on one GPU runs neither).
# The order puts what no lease has verified yet first; overhead and jax (measured 2026-12-04) last.
# Usage: OUT=/some/dir scripts/gpu_check.sh     (exit 0 when every step exited as expected)
#        STEPS="fused terms" ... runs only the steps named
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# every step's files (logs, JSON, captures, the results store) go to $WORK; $OUT gets the summary and
# one archive of the logs, JSON, HTML and repro files (the device tool brings back at most 8 files)
WORK="${WORK:-$OUT/work}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
BUDGET_S="${BUDGET_S:-470}"   # no step starts after this many seconds
START=$(date +%s)
SUMMARY="$WORK/summary.tsv"
printf 'step\texpected\trc\tseconds\tnote\n' > "$SUMMARY"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

# step NAME TIMEOUT_S EXPECTED_RC CMD...: run CMD under a timeout, stdout+stderr to $WORK/NAME.log
step() {
    local name=$1 limit=$2 want=$3; shift 3
    local now elapsed left t0 rc
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then return 0; fi
    now=$(date +%s); elapsed=$((now - START)); left=$((BUDGET_S - elapsed))
    if (( left < 15 )); then
        printf '%s\t%s\tskipped\t0\tout of time budget\n' "$name" "$want" >> "$SUMMARY"
        echo "== $name: skipped (budget)"; return 0
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s)"
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$want" "$rc" "$(( $(date +%s) - t0 ))" \
        "$( (( rc == 124 || rc == 137 )) && echo timeout)" >> "$SUMMARY"
    tail -n 5 "$WORK/$name.log"
    return 0
}

step env 30 0 bash -c '
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,compute_cap --format=csv
    python3 -c "
import torch, platform
print(\"python\", platform.python_version(), \"torch\", torch.__version__, \"cuda\", torch.version.cuda,
      \"cudnn\", torch.backends.cudnn.version())
print(\"device\", torch.cuda.get_device_name(), \"cc\", torch.cuda.get_device_capability())
try:
    import jax; print(\"jax\", jax.__version__, jax.devices())
except Exception as e: print(\"jax: not usable:\", e)
try:
    import cupy; print(\"cupy\", cupy.__version__)
except Exception as e: print(\"cupy: not usable:\", e)
"'

# only the files holding gpu tests: collecting every file needs the test extra (jsonschema, ...),
# which a GPU image may lack (the H200's did)
step pytest 180 0 python3 -m pytest -q -m gpu -rs -p no:cacheprovider --junitxml="$WORK/pytest_gpu.xml" \
    $(grep -l "mark.gpu" tests/test_*.py)

step quick 120 0 python3 -m chipcheck.cli run --profile quick --devices cuda:0 --db "$WORK/results.db" \
    --json "$WORK/quick.json" --report "html=$WORK/quick.html"

step inject 75 1 python3 -m chipcheck.cli run --profile quick --devices cuda:0 --probes matmul \
    --inject bitflip:rank=0,bit=20,dtype=float32 --inject bitflip:rank=0,bit=13,dtype=bfloat16 \
    --inject bitflip:rank=0,bit=13,dtype=float16 --db "$WORK/results.db" --json "$WORK/inject.json"

step check 30 0 python3 - "$WORK/quick.json" "$WORK/inject.json" <<'PY'
import json, sys
def cases(path):
    try:
        data = json.load(open(path))
    except Exception as e:
        print(f"{path}: unreadable ({e})"); return []
    return [(p["probe"], c, p.get("metrics", {})) for d in data.get("devices", []) for p in d.get("probes", [])
            for c in p.get("details", {}).get("cases", [{"case": "-", "verdict": p.get("verdict")}])]
clean, injected = cases(sys.argv[1]), cases(sys.argv[2])
ok = bool(clean) and bool(injected)
print("clean run, --profile quick:")
for probe, c, _ in clean:
    mm = ", ".join(f"{m['oracle']}:{m['bad_elements']}" for m in c.get("mismatches", []))
    print(f"  {probe:12s} {c['case']:28s} {c['verdict']:8s} {mm}")
    ok &= c["verdict"] in ("pass", "skipped")
bw = {k: v for probe, _, metrics in clean if probe == "bandwidth" for k, v in metrics.items()}
spec = {"H200": 4800.0, "H100 80GB HBM3": 3350.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0}
try:
    import torch
    name = torch.cuda.get_device_name()
    gbs = next((v for k, v in spec.items() if k in name), None)
except Exception:
    name, gbs = "?", None
for k, v in sorted(set(bw.items())):
    if "gbps" in k:
        print(f"  bandwidth {k} = {v:.0f}" + (f"  ({v / gbs:.2f} of {name}'s {gbs:.0f} GB/s spec)" if gbs else ""))
print("one flipped bit per output dtype (fp32/tf32: 20; bf16, fp16 and fp8's bf16 output: 13), matmul:")
for probe, c, _ in injected:
    hist = {b for m in c.get("mismatches", []) for b in m.get("bit_histogram", {})}
    bit = "20" if c["case"].split("/")[0] in ("float32", "tf32") else "13"
    found = c["verdict"] in ("wrong", "flaky") and (c["case"].endswith("random") or bit in hist)
    print(f"  {c['case']:28s} {c['verdict']:8s} bits {sorted(hist, key=int)} {'ok' if found else 'MISSED'}")
    ok &= found
sys.exit(0 if ok else 1)
PY

# the burn probe on the GPU: sustained bf16 GEMMs, each iteration checked, NVML sampled (clocks,
# temperature, power, clock-event reasons); then the same with one flipped bit: expect wrong
step burn 60 0 python3 -m chipcheck.cli run --profile quick --devices cuda:0 --probes burn \
    --db "$WORK/results.db" --json "$WORK/burn.json"
step burn_inject 45 1 python3 -m chipcheck.cli run --profile quick --devices cuda:0 --probes burn \
    --inject bitflip:rank=0,bit=13,dtype=bfloat16 --db "$WORK/results.db" --json "$WORK/burn_inject.json"
step burn_check 20 0 python3 - "$WORK/burn.json" "$WORK/burn_inject.json" <<'PY'
import json, sys
def probe(path):
    try:
        return next(p for d in json.load(open(path))["devices"] for p in d["probes"] if p["probe"] == "burn")
    except Exception as e:
        print(f"{path}: no burn result ({e})"); return None
clean, bad = probe(sys.argv[1]), probe(sys.argv[2])
ok = clean is not None and bad is not None
if clean:
    m = clean.get("metrics", {})
    print("clean burn:", clean["verdict"], {k: round(v, 1) for k, v in sorted(m.items())})
    nvml = [k for k in m if k.endswith(("temp_c_max", "power_w_mean", "sm_mhz_min"))]
    print("NVML samples:", "yes" if len(nvml) == 3 else "MISSING")
    ok &= clean["verdict"] == "pass" and len(nvml) == 3
if bad:
    print("burn with bf16 bit 13 flipped:", bad["verdict"], "(wrong expected)")
    ok &= bad["verdict"] == "wrong"
sys.exit(0 if ok else 1)
PY

# a minute of the burn-in profile (8192^3 bf16 and fp32 GEMMs, 30 s each): a healthy chip reaches its
# power limit here; expect pass, and read the throughput ratio and the NVML reasons of each case
step burnin 120 0 bash -c '
    python3 -m chipcheck.cli run --profile burnin --duration 1m --devices cuda:0 --probes burn \
        --db "$0/results.db" --json "$0/burnin.json" || exit $?
    python3 - "$0/burnin.json" <<"PY"
import json, sys
for d in json.load(open(sys.argv[1]))["devices"]:
    for p in d["probes"]:
        m = p.get("metrics", {})
        for c in p.get("details", {}).get("cases", []):
            k = c["case"]
            print(k, c["verdict"], {x: round(m[f"{k}:{x}"], 3) for x in ("tflops", "tflops_best", "throughput_ratio",
                  "throttle_onset_s", "throttle_reason_onset_s", "sm_mhz_min", "power_w_mean", "temp_c_max")
                  if f"{k}:{x}" in m}, c.get("params", {}).get("throttle_reasons"))
PY
' "$WORK"

step list 20 0 python3 -m chipcheck.cli list

step repro 100 0 bash -c '
    set -e
    python3 - "$0" <<"PY"
import sys
from chipcheck.model import GPTConfig, TrainConfig, Trainer, data
from chipcheck.probes import faults
from chipcheck.reproducers import capture
spec = "bitflip:rank=0,bit=25,op=mm,after=12,count=1,at=call"
mc = GPTConfig.tiny()
tr = Trainer(mc, TrainConfig(), seed=6, device="cuda")
x, y = data.batch(mc, 6, 0, batch_size=4, device="cuda")
with faults.make_injector(faults.parse(spec), 0, "model_step")():
    with capture(sys.argv[1] + "/cap"):
        tr.step(x, y)
print("captured on cuda")
PY
    python3 -m chipcheck.cli repro shrink "$0/cap" --reference cpu64 \
        --inject "bitflip:rank=0,bit=25,op=mm,after=12,count=1,at=call" -o "$0/repro.py"
    rc=0; python3 "$0/repro.py" --device cuda --inject bitflip:bit=25 || rc=$?
    echo "repro.py with the fault on cuda: exit $rc (1 expected: it reproduces)"
    python3 "$0/repro.py" --device cuda && echo "repro.py clean on cuda: exit 0"
' "$WORK"

# a flipped bit inside CUDA's flash attention (forward output), cuDNN's backward (dq) and cuDNN batch norm's
# backward (dx): replay against
# cpu64 must name that op (the reference has no such kernel: reproducers/fused.py stands in), exit 1
step fused 60 0 bash -c '
    python3 - "$0" <<"PY"
import sys
import torch
import torch.nn.functional as f
from torch.nn.attention import SDPBackend, sdpa_kernel
from chipcheck.probes import faults
from chipcheck.reproducers import capture
g = torch.Generator(device="cuda").manual_seed(1)
q = torch.randn(2, 4, 128, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
for name, be, op in (("flash", SDPBackend.FLASH_ATTENTION, "_scaled_dot_product_flash_attention"),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION, "_scaled_dot_product_cudnn_attention_backward")):
    spec = f"bitflip:rank=0,bit=14,op={op},count=1"
    with faults.make_injector(faults.parse(spec), 0, "x")(), capture(f"{sys.argv[1]}/fused-{name}"):
        with sdpa_kernel([be]):
            f.scaled_dot_product_attention(q, q * 0.5, q, is_causal=True).float().sum().backward()
bn = torch.nn.BatchNorm2d(8).cuda()
y = torch.randn(4, 8, 6, 6, device="cuda", generator=g).requires_grad_()
wt = torch.randn(4, 8, 6, 6, device="cuda", generator=g)  # a loss whose dx does not cancel to zero
spec = "bitflip:rank=0,bit=27,op=cudnn_batch_norm_backward,count=1"
with faults.make_injector(faults.parse(spec), 0, "x")(), capture(f"{sys.argv[1]}/fused-bn"):
    (bn(y) * wt).sum().backward()
PY
    rc=0  # the chip is as faulty at replay as it was at capture: the same fault, simulated again
    for pair in flash:_scaled_dot_product_flash_attention cudnn:_scaled_dot_product_cudnn_attention_backward \
            bn:cudnn_batch_norm_backward; do
        d="$0/fused-${pair%%:*}"; op="${pair#*:}"
        bit=14; [ "${pair%%:*}" = bn ] && bit=27
        python3 -m chipcheck.cli repro replay "$d" --reference cpu64 --inject "bitflip:rank=0,bit=$bit,op=$op,count=1" \
            > "$d.log" 2>&1; r=$?; cat "$d.log"
        grep -q "$op" "$d.log" && [ $r = 1 ] && echo "$d: named, exit 1 (expected)" || { echo "$d: MISSED (exit $r)"; rc=1; }
    done
    exit $rc
' "$WORK"

step terms 90 0 bash -c '
    python3 - "$0" <<"PY"
import sys
import torch
import torch.nn.functional as f
from torch.nn.attention import SDPBackend, sdpa_kernel
from chipcheck.reproducers import capture
g = torch.Generator(device="cuda").manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    x = (torch.randn(16, 64, device="cuda", generator=g) * 3 + 1).to(dt).requires_grad_()
    f.layer_norm(x, (64,)).float().sum().backward()
    bn = torch.nn.BatchNorm2d(8).cuda().to(dt)
    y = torch.randn(4, 8, 6, 6, device="cuda", generator=g).to(dt).requires_grad_()
    with capture(f"{sys.argv[1]}/terms-{dt}"):
        f.layer_norm(x, (64,)).float().sum().backward()
        torch.softmax(x, -1).float().sum().backward()
        bn(y).float().sum().backward()
        q = torch.randn(2, 4, 64, 64, device="cuda", generator=g).to(dt).requires_grad_()
        v = torch.randn(2, 4, 1, 64, device="cuda", generator=g).to(dt).expand(2, 4, 64, 64)
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel([be]):
                    f.scaled_dot_product_attention(q, q.flip(-1) + 5, v, is_causal=True).float().sum().backward()
            except RuntimeError as e:
                print(f"{be} {dt}: not available ({str(e).splitlines()[0][:80]})")
PY
    rc=0; for d in "$0"/terms-*; do python3 -m chipcheck.cli repro replay "$d" --reference cpu64 || rc=1; done
    exit $rc
' "$WORK"

step overhead 75 0 python3 - <<'PY'
import contextlib, time
import torch
from chipcheck.probes import base, matmul
dev = torch.device("cuda")
n, reps = 8192, 10
ctx = base.ProbeContext(device=dev, device_kind="cuda", seed=0, profile="standard", timer=base.Timer(dev),
                        under_test=contextlib.nullcontext)
cfg = matmul.MatmulProbe.Config(sizes={"bfloat16": n}, repeats=reps, max_repeats=reps)
a = torch.rand(n, n, device=dev).to(torch.bfloat16)
b = torch.rand(n, n, device=dev).to(torch.bfloat16)
for _ in range(3):
    torch.matmul(a, b)
torch.cuda.synchronize()
print("| case | GEMM ms (median) | check ms per call | per-call ratio | probe wall s | bare wall s | wall ratio |")
print("|---|---|---|---|---|---|---|")
for case in ("bfloat16/exact", "bfloat16/random"):
    matmul.run(matmul.TorchBackend.of(ctx), cfg, case, 0)  # warm: allocator, cuBLAS heuristics
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = matmul.run(matmul.TorchBackend.of(ctx), cfg, case, 0)
    torch.cuda.synchronize()
    probe_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(out.repeats + 1):  # the warm-up call and the repeats
        torch.matmul(a, b)
    torch.cuda.synchronize()
    bare_s = time.perf_counter() - t0
    g, ck = out.metrics["time_ms"], out.metrics["check_ms"]
    print(f"| {case} | {g:.2f} | {ck:.2f} | {(g + ck) / g:.3f} | {probe_s:.3f} | {bare_s:.3f} | "
          f"{probe_s / bare_s:.2f} | verdict {out.verdict.value}")
PY

if python3 -c "import jax; assert any(d.platform == 'gpu' for d in jax.devices())" 2>/dev/null; then
    step jax 90 0 python3 -m chipcheck.cli run --backend jax --profile quick --probes matmul \
        --db "$WORK/results.db" --json "$WORK/jax.json"
else
    printf 'jax\t0\tskipped\t0\tjax[cuda] not installed or sees no GPU\n' >> "$SUMMARY"
fi

echo
echo "== summary ($(( $(date +%s) - START ))s; logs and JSON in $WORK, archived in $OUT/gpu_check.tgz)"
column -t -s $'\t' "$SUMMARY" 2>/dev/null || cat "$SUMMARY"
cp "$SUMMARY" "$OUT/summary.tsv"
(cd "$WORK" && find . -maxdepth 2 -type f \( -name '*.log' -o -name '*.json' -o -name '*.html' -o -name '*.tsv' \
    -o -name '*.xml' -o -name '*.py' -o -name '*.txt' \) -size -4M -print0 | tar czf "$OUT/gpu_check.tgz" --null -T -)
awk -F'\t' 'NR > 1 && $3 != "skipped" && $3 != $2 { bad = 1 } END { exit bad }' "$SUMMARY"
