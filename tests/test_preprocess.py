"""Preprocessing: exact inverses, world coordinates preserved, resampling that respects geometry."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import rotation
from hypothesis import given, settings
from hypothesis import strategies as st

from medsynth.io import orientation_code
from medsynth.preprocess import (
    IntensityWindow,
    crop_or_pad,
    denormalise,
    foreground_box,
    foreground_mask,
    normalise,
    otsu_threshold,
    reorient_to_ras,
    resample,
    resample_to_grid,
    resampled_grid,
)

finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def windows(draw):
    low = draw(st.floats(min_value=-5000, max_value=5000))
    width = draw(st.floats(min_value=1e-2, max_value=1e4))
    return IntensityWindow(low, low + width)


@settings(max_examples=200, deadline=None)
@given(window=windows(), fractions=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=50))
def test_denormalise_inverts_normalise_inside_the_window(window, fractions):
    values = window.low + np.asarray(fractions) * (window.high - window.low)
    restored = denormalise(normalise(values, window), window)
    # float32 storage in between: relative error of order 1e-7 of the window's span and position
    tolerance = 1e-6 * (abs(window.low) + abs(window.high)) + 1e-6
    np.testing.assert_allclose(restored, values, atol=tolerance, rtol=0)


@settings(max_examples=100, deadline=None)
@given(window=windows(), values=st.lists(finite, min_size=1, max_size=50))
def test_normalise_clips_to_unit_range_and_is_monotonic(window, values):
    values = np.sort(np.asarray(values))
    out = normalise(values, window)
    assert out.min() >= -1.0 and out.max() <= 1.0
    assert np.all(np.diff(out) >= 0)


@st.composite
def affines(draw):
    """Any orientation: a random axis permutation with flips, a rotation up to 40°, any zooms, shear-free."""
    permutation = draw(st.permutations([0, 1, 2]))
    flips = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    angles = draw(st.lists(st.floats(min_value=-40, max_value=40), min_size=3, max_size=3))
    zooms = draw(st.lists(st.floats(min_value=0.3, max_value=5.0), min_size=3, max_size=3))
    base = np.eye(3)[:, permutation] * np.asarray(flips)
    affine = np.eye(4)
    affine[:3, :3] = rotation(*angles) @ base @ np.diag(zooms)
    affine[:3, 3] = draw(st.lists(st.floats(min_value=-200, max_value=200), min_size=3, max_size=3))
    return affine


@settings(max_examples=200, deadline=None)
@given(affine=affines(), shape=st.tuples(*[st.integers(2, 6)] * 3))
def test_reorientation_preserves_the_world_position_of_every_voxel(affine, shape):
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # each voxel's value is its id
    ras, ras_affine = reorient_to_ras(array, affine)
    assert sorted(ras.shape) == sorted(shape)
    old_index = np.stack(np.unravel_index(ras.astype(int).ravel(), shape), axis=1)  # where each came from
    new_index = np.stack(np.meshgrid(*[np.arange(n) for n in ras.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    old_world = old_index @ affine[:3, :3].T + affine[:3, 3]
    new_world = new_index @ ras_affine[:3, :3].T + ras_affine[:3, 3]
    np.testing.assert_allclose(new_world, old_world, atol=1e-6)
    # And the axes now point as close as possible to R, A, S: each axis has a positive component
    # along its own world axis, the largest it could have among the permutations.
    assert orientation_code(ras_affine) == "RAS"
    assert np.all(np.diag(ras_affine[:3, :3]) > 0)


def _linear_field(affine, shape, gradient, offset):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    return (world @ gradient + offset).astype(np.float32), world


@settings(max_examples=40, deadline=None)
@given(
    affine=affines(),
    spacing=st.floats(min_value=0.8, max_value=3.0),
    deoblique=st.booleans(),
    gradient=st.lists(st.floats(-2, 2), min_size=3, max_size=3),
)
def test_resampling_a_linear_field_is_exact_in_the_interior(affine, spacing, deoblique, gradient):
    """Trilinear interpolation reproduces a field linear in world coordinates exactly, whatever
    the grids; so any wrong coordinate mapping (axis order, flips, half-voxel shifts) shows up."""
    shape = (14, 12, 10)
    # Keep the target spacing below a third of the shortest side, so the output grid always has
    # voxel centres inside the input (a 3 mm grid over a 3 mm thin slab has none to compare).
    side_lengths = np.linalg.norm(affine[:3, :3], axis=0) * (np.asarray(shape) - 1)
    spacing = min(spacing, side_lengths.min() / 3)
    gradient = np.asarray(gradient)
    field, _ = _linear_field(affine, shape, gradient, 5.0)
    target_affine, target_shape = resampled_grid(affine, shape, (spacing,) * 3, deoblique)
    out = resample_to_grid(field, affine, target_affine, target_shape, fill=-999.0, antialias=False)
    expected, world = _linear_field(target_affine, target_shape, gradient, 5.0)
    # Only output voxels whose source position is inside the input's voxel-centre hull.
    inverse = np.linalg.inv(affine)
    source_index = world @ inverse[:3, :3].T + inverse[:3, 3]
    inside = np.all((source_index >= 0) & (source_index <= np.asarray(shape) - 1), axis=-1)
    assert inside.sum() > 0
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-3 * (1 + np.abs(expected).max()))


def test_resampled_grid_covers_the_field_of_view_and_keeps_its_centre():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-50, 10, 4]
    target, shape = resampled_grid(affine, (60, 40, 20), (4.0, 4.0, 4.0), deoblique=True)
    assert shape == (30, 20, 15)
    centre_in = affine @ np.array([59 / 2, 39 / 2, 19 / 2, 1])
    centre_out = target @ np.array([(shape[0] - 1) / 2, (shape[1] - 1) / 2, (shape[2] - 1) / 2, 1])
    np.testing.assert_allclose(centre_out, centre_in)


def test_resample_antialiases_when_shrinking():
    """A 1-voxel checkerboard shrunk 4× must become flat grey, not an aliased pattern."""
    checker = (np.indices((64, 64, 64)).sum(axis=0) % 2).astype(np.float32)
    out, _ = resample(checker, np.eye(4), (4.0, 4.0, 4.0), fill=0.5)
    assert out.shape == (16, 16, 16)
    assert np.abs(out[2:-2, 2:-2, 2:-2] - 0.5).max() < 0.02


def test_resample_is_identity_at_native_spacing():
    array = np.random.default_rng(0).random((8, 9, 10)).astype(np.float32)
    out, out_affine = resample(array, np.diag([2.0, 2.0, 2.0, 1.0]), (2.0, 2.0, 2.0))
    np.testing.assert_array_equal(out, array)


@settings(max_examples=100, deadline=None)
@given(
    shape=st.tuples(*[st.integers(3, 12)] * 3),
    target=st.tuples(*[st.integers(2, 14)] * 3),
    centre=st.tuples(*[st.floats(-3, 15)] * 3),
    affine=affines(),
)
def test_crop_or_pad_keeps_values_at_their_world_positions(shape, target, centre, affine):
    array = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1
    out, out_affine = crop_or_pad(array, affine, target, np.asarray(centre), fill=0.0)
    assert out.shape == target
    kept = np.argwhere(out > 0)
    for index in kept[:: max(1, len(kept) // 20)]:
        original = np.unravel_index(int(out[tuple(index)]) - 1, shape)
        np.testing.assert_allclose(
            out_affine[:3, :3] @ index + out_affine[:3, 3],
            affine[:3, :3] @ np.asarray(original) + affine[:3, 3],
            atol=1e-6,
        )


def test_crop_or_pad_centres_the_requested_voxel():
    array = np.zeros((50, 50, 50), dtype=np.float32)
    array[30, 20, 10] = 1.0
    out, _ = crop_or_pad(array, np.eye(4), (16, 16, 16), np.array([30, 20, 10]), fill=0.0)
    assert tuple(np.argwhere(out == 1.0)[0]) in {(7, 7, 7), (8, 8, 8)}


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(10, 3, 5000), rng.normal(200, 20, 3000)])
    threshold = otsu_threshold(values)
    assert values[:5000].max() < threshold < values[5000:].min()
    assert 60 < threshold < 120  # the middle of the gap, not its edge


def test_foreground_ignores_specks_of_noise():
    array = np.zeros((40, 40, 40), dtype=np.float32)
    array[10:30, 12:28, 14:26] = 100.0
    array[1, 1, 1] = array[38, 2, 37] = 100.0  # isolated noise voxels above threshold
    low, high = foreground_box(foreground_mask(array, "mr"))
    assert list(low) == [10, 12, 14] and list(high) == [29, 27, 25]


def test_ct_foreground_uses_hounsfield_threshold():
    array = np.full((20, 20, 20), -1000.0, dtype=np.float32)
    array[5:15, 5:15, 5:15] = 40.0
    mask = foreground_mask(array, "ct")
    assert mask.sum() == 1000


@pytest.mark.parametrize("low, high", [(0.0, 0.0), (float("nan"), 1.0), (5.0, 1.0)])
def test_invalid_windows_are_refused(low, high):
    with pytest.raises(ValueError):
        IntensityWindow(low, high)
