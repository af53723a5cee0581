"""Download size of the Slicer module's first-use install, per supported Slicer Python and platform.

For each Python that Slicer runs (3.9: Slicer 5.6 and 5.8; 3.12: Slicer 5.10)
and each platform, ``pip download`` fetches the wheels of
:func:`KneeBoneSegLib.slicer.environment.first_use_requirements` with their
dependencies, next to the numpy and SciPy that Slicer ships (so that pip
resolves against them), and the sizes of the wheels that Slicer does not
already ship are added up: what a user's first **Segment** downloads.

    python bench/bench_slicer_first_use.py > bench/results/slicer_first_use.txt
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from KneeBoneSegLib.slicer.environment import SLICER_RELEASES, first_use_requirements, version_tuple  # noqa: E402

#: pip's --platform tags for each platform (pip does not widen a tag it is given to older ones).
PLATFORMS = {
    "Windows x86-64": ["win_amd64"],
    "macOS arm64": [f"macosx_{major}_0_{arch}" for major in (14, 13, 12, 11) for arch in ("arm64", "universal2")]
    + ["macosx_10_9_universal2"],
    "macOS x86-64": [
        f"macosx_{major}_{minor}_{arch}"
        for major, minor in ((13, 0), (12, 0), (11, 0), (10, 15), (10, 9))
        for arch in ("x86_64", "universal2")
    ],
    "Linux x86-64": [f"manylinux_2_{minor}_x86_64" for minor in (28, 27, 17)] + ["manylinux2014_x86_64"],
}
#: Packages in Slicer's Python already (its SuperBuild's python-* requirement files), by normalised name.
SLICER_SHIPS = {
    "numpy",
    "scipy",
    "simpleitk",
    "pillow",
    "packaging",
    "pyparsing",
    "six",
    "requests",
    "urllib3",
    "certifi",
    "idna",
    "charset-normalizer",
}


def distribution_of(wheel: Path) -> str:
    return re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()


def slicer_pythons() -> dict:
    """``{python: (first Slicer release on it, what that release ships)}``, oldest Python first."""
    pythons = {}
    for slicer, release in SLICER_RELEASES.items():
        pythons.setdefault(release["python"], (slicer, release["shipped"]))
    return dict(sorted(pythons.items(), key=lambda item: version_tuple(item[0])))


def first_use_download(python: str, shipped: dict, tags: list, extra: tuple = ()) -> list:
    """The wheels (paths' names and sizes) a first use on ``python`` and platform ``tags`` downloads, plus ``extra``.

    Wheels that Slicer ships already are left out; numpy and SciPy are pinned
    to Slicer's so that pip resolves against them. Raises RuntimeError with
    pip's last line when pip cannot resolve.
    """
    requirements = first_use_requirements(version_tuple(python)[:2]) + list(extra)
    anchors = [f"{name}=={version}" for name, version in shipped.items() if name in ("numpy", "scipy")]
    with tempfile.TemporaryDirectory() as folder:
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-cache-dir",
            "--only-binary=:all:",
            "--python-version",
            python,
            *(f"--platform={tag}" for tag in tags),
            "-d",
            folder,
            *requirements,
            *anchors,
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        return [
            (distribution_of(wheel), wheel.stat().st_size)
            for wheel in Path(folder).glob("*.whl")
            if distribution_of(wheel) not in SLICER_SHIPS
        ]


def main() -> None:
    print(
        f"# python bench/bench_slicer_first_use.py ({datetime.date.today().isoformat()}; pip download of the first-use install, wheels Slicer does not ship; MB = 10^6 bytes)"
    )
    for python, (slicer, shipped) in slicer_pythons().items():
        print(
            f"\nPython {python} (Slicer {', '.join(v for v, r in SLICER_RELEASES.items() if r['python'] == python)}): {' '.join(first_use_requirements(version_tuple(python)[:2]))}"
        )
        for platform, tags in PLATFORMS.items():
            try:
                wheels = first_use_download(python, shipped, tags)
            except RuntimeError as error:
                print(f"  {platform:<24} pip download failed: {error}")
                continue
            total = sum(size for _, size in wheels) / 1e6
            listed = ", ".join(
                f"{name} {size / 1e6:.1f}" for name, size in sorted(wheels, key=lambda wheel: -wheel[1])[:3]
            )
            print(f"  {platform:<24} {total:5.1f} MB in {len(wheels)} wheels (largest: {listed})")


if __name__ == "__main__":
    main()
