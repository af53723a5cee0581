"""Reading images and writing results: image files, the run's outputs, the sample scan, atomic writes."""
