#!/usr/bin/env bash
# The GPU check (issue 14): one command for a machine with an NVIDIA GPU, built to fit a short
# device loan (well under 9 minutes). It needs no Rust and no network: carry a binary built
# elsewhere, compressed (`make gpu-bundle` writes target/gpu-bundle/safepipe.xz).
#
#   scripts/gpu_check.sh [SAFEPIPE_BINARY_OR_.xz] [OUT_DIR]
#
# Steps, each with its own time limit so one stuck step cannot eat the loan; each writes JSON:
#   1. `safepipe gpu info`      where the CUDA libraries were found, NVRTC, the GPU
#   2. `safepipe gpu compile`   every kernel compiled for the GPU's architecture (cached)
#   3. `safepipe gpu check`     every kernel against the CPU backend (kernels.json)
#   4. `safepipe gpu bench`     our trainer's tokens/s and MFU at 135M, 360M, 1.7B, seq 2048
#                               (bench-*.json); the 135M run also saves its first batch and
#                               checkpoints for step 5
#   5. the PyTorch loss         our first-step loss against `transformers` on that batch and
#                               checkpoint (pytorch_loss.json)
#   6. the PyTorch baseline     tokens/s and MFU of the same shapes in PyTorch (baseline.json)
# Results: OUT_DIR/gpu_check.json gathers them (OUT_DIR defaults to $OUT, else ./gpu-check).
set -uo pipefail

binary="${1:-target/gpu-bundle/safepipe.xz}"
out="${2:-${OUT:-gpu-check}}"
mkdir -p "$out"
here="$(cd "$(dirname "$0")" && pwd)"

if [[ "$binary" == *.xz ]]; then
  xz -dc "$binary" > "$out/safepipe" && chmod +x "$out/safepipe" || { echo "cannot unpack $binary" >&2; exit 2; }
  binary="$out/safepipe"
fi
export SAFEPIPE_KERNEL_CACHE="$out/kernel-cache"

budget=${GPU_CHECK_BUDGET:-510}   # seconds: no step starts past it, none runs beyond it
step() {  # step NAME SECONDS COMMAND...: runs it, keeps its output and status
  local name="$1" limit="$2"; shift 2
  local left=$((budget - SECONDS))
  if (( left < 15 )); then
    echo "{\"step\": \"$name\", \"exit\": \"skipped: out of time\", \"seconds\": 0}" >> "$out/steps.jsonl"
    echo "== $name: skipped, out of time"; return
  fi
  (( limit > left )) && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start))}" >> "$out/steps.jsonl"
  echo "== $name: exit $rc in $((SECONDS - start)) s"; tail -n 40 "$out/$name.log"
}

: > "$out/steps.jsonl"
step info 60 "$binary" gpu info
arch="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)"
step compile 120 "$binary" gpu compile --arch "${arch:-sm_80,sm_90}"
step kernels 120 "$binary" gpu check --json "$out/kernels.json"
mkdir -p "$out/first"
step bench-135m 90 "$binary" gpu bench --model smollm2-135m --micro-batch 16 --steps 5 --json "$out/bench-135m.json" --save "$out/first"
step bench-360m 90 "$binary" gpu bench --model smollm2-360m --micro-batch 16 --steps 5 --json "$out/bench-360m.json"
step bench-1.7b 120 "$binary" gpu bench --model smollm2-1.7b --micro-batch 8 --steps 5 --json "$out/bench-1.7b.json"
step pytorch-loss 90 python3 "$here/gpu_pytorch_loss.py" "$out/first" "$out/bench-135m.json" "$out/pytorch_loss.json"
step baseline 240 python3 "$here/gpu_baseline.py" "$out/baseline.json" --steps 5

python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
def load(name):
    p = out / name
    return json.loads(p.read_text()) if p.exists() else None
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]
summary = {"steps": steps, "kernels": load("kernels.json"), "baseline": load("baseline.json"),
           "ours": [load(f"bench-{m}.json") for m in ("135m", "360m", "1.7b")],
           "pytorch_loss": load("pytorch_loss.json")}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(f"wrote {out / 'gpu_check.json'}")
PY
