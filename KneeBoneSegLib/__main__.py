"""``python -m KneeBoneSegLib`` is the ``kneeboneseg`` command line (Slicer runs it with PythonSlicer)."""

import sys

from .cli import main

sys.exit(main())
