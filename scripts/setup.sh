#!/usr/bin/env bash
# Creates .venv with the locked dependencies. Usage: scripts/setup.sh [EXTRA ...]
# With no extras it installs what the service and the demo need (no torch). The extra "cpu"
# (ONNX Runtime and faiss for the CPU) is added unless "gpu" is asked for: the two install the
# same modules and never share an environment (pyproject.toml, [tool.uv] conflicts).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v uv >/dev/null 2>&1 && [ ! -x "$HOME/.local/bin/uv" ]; then
  echo "setup: installing uv (Python package manager) with pip" >&2
  python3 -m pip install --quiet --user uv 2>/dev/null || python3 -m pip install --quiet uv
fi
UV=$(command -v uv 2>/dev/null || echo "$HOME/.local/bin/uv")
[ -x "$UV" ] || UV=$(python3 -c 'import sysconfig,os;print(os.path.join(sysconfig.get_path("scripts"),"uv"))')

# Bytecode is compiled at install time: where PYTHONDONTWRITEBYTECODE is set, Python would
# otherwise compile ~700 modules on every start (4 s of each `facecluster` command).
args=(sync --frozen --compile-bytecode)
runtime=cpu
for extra in "$@"; do
  args+=(--extra "$extra")
  if [ "$extra" = gpu ]; then runtime=; fi
done
if [ -n "$runtime" ]; then
  args+=(--inexact --extra "$runtime")
fi
# with "gpu" the sync is exact: a venv that had the CPU wheels must lose them, or they
# would shadow the GPU ones
"$UV" "${args[@]}" >&2
.venv/bin/python -m compileall -q -j 0 libs services >/dev/null
