#!/usr/bin/env bash
# GPU readiness check (bench/gpu_check.py): AttMask and SAGHOG training images/s and peak memory,
# embedding windows/s, torchrun DDP and checkpoint resumption, with one summary block.
#
#   bash bench/gpu_check.sh [--device cuda|cpu] [--steps N] [--size paper|tiny]
#   bash bench/gpu_check.sh --fetch-wheels      # here, before carrying bench/wheels to a GPU machine
#
# It runs on a bare GPU machine with PyTorch, timm, OpenCV, scikit-image, pandas and pyarrow: the
# project comes from this tree's src/ (never stale), and the other modules it imports (tqdm, yaml)
# are installed from bench/wheels when missing (--fetch-wheels downloads them there with the versions
# of .venv, for CPython $GPU_CHECK_PY, default 3.12, x86-64 manylinux). The check stops after 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=bench/wheels
NEEDED=(tqdm:tqdm yaml:PyYAML)  # module:distribution, pinned to the versions installed here

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  [[ -n "${PYTHON:-}" || ! -x .venv/bin/python ]] || PY=.venv/bin/python  # the project's environment
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  for pair in "${NEEDED[@]}"; do
    dist=${pair#*:}
    version=$("$PY" -c "import importlib.metadata as m; print(m.version('$dist'))" 2>/dev/null) ||
      { echo "gpu_check: $PY has no $dist to pin (set PYTHON to the project's python)" >&2; exit 2; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_CHECK_PY:-3.12}" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$WHEELS" "$dist==$version"
  done
  ls -l "$WHEELS"
  exit 0
fi

missing=()
for pair in "${NEEDED[@]}"; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair%%:*}")
done
if (( ${#missing[@]} )); then
  if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "gpu_check: missing ${missing[*]}; run 'bash bench/gpu_check.sh --fetch-wheels' and carry $WHEELS" >&2
    exit 2
  fi
  site=${TMPDIR:-/tmp}/gpu_check_site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec timeout 480 "$PY" bench/gpu_check.py "$@"
