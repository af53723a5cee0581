"""Seconds per training step of the shipped architecture on each Keras backend installed, side by side.

    python bench/bench_training_backends.py [--steps 5] [--architecture compact slices]

Each backend runs in its own process (Keras picks its backend at import): each
architecture's network, its batch of sub-volumes, the training loss and Adam,
``train_on_batch`` on random data after two warm-up steps. Backends that are
not installed are listed as such. On the 2-core CPU this chose the backend
``bench/train_models.sh`` trains with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

BACKENDS = ("tensorflow", "torch", "jax")

_CHILD = """
import json, sys, time
import numpy as np
import keras
from KneeBoneSegLib.network.architectures import ARCHITECTURES
from KneeBoneSegLib.network.unet import build_unet
from KneeBoneSegLib.training.loop import bone_loss

preset, steps = ARCHITECTURES[sys.argv[1]], int(sys.argv[2])
network = build_unet(patch_size=preset.patch_size, **preset.network)
network.compile(optimizer=keras.optimizers.Adam(1e-3), loss=bone_loss(1.0))
rng = np.random.default_rng(0)
images = rng.random((preset.batch_size, *(preset.patch_size,) * 3, 1), dtype=np.float32)
bone = (images > 0.5).astype(np.float32)
for _ in range(2):
    network.train_on_batch(images, bone)
start = time.perf_counter()
for _ in range(steps):
    network.train_on_batch(images, bone)
print(json.dumps({"seconds_per_step": (time.perf_counter() - start) / steps, "keras": keras.__version__}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--architecture", nargs="+", default=["compact", "slices"])
    args = parser.parse_args()
    print(
        f"{args.steps} timed steps after 2 warm-up steps, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    for architecture, backend in ((a, b) for a in args.architecture for b in BACKENDS):
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, architecture, str(args.steps)],
            env={**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"},
            capture_output=True,
            text=True,
        )
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["failed"])[-1]
            print(f"  {architecture:8} {backend:12} not measured: {last}")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {architecture:8} {backend:12} {result['seconds_per_step']:6.2f} s per step (Keras {result['keras']})")


if __name__ == "__main__":
    main()
