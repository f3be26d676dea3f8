#!/usr/bin/env bash
# Prepare bench/gpu.py for a GPU machine that has Python 3.12 and torch but no package registry:
#   bench/gpu-wheels/  the wheels it needs besides torch, and requirements.txt naming them;
#   bench/gpu-inputs/  the real BraTS case (NIfTI) and 32 preprocessed NIH ChestX-ray14 images.
# Both are ignored by git (patient data and binaries are never committed) and travel as carried paths.
# On the device:
#   pip install --no-index --find-links bench/gpu-wheels -r bench/gpu-wheels/requirements.txt && python bench/gpu.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
WHEELS=bench/gpu-wheels
INPUTS=bench/gpu-inputs
BRATS=${BRATS:-../shared/data/brats/BraTS-GLI-00001-000}
# What bench/gpu.py imports through models/ and pipelines/brain_tumour/model.py, and their dependencies.
EXACT="monai nibabel pydantic pydantic-core annotated-types typing-inspection pydicom structlog"
# Often already beside torch; an installed version at least as new is kept.
AT_LEAST="numpy packaging typing-extensions"

rm -rf "$WHEELS" && mkdir -p "$WHEELS" "$INPUTS/$(basename "$BRATS")"
# This checkout's versions: the ones tested here, and pydantic matches its pydantic-core.
$PY - "$EXACT" "$AT_LEAST" > "$WHEELS/requirements.txt" <<'PYEOF'
import importlib.metadata as m, sys
for names, op in ((sys.argv[1], "=="), (sys.argv[2], ">=")):
    for name in names.split():
        print(f"{name}{op}{m.version(name)}")
PYEOF
# Pinned versions for --no-deps download (>= becomes == here, so the wheel is the one tested).
sed 's/>=/==/' "$WHEELS/requirements.txt" > "$WHEELS/download.txt"
$PY -m pip download --quiet --python-version 3.12 --only-binary=:all: --no-deps -d "$WHEELS" -r "$WHEELS/download.txt"
rm "$WHEELS/download.txt"

cp "$BRATS"/*.nii.gz "$INPUTS/$(basename "$BRATS")/"
$PY bench/gpu.py --prepare-chest >/dev/null
ls -l "$WHEELS"/*.whl | awk '{print $5, $9}'
du -cb "$WHEELS" "$INPUTS" | awk '{printf "%.1f MiB %s\n", $1 / 1048576, $2}'
