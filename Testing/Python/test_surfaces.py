"""Smoothed closed surfaces in patient millimetres, and binary STL files."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.measure import marching_cubes

from KneeBoneSegLib.errors import InputError
from KneeBoneSegLib.io.meshes import read_stl, write_stl
from KneeBoneSegLib.postprocess.surfaces import (
    Surface,
    bone_surface,
    bone_surfaces,
    enclosed_volume,
    extract_surface,
    is_watertight,
    mesh_edges,
    smooth_laplacian,
    surface_area,
    with_volume,
)
from KneeBoneSegLib.volume import Geometry

TILTED = Geometry((0.5, 0.6, 0.8), (12.0, -40.0, 7.0), (0, -1, 0, 1, 0, 0, 0, 0, 1))


def ball_mask(shape=(40, 44, 48), centre=(20, 22, 24), radius=12.0):
    k, j, i = np.indices(shape)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius**2


def test_surface_is_closed_outward_and_where_the_voxels_are():
    mask = ball_mask()
    surface = extract_surface(mask, TILTED)
    assert is_watertight(surface)
    centre_lps = TILTED.index_to_lps(np.argwhere(mask)[:, ::-1].mean(axis=0)[None])[0]
    np.testing.assert_allclose(surface.vertices.mean(axis=0), centre_lps, atol=0.05)
    voxels_mm3 = mask.sum() * np.prod(TILTED.spacing)
    assert enclosed_volume(surface) == pytest.approx(voxels_mm3, rel=0.03)


def test_isosurface_has_the_vertices_of_marching_cubes_and_is_closed_even_on_noise(rng):
    identity = Geometry((1, 1, 1), (0, 0, 0))
    blob = ball_mask(radius=9.0) & (rng.random((40, 44, 48)) < 0.97)  # a ball with pits and tunnels
    surface = extract_surface(blob, identity)
    vertices_kji, faces, _, _ = marching_cubes(np.pad(blob, 1).astype(np.float32), 0.5, allow_degenerate=False)
    # Marching cubes' vertices on voxel edges (the others are the centres it adds in some ambiguous cubes).
    on_edges = vertices_kji[np.count_nonzero(vertices_kji == np.round(vertices_kji), axis=1) == 2]
    np.testing.assert_array_equal(np.unique(surface.vertices, axis=0), np.unique((on_edges - 1)[:, ::-1], axis=0))
    assert is_watertight(surface) and abs(len(surface.faces) - len(faces)) < 0.01 * len(faces)
    # Cubes whose inside corners touch only across a face diagonal are split the same way
    # everywhere, so even pure noise gives closed, consistently oriented meshes.
    for density in (0.3, 0.5, 0.7):
        assert is_watertight(extract_surface(rng.random((16, 18, 20)) < density, identity))


def test_a_bone_cut_by_the_image_edge_still_gets_a_closed_surface():
    mask = ball_mask()
    mask[:8] = False
    cut = mask[6:]  # the ball's flat face lies on the first slice
    assert is_watertight(extract_surface(cut, Geometry((1, 1, 1), (0, 0, 0))))


def test_inverse_distance_laplacian_smoothing_rounds_a_voxel_sphere():
    mask = ball_mask(radius=10.0)
    geometry = Geometry((1, 1, 1), (0, 0, 0))
    raw = extract_surface(mask, geometry)
    smooth = smooth_laplacian(raw, 20)
    centre = np.array([24.0, 22.0, 20.0])

    def radial_spread(surface):
        return np.std(np.linalg.norm(surface.vertices - centre, axis=1))

    assert radial_spread(smooth) < 0.5 * radial_spread(raw)
    assert is_watertight(smooth) and np.array_equal(smooth.faces, raw.faces)
    # Laplacian smoothing shrinks a little: 20 steps take a 10-voxel ball within 15 % of its volume.
    assert 0.85 * 4 / 3 * np.pi * 10**3 < enclosed_volume(smooth) < enclosed_volume(raw)
    assert surface_area(smooth) < surface_area(raw)
    np.testing.assert_array_equal(smooth_laplacian(raw, 0).vertices, raw.vertices)


def test_smoothing_weights_nearer_neighbours_more():
    # Vertex 0 has neighbours at distance 1 (vertex 1) and 3 (vertex 2): it moves a quarter of the way to their plain mean.
    surface = Surface(np.array([[0.0, 0, 0], [1, 0, 0], [0, 3, 0]]), np.array([[0, 1, 2]]))
    moved = smooth_laplacian(surface, 1, relaxation=1.0).vertices[0]
    expected = (np.array([1.0, 0, 0]) / 1 + np.array([0, 3.0, 0]) / 3) / (1 / 1 + 1 / 3)
    np.testing.assert_allclose(moved, expected)


def test_mesh_edges_are_each_undirected_edge_once():
    tetrahedron = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [2, 0, 3]])
    np.testing.assert_array_equal(mesh_edges(tetrahedron), [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    assert is_watertight(Surface(np.eye(4)[:, :3], tetrahedron))
    assert not is_watertight(Surface(np.eye(4)[:, :3], tetrahedron[:3]))


def test_watertight_check_catches_holes_and_flipped_faces():
    surface = extract_surface(ball_mask(radius=5.0), Geometry((1, 1, 1), (0, 0, 0)))
    assert not is_watertight(Surface(surface.vertices, surface.faces[1:]))
    flipped = surface.faces.copy()
    flipped[0] = flipped[0, ::-1]
    assert not is_watertight(Surface(surface.vertices, flipped))


def test_bone_surface_reports_volumes_area_and_watertightness():
    mask = ball_mask()
    surface, report = bone_surface(mask, TILTED, smoothing_iterations=10)
    assert report["watertight"] is True and report["faces"] == len(surface.faces)
    assert report["volume_mm3_voxels"] == pytest.approx(mask.sum() * np.prod(TILTED.spacing), abs=0.1)
    # Smoothed, then given back the voxels' volume.
    assert report["volume_mm3"] == pytest.approx(report["volume_mm3_voxels"], rel=1e-4)
    assert report["area_mm2"] == pytest.approx(surface_area(surface), abs=0.1)


def test_a_smoothed_surface_gets_its_volume_back_and_stays_smooth():
    raw = extract_surface(ball_mask(radius=6.0), Geometry((1, 1, 1), (0, 0, 0)))
    smooth = smooth_laplacian(raw, 20)
    target = 4 / 3 * np.pi * 6.0**3
    restored = with_volume(smooth, target)
    assert enclosed_volume(smooth) < 0.97 * target  # a small ball shrinks by several per cent
    assert enclosed_volume(restored) == pytest.approx(target, rel=1e-4)
    centre = np.array([24.0, 22.0, 20.0])

    def radial_spread(surface):
        return np.std(np.linalg.norm(surface.vertices - centre, axis=1))

    # As smooth as smoothing left it.
    assert radial_spread(restored) <= 1.05 * radial_spread(smooth) < radial_spread(raw)
    assert is_watertight(restored) and np.array_equal(restored.faces, raw.faces)


@pytest.mark.parametrize("threads", [1, 2])
def test_all_bones_at_once_give_each_bone_its_own_surface(threads):
    from KneeBoneSegLib.threads import using_threads

    labels = np.zeros((40, 44, 80), np.uint8)
    labels[ball_mask((40, 44, 80), (20, 22, 20), 10)] = 1
    labels[ball_mask((40, 44, 80), (20, 22, 55), 14)] = 3  # label 2 absent, as a missing tibia
    finished = []
    from vtkmodules.vtkCommonCore import vtkSMPTools

    with using_threads(3 - threads):  # the other count first, so the one under test must be set by the run
        bone_surfaces(labels, TILTED, smoothing_iterations=0)
    with using_threads(threads):
        made = bone_surfaces(labels, TILTED, smoothing_iterations=5, done=finished.append)
    assert vtkSMPTools.GetEstimatedNumberOfThreads() == threads  # the run's count reached the surface threads
    assert sorted(made) == [1, 3] and sorted(finished) == [1, 3]
    for label, (surface, report) in made.items():
        alone, alone_report = bone_surface(labels == label, TILTED, smoothing_iterations=5)
        np.testing.assert_allclose(surface.vertices, alone.vertices, atol=1e-9)
        np.testing.assert_array_equal(surface.faces, alone.faces)
        assert report == alone_report and report["watertight"]


def test_a_raising_done_callback_stops_the_bones_and_reaches_the_caller():
    labels = np.zeros((40, 44, 80), np.uint8)
    labels[ball_mask((40, 44, 80), (20, 22, 20), 10)] = 1
    labels[ball_mask((40, 44, 80), (20, 22, 55), 14)] = 2

    def stop(label):
        raise RuntimeError(f"stopped after {label}")

    with pytest.raises(RuntimeError, match="stopped after"):
        bone_surfaces(labels, TILTED, done=stop)


def test_stl_round_trip_keeps_millimetres_and_says_lps(tmp_path):
    surface = extract_surface(ball_mask(radius=6.0), TILTED)
    path = tmp_path / "bone.stl"
    write_stl(surface, path)
    assert b"SPACE=LPS" in path.read_bytes()[:80]
    assert path.stat().st_size == 84 + 50 * len(surface.faces)
    back = read_stl(path)
    assert is_watertight(back) and len(back.faces) == len(surface.faces)
    assert enclosed_volume(back) == pytest.approx(enclosed_volume(surface), rel=1e-5)
    assert list(tmp_path.iterdir()) == [path]


def test_a_file_without_triangles_is_refused_in_one_line(tmp_path):
    path = tmp_path / "notes.stl"
    path.write_text("not a surface")
    with pytest.raises(InputError, match="holds no triangles"):
        read_stl(path)


def test_sample_patella_surface_is_watertight_and_matches_its_voxels(sample_labels):
    patella = sample_labels.array == 3
    surface, report = bone_surface(patella, sample_labels.geometry)
    voxels_mm3 = patella.sum() * np.prod(sample_labels.geometry.spacing)
    assert report["watertight"]
    assert report["volume_mm3_before_smoothing"] == pytest.approx(voxels_mm3, rel=0.02)
    # Smoothing shrank the patella by 0.59 % before its volume was given back; at most 0.5 % now.
    assert report["volume_mm3"] == pytest.approx(voxels_mm3, rel=0.005)
    centre = sample_labels.geometry.index_to_lps(np.argwhere(patella)[:, ::-1].mean(axis=0)[None])[0]
    assert np.linalg.norm(surface.vertices.mean(axis=0) - centre) < 1.0
