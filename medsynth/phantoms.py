"""Procedural 3D head phantoms in Hounsfield units: the demo's data and the tests' data generator.

Each phantom is a head-shaped set of nested, deformed ellipsoids with tissue values of a head CT
(air -1000, scalp 30, skull ~1000, CSF 5, grey matter 45, white matter 25 HU), lateral ventricles,
eyes and a nasal airway. Subjects vary in head size and shape, pose, skull thickness, ventricle
size and cortical folding, so a generative model has real variation to learn, and images can be
checked by eye (a GAN that copies one subject, or outputs noise, is obvious).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

AIR, SCALP, SKULL, CSF, GREY, WHITE, EYE = -1000.0, 30.0, 1000.0, 5.0, 45.0, 25.0, 12.0


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return rz @ rx @ ry


def _ellipsoid_radius(points: np.ndarray, centre, semi_axes) -> np.ndarray:
    """Normalised ellipsoidal radius: < 1 inside. `points` (..., 3) in mm, head coordinates."""
    return np.sqrt((((points - np.asarray(centre)) / np.asarray(semi_axes)) ** 2).sum(axis=-1))


def head_phantom(
    seed: int, shape: tuple[int, int, int] = (80, 80, 80), spacing: float = 2.5
) -> tuple[np.ndarray, np.ndarray]:
    """One subject: an int16 (x, y, z) array in HU, RAS-ordered, and its RAS+ affine."""
    rng = np.random.default_rng(seed)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing  # world origin at the volume centre
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float32)
    world = index * spacing + affine[:3, 3]  # (X, Y, Z, 3) mm

    # Pose and size of this subject.
    pose = _rotation(*np.radians(rng.uniform([-8, -10, -5], [8, 10, 5])))
    shift = rng.uniform(-6, 6, 3) + [0.0, 0.0, 8.0]
    head = world @ pose - shift  # head coordinates: x right, y anterior, z superior
    size = rng.uniform(0.9, 1.08)
    semi = np.array([68.0, 86.0, 78.0]) * size * rng.uniform(0.95, 1.05, 3)

    # Low-frequency boundary deformation, so no two heads have the same outline.
    direction = head / np.maximum(np.linalg.norm(head, axis=-1, keepdims=True), 1e-3)
    bumps = sum(
        a * np.sin(direction @ k + phase)
        for a, k, phase in zip(rng.uniform(0.01, 0.03, 4), rng.normal(0, 2.5, (4, 3)), rng.uniform(0, 2 * np.pi, 4))
    )
    radius = _ellipsoid_radius(head, (0, 0, 0), semi) * (1 + bumps)
    skull_inner = 0.93 - rng.uniform(0.0, 0.03)  # skull thickness varies by subject
    volume = np.full(shape, AIR, dtype=np.float32)
    volume[radius < 1.0] = SCALP
    volume[radius < 0.965] = SKULL + rng.uniform(-200, 300)
    volume[radius < skull_inner] = CSF

    # Brain: grey matter shell with folded cortex, white matter core.
    brain = radius < skull_inner - 0.025
    folds = (
        sum(np.sin(head @ k + phase) for k, phase in zip(rng.normal(0, 0.25, (6, 3)), rng.uniform(0, 2 * np.pi, 6)))
        / 6.0
    )
    volume[brain] = GREY
    white = (radius < 0.72 + 0.08 * folds) & brain
    volume[white] = WHITE
    sulci = brain & ~white & (np.abs(folds) < 0.04) & (radius > 0.78)
    volume[sulci] = CSF

    # Lateral ventricles: two curved ellipsoids whose size varies a lot between subjects (atrophy).
    ventricle_scale = rng.uniform(0.6, 1.5)
    for side in (-1.0, 1.0):
        centre = (side * 9.0 * size, 5.0, 12.0)
        axes = np.array([6.0, 28.0, 9.0]) * size * [ventricle_scale, 1.0, ventricle_scale]
        volume[_ellipsoid_radius(head, centre, axes) < 1.0] = CSF

    # Eyes and the nasal airway, in front and below.
    for side in (-1.0, 1.0):
        eye = _ellipsoid_radius(head, (side * 30.0 * size, semi[1] * 0.78, -28.0), (12.0, 12.0, 12.0)) < 1.0
        volume[eye] = EYE
    airway = _ellipsoid_radius(head, (0.0, semi[1] * 0.55, -40.0), (7.0, 14.0, 16.0)) < 1.0
    volume[airway & (radius < 0.93)] = AIR

    # Partial-volume blur and scanner noise.
    blurred = (
        volume + np.roll(volume, 1, 0) + np.roll(volume, -1, 0) + np.roll(volume, 1, 1) + np.roll(volume, -1, 1)
    ) / 5
    noisy = blurred + rng.normal(0.0, 4.0, shape)
    return np.clip(np.round(noisy), -1024, 3071).astype(np.int16), affine


def write_phantoms(
    folder: str | Path, count: int, seed: int = 0, shape: tuple[int, int, int] = (80, 80, 80), spacing: float = 2.5
) -> list[Path]:
    """Write `count` phantoms as int16 NIfTI files. Odd subjects are stored LPS, as DICOM-derived
    files often are, so reorientation is exercised too."""
    from medsynth.io import Volume, VolumeMeta, write_nifti

    folder = Path(folder)
    paths = []
    for i in range(count):
        array, affine = head_phantom(seed * 100_003 + i, shape, spacing)
        if i % 2:
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = [(shape[0] - 1), (shape[1] - 1)]
            array, affine = array[::-1, ::-1, :].copy(), affine @ flip
        path = folder / f"phantom_{i:03d}.nii.gz"
        volume = Volume(array=array.astype(np.float32), affine=affine, meta=VolumeMeta(modality="CT"))
        write_nifti(volume, path, dtype="int16", description="medsynth procedural head phantom (synthetic)")
        paths.append(path)
    return paths
