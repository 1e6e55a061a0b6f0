#!/usr/bin/env bash
# Gather what a GPU machine without internet needs to run benchmarks/gpu/checks.sh, beside an image that already
# has PyTorch, Lightning, torchmetrics, NumPy, SciPy, Pillow, PyYAML, einops, safetensors and huggingface_hub:
# wheels of medsynth's other dependencies for that machine's Python, and the MNI152 template files the demo data
# and benchmarks/datasets.py are built from. Writes .gpu/ (git-ignored); copy it beside the checkout there.
#
#   bash benchmarks/gpu/bundle.sh                    # for CPython 3.12 on x86-64 Linux
#   PYVER=3.11 bash benchmarks/gpu/bundle.sh
#   LEAN=1 bash benchmarks/gpu/bundle.sh             # under 20 MB: no SimpleITK wheel (52 MB), see below
#
# LEAN=1 is for transfers capped in size: torchio imports SimpleITK, which only reads medical files here, so a
# stand-in module that refuses any use takes its place. The checks never read files through it (the 2D datasets
# are PNGs, the 3D benchmarks use random volumes); anything that does fails with "SimpleITK is not installed".
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
VENV=${VENV:-.venv}
out=.gpu
rm -rf "$out" && mkdir -p "$out/wheels" "$out/extra/nilearn/datasets/data"
version() { "$VENV/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=(monai diffusers torchio nibabel jsonargparse docstring-parser typeshed-client deprecated lightning)
[ "${LEAN:-0}" = 1 ] || pkgs+=(simpleitk)
specs=()
for p in "${pkgs[@]}"; do specs+=("$p==$(version "$p")"); done
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d "$out/wheels" "${specs[@]}"
# nilearn only ships the template files medsynth reads (it locates the package and never imports it)
nilearn=$("$VENV/bin/python" -c "import importlib.util as u; print(list(u.find_spec('nilearn').submodule_search_locations)[0])")
cp "$nilearn"/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz "$out/extra/nilearn/datasets/data/"
printf '"""The MNI152 template files of nilearn, without nilearn (bundled by benchmarks/gpu/bundle.sh)."""\n' \
    > "$out/extra/nilearn/__init__.py"
if [ "${LEAN:-0}" = 1 ]; then
    mkdir -p "$out/extra/SimpleITK"
    cat > "$out/extra/SimpleITK/__init__.py" <<'PY'
"""Stand-in for SimpleITK (benchmarks/gpu/bundle.sh LEAN=1): torchio names it at import; any use fails."""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"SimpleITK is not installed here (a LEAN=1 bundle): {name} is unavailable")

    return type(name, (), {"__init__": refuse, "__call__": refuse})
PY
fi
du -sh "$out"
ls "$out/wheels"
