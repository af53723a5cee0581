"""Cases per hour of ``kneeboneseg batch``: 1 worker using every core, one worker per core, and a Dask LocalCluster, in one run.

    python bench/bench_batch.py [--cases 6] [--rounds 2] [--no-cluster] > bench/results/batch_workers.txt

The cases are crops of the sample scan (about a quarter of it each, every bone
cut by the crop's faces somewhere), segmented with the default settings. Each
configuration runs the whole batch into a new folder in a fresh process,
``--rounds`` times, alternating with the others so that all see the same
machine; the best round of each is reported (wall time, model loading included).
The cluster (the ``[cluster]`` extra) is a ``LocalCluster`` of one worker
process per core, started here once, restarted before each of its rounds (so
its workers open the model again) and reached with ``--scheduler``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _sample import sample_dir

from KneeBoneSegLib.io.images import read_volume, write_volume
from KneeBoneSegLib.threads import available_cores
from KneeBoneSegLib.volume import Volume

CROP = (144, 256, 224)  # k, j, i voxels of the sample scan (0.35 mm): 50 x 90 x 78 mm


def crops(folder: Path, count: int) -> list[Path]:
    scan = read_volume(sample_dir() / "knee_mri.nrrd")
    paths = []
    for n in range(count):
        start = (40 + 8 * n, 96 + 4 * n, 108 + 12 * n)
        box = tuple(slice(s, s + size) for s, size in zip(start, CROP))
        path = folder / f"crop-{n}.nrrd"
        write_volume(Volume(scan.array[box], scan.geometry.cropped(start)), path)
        paths.append(path)
    return paths


def run_batch(inputs: list[Path], outdir: Path, arguments: list[str]) -> float:
    command = [
        sys.executable,
        "-m",
        "KneeBoneSegLib",
        "batch",
        *map(str, inputs),
        "-o",
        str(outdir),
        *arguments,
        "--progress",
        "none",
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-cluster", action="store_true", help="leave the Dask LocalCluster out")
    args = parser.parse_args()
    cores = available_cores()
    configurations = {
        f"1 worker x {cores} threads": ["--workers", "1"],
        f"{cores} workers x 1 thread": ["--workers", str(cores)],
    }
    with contextlib.ExitStack() as stack:
        if not args.no_cluster:
            from distributed import Client, LocalCluster

            cluster = stack.enter_context(
                LocalCluster(n_workers=cores, threads_per_worker=1, processes=True, dashboard_address=None)
            )
            client = stack.enter_context(Client(cluster))
            configurations[f"Dask LocalCluster, {cores} x 1"] = [
                "--scheduler",
                cluster.scheduler_address,
                "--threads",
                "1",
            ]
        scratch = stack.enter_context(tempfile.TemporaryDirectory())
        inputs = crops(Path(scratch), args.cases)
        seconds = {name: [] for name in configurations}
        for round_ in range(args.rounds):
            for number, (name, arguments) in enumerate(configurations.items()):
                if "--scheduler" in arguments:
                    client.restart()  # fresh worker processes: each opens the model again, as the other runs do
                seconds[name].append(run_batch(inputs, Path(scratch) / f"out-{number}-{round_}", arguments))
    print(
        f"# python bench/bench_batch.py --cases {args.cases} --rounds {args.rounds} ({datetime.date.today().isoformat()}; {cores} cores, "
        f"load average {os.getloadavg()[0]:.1f} at the end; default settings, crops of the sample scan of {CROP[2]} x {CROP[1]} x {CROP[0]} voxels)"
    )
    print(f"{'configuration':32}{'best s':>9}{'cases/hour':>12}   all rounds, s")
    for name, rounds in seconds.items():
        best = min(rounds)
        print(f"{name:32}{best:9.1f}{args.cases / best * 3600:12.0f}   {', '.join(f'{s:.1f}' for s in rounds)}")


if __name__ == "__main__":
    main()
