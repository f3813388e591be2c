#!/usr/bin/env bash
# The GPU path's speed, in one run on a machine with an NVIDIA GPU: ms per photo for detection
# (MTCNN) and embedding (SFace) at batch sizes 1 to 256 on TensorRT (float16) and CUDA, the CPU
# provider for reference, and the clustering kNN with faiss on the GPU; the table replaces the
# gpu-batches section of docs/BENCHMARKS.md.
#
# Usage: benchmarks/gpu.sh [OUTDIR]   (default out/gpu/run-YYYY-MM-DD)
# Needs PyPI and pypi.nvidia.com for the first sync (tensorrt-cu12-libs fetches its wheel from
# there), or SKIP_SYNC=1 and a GPU_VENV made before. About 10 minutes on one GPU with the
# defaults, most of it the CPU reference and TensorRT's first engine builds.
# Environment: PHOTOS (256), BATCHES (1,2,4,...,256), CPU_BATCHES (1,16,256), REPS (2),
#   KNN (face counts for the kNN timing), GPU_VENV (var/venv-gpu), SKIP_SYNC=1 to use GPU_VENV
#   as it is (a machine without network), TRT_CACHE (var/tensorrt: kept between runs, so a
#   second run loads the engines instead of building them).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/gpu/run-$(date +%F)}
venv=${GPU_VENV:-var/venv-gpu}
mkdir -p "$out"

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu.sh: no NVIDIA GPU here (nvidia-smi missing or failing); nothing measured" >&2
  exit 2
fi
{ date -u; uname -a; nproc; nvidia-smi; } > "$out/machine.txt"

# Its own environment with the extra "gpu" (never next to the CPU onnxruntime: see pyproject.toml)
if [ "${SKIP_SYNC:-0}" != 1 ]; then
  UV=$(command -v uv 2>/dev/null || echo "$HOME/.local/bin/uv")
  UV_PROJECT_ENVIRONMENT="$venv" "$UV" sync --frozen --extra gpu >&2
fi
py="$venv/bin/python"

# TensorRT's and CUDA's libraries come from wheels, not the system: put them on the loader's path
# (facecore.models also preloads them; this covers ONNX Runtime builds that do not)
site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
libs=$(find "$site/tensorrt_libs" "$site"/nvidia/*/lib -maxdepth 0 -type d 2>/dev/null | paste -sd: -)
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

"$py" - <<'PY' | tee "$out/providers.txt"
import onnxruntime as ort, faiss
have = ort.get_available_providers()
print("onnxruntime", ort.__version__, "providers:", ", ".join(have))
print("faiss", faiss.__version__, "GPUs:", faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0)
missing = {"TensorrtExecutionProvider", "CUDAExecutionProvider"} - set(have)
if missing:
    raise SystemExit(f"this onnxruntime lacks {', '.join(sorted(missing))}: is onnxruntime (CPU) installed too?")
PY

"$py" benchmarks/gpu_batches.py \
  --providers TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider \
  --batches "${BATCHES:-1,2,4,8,16,32,64,128,256}" --cpu-batches "${CPU_BATCHES:-1,16,256}" \
  --photos "${PHOTOS:-256}" --reps "${REPS:-2}" --trt-cache "${TRT_CACHE:-var/tensorrt}" \
  --knn "${KNN:-1000,4000,16000,64000}" \
  --json "$out/gpu_batches.json" --write-docs docs/BENCHMARKS.md 2>&1 | tee "$out/gpu_batches.txt"
echo "gpu.sh: results in $out, table in docs/BENCHMARKS.md (section gpu-batches)" >&2
