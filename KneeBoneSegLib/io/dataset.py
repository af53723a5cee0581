"""The public annotated sample scan: where it is published and the files ``kneeboneseg sample`` makes of it.

Standard library only: 3D Slicer reads this at every start, when the module
offers the scan in its Sample Data module (:mod:`KneeBoneSegLib.slicer.sampledata`).
"""

#: The dataset's public repository at its latest commit (January 2024); the digests below pin its voxels.
DATASET_URL = "https://github.com/diego-romano/KneeBones3Dify-Annotated-Dataset/archive/a72fa052ba0c8ded7a264d78aa7a0dae08b4f755.zip"
IMAGE_FILE = "knee_mri.nrrd"
LABELS_FILE = "knee_bones_labels.nrrd"
#: :func:`~KneeBoneSegLib.io.sample.array_digest` of the assembled volume and labels (512 x 512 x 286 uint16 and uint8).
PUBLISHED_DIGESTS = {
    IMAGE_FILE: "b1d41d21b00614f1d5952c9ab5892dc6fee4b420cbe960acac3a0ce97e428589",
    LABELS_FILE: "fb1a1cf972bcfbaf6f1c9cb27473e863fcba16a58eefd68f085b28f3644912fc",
}
