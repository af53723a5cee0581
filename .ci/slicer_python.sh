#!/usr/bin/env bash
# CI: the library as 3D Slicer runs it. For Slicer 5.8 (Python 3.9) and 5.10 (Python 3.12), build a
# virtual environment from that Python with the numpy, SciPy and SimpleITK versions that Slicer ships, add
# exactly what the module's first-use install adds (both lists come from KneeBoneSegLib/slicer/environment.py),
# then run the worker end to end on a crop of the sample scan, the worker runner's and the install's tests,
# and the MRML tests. The worker needs VTK for the bones' surfaces, as Slicer's own VTK provides it: on
# Python 3.9 the PyPI release closest to Slicer's VTK (slicer-core, which the MRML tests need, has no wheels
# for 3.9, so those skip there); on 3.12 the VTK slicer-core was built with (9.6, where Slicer 5.10 has 9.5),
# without VTK's optional matplotlib, which Slicer's VTK lacks too. Both environments download at once.
set -euo pipefail
cd "$(dirname "$0")/.."
SLICERS=(5.8 5.10)

# A Python X.Y: pyenv's newest X.Y.*, else pythonX.Y on the PATH.
find_python() {
  local root found
  if root="$(pyenv root 2>/dev/null)"; then
    found="$(ls -d "$root"/versions/"$1".* 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$found" ]] && { echo "$found/bin/python"; return; }
  fi
  command -v "python$1"
}

# Environment .venv-slicer<version> for Slicer <version>.
set_up() {
  local slicer=$1 python venv shipped first_use vtk
  python="$(find_python "$(PYTHONPATH="$PWD" python3 -m KneeBoneSegLib.slicer.environment python "$slicer")")"
  venv=".venv-slicer$slicer"
  "$python" -m venv --clear "$venv"
  local pip=("$venv/bin/python" -m pip install -qq --no-cache-dir --no-compile --disable-pip-version-check)
  shipped="$(PYTHONPATH="$PWD" "$venv/bin/python" -m KneeBoneSegLib.slicer.environment shipped "$slicer")"
  first_use="$(PYTHONPATH="$PWD" "$venv/bin/python" -m KneeBoneSegLib.slicer.environment first-use)"
  # shellcheck disable=SC2086  # one requirement a line
  "${pip[@]}" $shipped $first_use pytest
  if "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    "${pip[@]}" --no-deps slicer-core
    vtk="$("$venv/bin/python" -c 'import importlib.metadata as m; print(next(r for r in m.requires("slicer-core") if r.startswith("vtk")))')"
  else
    vtk="$(PYTHONPATH="$PWD" "$venv/bin/python" -m KneeBoneSegLib.slicer.environment vtk "$slicer")"
  fi
  "${pip[@]}" --no-deps "$vtk"
  echo "Slicer $slicer stand-in: Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(tr '\n' ' ' <<<"$shipped")+ $(tr '\n' ' ' <<<"$first_use")+ $vtk"
}

started=$SECONDS
logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
pids=()
for slicer in "${SLICERS[@]}"; do
  set_up "$slicer" >"$logs/$slicer.log" 2>&1 &
  pids+=($!)
done
for index in "${!SLICERS[@]}"; do
  if ! wait "${pids[$index]}"; then
    cat "$logs/${SLICERS[$index]}.log" >&2
    echo "setting up the Slicer ${SLICERS[$index]} stand-in failed" >&2
    exit 1
  fi
  cat "$logs/${SLICERS[$index]}.log"
done
echo "Slicer stand-ins set up in $((SECONDS - started)) s"

# The console-workflow test builds its stand-in network with the onnx package, a test tool that these
# environments leave out; test_slicer_logic.py runs the shipped model through the same bridge instead.
for slicer in "${SLICERS[@]}"; do
  KNEEBONESEG_SLICER="$slicer" PYTHONPATH="$PWD" ".venv-slicer$slicer/bin/python" -m pytest -q -ra -p no:cacheprovider \
    -W "ignore::DeprecationWarning" --deselect Testing/Python/test_mrml.py::test_console_workflow_from_volume_node_to_stl \
    Testing/Python/test_slicer_environment.py Testing/Python/test_worker.py \
    Testing/Python/test_mrml.py Testing/Python/test_slicer_logic.py Testing/Python/test_slicer_panel.py Testing/Python/test_slicer_sampledata.py
done
echo "Slicer stand-ins: $((SECONDS - started)) s in all"
