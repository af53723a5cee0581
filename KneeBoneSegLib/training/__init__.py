"""Training the 3D U-Net on image + label-map pairs (``kneeboneseg train``).

The network is binary (bone against background; the three bones are named
afterwards by anatomy), so any label value above 0 is bone. Training follows
the paper, with what a network trained on very few scans needs to generalise:

- **Data.** Each pair is normalised as the model's card says (over the whole
  scan, as inference does), optionally restricted to a voxel range along the
  first image axis ``i`` (the spatial held-out split: the card's ``heldout``
  records the range never trained on) and resampled to the card's
  ``spacing_mm``, with the same functions the pipeline uses at inference.
- **Sub-volumes** are drawn on the fly, never all materialised: a
  ``boundary_fraction`` of them centred (with jitter) on bone-boundary voxels,
  where the errors are, the rest anywhere in the volume.
- **Augmentation** (:class:`Augmentation`): the paper's three projections as a
  random permutation of each sub-volume's axes, random flips, small rotations
  and scaling (all in one resampling of the sub-volume), then gamma, bias
  field, contrast and noise.
- **Synthetic images** (:mod:`.synthesis`, 2D networks): a share of the crops
  gets an image synthesised from a label map, another knee's or the training
  pair's own, with new random intensities for every crop (after SynthSeg), so
  that the network learns other knees' anatomy without their MR images.
- **Loss** binary cross-entropy (the paper's) plus ``dice_weight`` times the
  soft Dice loss of the batch (1.0 by default; 0 is the paper's loss alone); Adam.
- **Validation** on a fixed, seeded sample of unaugmented sub-volumes of the
  training data; the model file holds the weights of the best validation loss.
- **Exact resume.** After every epoch (and when ``progress`` cancels) a
  checkpoint beside the model stores weights, optimiser state, step, history
  and the sampler's random state, so a resumed run continues exactly where
  the last one stopped.

Files written beside ``OUTPUT.keras``: ``OUTPUT.onnx`` (the same network for
segmenting without Keras, :mod:`.export`), ``OUTPUT.json`` (the card: data,
augmentation, steps, time, machine, the command that reproduces it, the
export), ``OUTPUT.loss.png`` (loss curves) and ``OUTPUT.checkpoint.npz``.
Only Keras 3 APIs are used; the ONNX export goes through tf2onnx and so needs
the TensorFlow backend.

Modules: :mod:`.config` (the run's definition), :mod:`.augmentation`,
:mod:`.data` (pairs and crops), :mod:`.synthesis` (images from label maps), :mod:`.loop` (:func:`~.loop.train`),
:mod:`.arguments` (the command line), :mod:`.plot` (loss curves).
"""
