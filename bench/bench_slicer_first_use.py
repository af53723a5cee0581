"""Download size of the Slicer module's first-use install, per supported Slicer Python and platform.

For each Python that Slicer runs (3.9: Slicer 5.6 and 5.8; 3.12: Slicer 5.10)
and each platform, ``pip download`` fetches the wheels of
:func:`KneeBoneSegLib.slicer_environment.first_use_requirements` with their
dependencies, next to the numpy and SciPy that Slicer ships (so that pip
resolves against them), and the sizes of the wheels that Slicer does not
already ship are added up: what a user's first **Segment** downloads.

    python bench/bench_slicer_first_use.py > bench/results/slicer_first_use.txt
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from KneeBoneSegLib.slicer_environment import SLICER_RELEASES, first_use_requirements, version_tuple  # noqa: E402

#: pip's --platform tags for each platform (pip does not widen a tag it is given to older ones).
PLATFORMS = {
    "Windows x86-64": ["win_amd64"],
    "macOS arm64": [f"macosx_{major}_0_{arch}" for major in (14, 13, 12, 11) for arch in ("arm64", "universal2")] + ["macosx_10_9_universal2"],
    "macOS x86-64": [f"macosx_{major}_{minor}_{arch}" for major, minor in ((13, 0), (12, 0), (11, 0), (10, 15), (10, 9)) for arch in ("x86_64", "universal2")],
    "Linux x86-64": [f"manylinux_2_{minor}_x86_64" for minor in (28, 27, 17)] + ["manylinux2014_x86_64"],
}
#: Packages in Slicer's Python already (its SuperBuild's python-* requirement files), by normalised name.
SLICER_SHIPS = {"numpy", "scipy", "simpleitk", "pillow", "packaging", "pyparsing", "six", "requests", "urllib3", "certifi", "idna", "charset-normalizer"}


def distribution_of(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def main() -> None:
    pythons = {}
    for slicer, release in SLICER_RELEASES.items():
        pythons.setdefault(release["python"], (slicer, release["shipped"]))
    print("# python bench/bench_slicer_first_use.py (2026-11-28; pip download of the first-use install, wheels Slicer does not ship; MB = 10^6 bytes)")
    for python, (slicer, shipped) in sorted(pythons.items(), key=lambda item: version_tuple(item[0])):
        requirements = first_use_requirements(version_tuple(python)[:2])
        anchors = [f"{name}=={version}" for name, version in shipped.items() if name in ("numpy", "scipy")]
        print(f"\nPython {python} (Slicer {', '.join(v for v, r in SLICER_RELEASES.items() if r['python'] == python)}): {' '.join(requirements)}")
        for platform, tags in PLATFORMS.items():
            with tempfile.TemporaryDirectory() as folder:
                command = [sys.executable, "-m", "pip", "download", "-q", "--no-cache-dir", "--only-binary=:all:",
                           "--python-version", python, *(f"--platform={tag}" for tag in tags), "-d", folder, *requirements, *anchors]  # fmt: skip
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    print(f"  {platform:<24} pip download failed: {done.stderr.strip().splitlines()[-1]}")
                    continue
                wheels = [wheel for wheel in Path(folder).glob("*.whl") if distribution_of(wheel) not in SLICER_SHIPS]
                total = sum(wheel.stat().st_size for wheel in wheels) / 1e6
                largest = sorted(wheels, key=lambda wheel: -wheel.stat().st_size)[:3]
                listed = ", ".join(f"{distribution_of(wheel)} {wheel.stat().st_size / 1e6:.1f}" for wheel in largest)
                print(f"  {platform:<24} {total:5.1f} MB in {len(wheels)} wheels (largest: {listed})")


if __name__ == "__main__":
    main()
