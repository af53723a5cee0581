"""What the 3D Slicer module uses: MRML conversion, run handling, the background worker, Slicer's Python environment."""
