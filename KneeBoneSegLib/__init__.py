"""KneeBoneSeg: femur, tibia and patella from low-field knee MRI, as labels and printable surfaces.

Entry points: :func:`KneeBoneSegLib.pipeline.segment` and
:func:`KneeBoneSegLib.pipeline.postprocess`; the command line is
``kneeboneseg`` (:mod:`KneeBoneSegLib.cli`). Importing the package is cheap:
heavy dependencies (Keras, VTK) load only when a stage needs them.
"""

__version__ = "0.1.0"
