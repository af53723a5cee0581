"""Shared fixtures. The annotated sample scan is found through KNEEBONESEG_SAMPLE_DIR."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

SAMPLE_ENV = "KNEEBONESEG_SAMPLE_DIR"
DICOM_ENV = "KNEEBONESEG_SAMPLE_DICOM"


def pytest_collection_modifyitems(items):
    """Every test that needs the sample scan, through any fixture, is marked ``sample`` (``-m "not sample"`` leaves them out)."""
    for item in items:
        if "sample_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.sample)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The folder holding knee_mri.nrrd and knee_bones_labels.nrrd (and, in the project's copy, dicom_subset/)."""
    value = os.environ.get(SAMPLE_ENV)
    if not value:
        pytest.skip(f"{SAMPLE_ENV} is not set: the annotated sample scan is not available on this machine")
    # Resolved here, as the README's relative ``sample/`` must keep meaning the same folder wherever a test links or
    # changes directory.
    path = Path(value).resolve()
    if not (path / "knee_mri.nrrd").is_file():
        pytest.skip(f"{SAMPLE_ENV}={path} does not hold knee_mri.nrrd")
    return path


@pytest.fixture(scope="session")
def sample_dicom(sample_dir) -> Path:
    """The sample's 16 original DICOM slices: KNEEBONESEG_SAMPLE_DICOM, else the sample folder's dicom_subset/.

    A folder written by ``kneeboneseg sample`` has no DICOM; the project's sample folder has them in dicom_subset/.
    """
    folder = Path(os.environ.get(DICOM_ENV) or sample_dir / "dicom_subset").resolve()
    if not folder.is_dir():
        pytest.skip(f"{folder} is not a folder: set {DICOM_ENV} to the sample's dicom_subset/ to run the DICOM tests")
    return folder


@pytest.fixture(scope="session")
def sample_labels(sample_dir):
    """The ground-truth label map of the sample scan as a Volume (1 femur, 2 tibia, 3 patella)."""
    from KneeBoneSegLib.io.images import read_volume

    return read_volume(sample_dir / "knee_bones_labels.nrrd")


@pytest.fixture
def rng():
    return np.random.default_rng(20251124)


def knee_phantom(shape=(72, 64, 64), spacing=(2.5, 2.5, 2.5)):
    """A bright three-bone 'knee' on a dark background, in an identity-direction LPS frame.

    Returns ``(image, labels, geometry)``: femur (1) large and superior (high k,
    LPS +z), tibia (2) below it, patella (3) small and anterior (low j, LPS -y).
    """
    from KneeBoneSegLib.volume import Geometry

    k, j, i = np.indices(shape, dtype=float)
    centre_i = shape[2] / 2

    def ellipsoid(ck, cj, ci, rk, rj, ri):
        return ((k - ck) / rk) ** 2 + ((j - cj) / rj) ** 2 + ((i - ci) / ri) ** 2 <= 1

    labels = np.zeros(shape, np.uint8)
    labels[ellipsoid(shape[0] * 0.72, shape[1] * 0.55, centre_i, 16, 14, 18)] = 1
    labels[ellipsoid(shape[0] * 0.22, shape[1] * 0.55, centre_i, 12, 12, 16)] = 2
    labels[ellipsoid(shape[0] * 0.55, shape[1] * 0.14, centre_i, 6, 4, 7)] = 3
    image = np.where(labels > 0, 900.0, 100.0) + np.random.default_rng(7).normal(0, 20, shape)
    return image.astype(np.float32), labels, Geometry(spacing, (-10.0, 20.0, -30.0))


def largest_components(mask, count=3, min_fraction=0.0):
    """The library's :func:`~KneeBoneSegLib.postprocess.components.largest_in_box`, placed on the whole array."""
    from KneeBoneSegLib.postprocess.components import largest_in_box

    components = np.zeros(np.shape(mask), np.int32)
    box, in_box, sizes = largest_in_box(mask, count, min_fraction)
    if box is not None:
        components[box] = in_box
    return components, sizes


def measure_components(components, sizes, geometry, count, field_of_view=None):
    """The library's :func:`~KneeBoneSegLib.trust.plausibility.measure_boxes` for components 1..count of a whole array."""
    from scipy import ndimage

    from KneeBoneSegLib.trust.plausibility import measure_boxes

    return measure_boxes(
        components,
        (0, 0, 0),
        ndimage.find_objects(components, max_label=count),
        sizes,
        geometry,
        components.shape,
        field_of_view,
    )


def needs_keras():
    """Keras, or a skip saying which extra the test needs: Keras builds the stand-in networks of some tests."""
    return pytest.importorskip("keras", reason="needs Keras: pip install kneeboneseg[train]")


def threshold_network(patch_size: int = 16):
    """A real Keras 3D model that calls a voxel bone when its normalised intensity is above 0.5.

    It stands in for a trained U-Net where a test needs known, correct
    predictions: same input and output contract, computed by Keras.
    """
    keras = needs_keras()

    inputs = keras.Input((patch_size, patch_size, patch_size, 1))
    layer = keras.layers.Conv3D(1, 1, activation="sigmoid")
    outputs = layer(inputs)
    network = keras.Model(inputs, outputs)
    layer.set_weights([np.full((1, 1, 1, 1, 1), 40.0, np.float32), np.array([-20.0], np.float32)])
    return network


def sagittal_geometry(spacing=(0.4, 0.4, 3.0), tilt_deg: float = 10.0, origin=(12.0, -30.0, 40.0)):
    """A sagittally acquired grid, tilted ``tilt_deg`` about the left-right axis (LPS).

    Image axis i runs anterior to posterior, j superior to inferior (the
    in-plane rows and columns of a sagittal slice) and k right to left across
    the slices, as a DICOM sagittal series is stored: the array axes are in
    none of the axial order's places.
    """
    from KneeBoneSegLib.volume import Geometry

    angle = np.radians(tilt_deg)
    tilt = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    columns = tilt @ np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]]).T  # i, j, k
    return Geometry(spacing, origin, columns.ravel())


def patient_phantom(shape, geometry):
    """:func:`knee_phantom`'s three bones placed in patient millimetres, voxelised on any grid.

    Returns ``(image, labels)`` on ``geometry`` (array shape ``shape``, k, j, i):
    femur superior (LPS +z), tibia below it, patella anterior (LPS -y).
    """
    k, j, i = np.indices(shape, dtype=float)
    ijk = np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1)
    centre = geometry.index_to_lps((np.asarray(shape[::-1], float)[None] - 1) / 2)[0]
    x, y, z = (geometry.index_to_lps(ijk) - centre).T.reshape(3, *shape)

    def ellipsoid(cx, cy, cz, rx, ry, rz):
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1

    # Adult sizes (mm), so that the bones pass the anatomical plausibility rules: a femur 90 x 70 x 80,
    # a tibia 20 mm below it, a patella 35 x 20 x 30 in front of the femur.
    labels = np.zeros(shape, np.uint8)
    labels[ellipsoid(0, 10, 45, 45, 35, 40)] = 1
    labels[ellipsoid(0, 10, -45, 40, 30, 30)] = 2
    labels[ellipsoid(0, -45, 15, 17.5, 10, 15)] = 3
    image = np.where(labels > 0, 900.0, 100.0) + np.random.default_rng(7).normal(0, 20, shape)
    return image.astype(np.float32), labels


def position_network(patch_size: int = 16, widths=(3, 5)):
    """A real Keras model whose output depends on where a voxel lies in its sub-volume.

    The :func:`threshold_network`'s bone call, then averaged over a box of
    ``widths`` voxels along the sub-volume's last two axes with zero padding:
    near those faces the probability falls (as a U-Net's does near a
    sub-volume's faces), differently along each, and not along the first
    axis, so the three projections (which present the patient axes in
    different orders) predict three different maps.
    """
    keras = needs_keras()

    inputs = keras.Input((patch_size, patch_size, patch_size, 1))
    threshold = keras.layers.Conv3D(1, 1, activation="sigmoid")
    average = keras.layers.Conv3D(1, (1, *widths), padding="same", use_bias=False)
    network = keras.Model(inputs, average(threshold(inputs)))
    threshold.set_weights([np.full((1, 1, 1, 1, 1), 40.0, np.float32), np.array([-20.0], np.float32)])
    average.set_weights([np.full((1, *widths, 1, 1), 1.0 / np.prod(widths), np.float32)])
    return network


def position_network_tile(tile: np.ndarray, widths=(3, 5)) -> np.ndarray:
    """What :func:`position_network` computes for one sub-volume, in numpy (to check against)."""
    called = 1.0 / (1.0 + np.exp(-(40.0 * tile.astype(np.float64) - 20.0)))
    (a, b), (n, m) = widths, tile.shape[1:]
    padded = np.pad(called, [(0, 0), (a // 2, a // 2), (b // 2, b // 2)])
    return sum(padded[:, p : p + n, q : q + m] for p in range(a) for q in range(b)) / (a * b)


def write_threshold_onnx(path, card=None, patch_size: int = 16, dimensions: int = 3):
    """Write the same threshold network as :func:`threshold_network`, as an ONNX file (with ``card`` beside it).

    Built with the ``onnx`` package alone, so tests of the segmenting path run
    it on ONNX Runtime exactly as the shipped models run, without Keras.
    ``dimensions=2`` makes it a network of slices of any size, as the whole-knee model's.
    """
    import onnx
    from onnx import TensorProto, helper

    from KneeBoneSegLib.network.models import write_card

    shape = ["batch", patch_size, patch_size, patch_size, 1] if dimensions == 3 else ["batch", "rows", "columns", 1]
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["image", "gain"], ["scaled"]),
            helper.make_node("Add", ["scaled", "offset"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["bone_probability"]),
        ],
        "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("bone_probability", TensorProto.FLOAT, shape)],
        initializer=[
            helper.make_tensor("gain", TensorProto.FLOAT, [], [40.0]),
            helper.make_tensor("offset", TensorProto.FLOAT, [], [-20.0]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    if card is not None:
        write_card(card, path)
    return path


def rotation(axes: str, degrees) -> np.ndarray:
    """The 3x3 rotation by ``degrees`` about the LPS axes ``axes`` ("x" left, "y" posterior, "z" superior), in turn."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler(axes, np.atleast_1d(degrees), degrees=True).as_matrix()


def turned(volume, turn: np.ndarray, order: int = 1):
    """``volume`` on its own grid turned by ``turn`` about the grid's centre, as a scan acquired on oblique planes.

    The same spacing and size, the anatomy where it was; zero where the
    turned grid reaches beyond the scan (as a scanner console or Slicer
    fills it). ``order`` 1 for images, 0 for label maps.
    """
    from KneeBoneSegLib.preprocess.resampling import resample_onto
    from KneeBoneSegLib.volume import Volume

    shape = volume.array.shape
    geometry = volume.geometry.turned(turn, shape)
    return Volume(resample_onto(volume.array, volume.geometry, geometry, shape, order=order), geometry)
