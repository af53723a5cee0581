#!/usr/bin/env bash
# CI: the library as 3D Slicer runs it. For Slicer 5.8 (Python 3.9) and 5.10 (Python 3.12), build a
# virtual environment from that Python with the numpy, SciPy and SimpleITK versions that Slicer ships, add
# exactly what the module's first-use install adds (both lists come from KneeBoneSegLib/slicer_environment.py),
# then run the worker end to end on a crop of the sample scan, the worker runner's and the install's tests,
# and the MRML tests. slicer-core, which the MRML tests need, has no wheels for Python 3.9, so those skip
# there; on 3.12 it brings its own VTK, which takes the place of the stand-in for Slicer's VTK 9.5.
set -euo pipefail
cd "$(dirname "$0")/.."

# A Python X.Y: pyenv's newest X.Y.*, else pythonX.Y on the PATH.
find_python() {
  local root
  if root="$(pyenv root 2>/dev/null)"; then
    local found
    found="$(ls -d "$root"/versions/"$1".* 2>/dev/null | sort -V | tail -n 1)"
    [[ -n "$found" ]] && { echo "$found/bin/python"; return; }
  fi
  command -v "python$1"
}


for slicer in 5.8 5.10; do
  started=$SECONDS
  python_version="$(PYTHONPATH="$PWD" python3 -m KneeBoneSegLib.slicer_environment python "$slicer")"
  python="$(find_python "$python_version")" || { echo "no Python $python_version for Slicer $slicer" >&2; exit 1; }
  venv=".venv-slicer$slicer"
  "$python" -m venv --clear "$venv"
  shipped="$(PYTHONPATH="$PWD" "$venv/bin/python" -m KneeBoneSegLib.slicer_environment shipped "$slicer")"
  first_use="$(PYTHONPATH="$PWD" "$venv/bin/python" -m KneeBoneSegLib.slicer_environment first-use)"
  extra=(pytest)
  if "$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    shipped="$(grep -v '^vtk==' <<<"$shipped")"
    extra+=(slicer-core)
  fi
  # shellcheck disable=SC2086  # one requirement a line
  "$venv/bin/python" -m pip install -qq --no-cache-dir --disable-pip-version-check $shipped $first_use "${extra[@]}"
  echo "Slicer $slicer stand-in: Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())'), $(tr '\n' ' ' <<<"$shipped")+ $(tr '\n' ' ' <<<"$first_use")($((SECONDS - started)) s to set up)"
  KNEEBONESEG_SLICER="$slicer" PYTHONPATH="$PWD" "$venv/bin/python" -m pytest -q -ra -p no:cacheprovider \
    Testing/Python/test_slicer_environment.py Testing/Python/test_worker.py \
    Testing/Python/test_mrml.py Testing/Python/test_slicer_logic.py
  echo "Slicer $slicer stand-in: $((SECONDS - started)) s in all"
done
