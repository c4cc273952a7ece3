"""Resampling a volume from one grid onto another through their affines (voxel -> mm)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def resample_to_grid(volume: np.ndarray, affine_src: np.ndarray, shape_dst: Sequence[int],
                     affine_dst: np.ndarray, order: int = 1, cval: float = 0.0) -> np.ndarray:
    """`volume` resampled onto another grid: every destination voxel takes the value of
    the source at the same position in mm (linear interpolation for order 1, nearest
    neighbour for order 0). Destination voxels outside the source volume get `cval`.

    Args:
        volume: (I, J, K) values on the source grid.
        affine_src: 4x4 voxel index (i, j, k, 1) -> position in mm of the source.
        shape_dst: (I', J', K') of the destination.
        affine_dst: 4x4 voxel index -> mm of the destination (same world space).
        order: spline order (0 nearest, 1 linear).

    Returns:
        float32 (I', J', K').

    Raises:
        ValueError: `volume` not 3-D or an affine not 4x4 and invertible.
    """
    from scipy.ndimage import map_coordinates

    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {volume.shape}")
    affine_src, affine_dst = np.asarray(affine_src, float), np.asarray(affine_dst, float)
    if affine_src.shape != (4, 4) or affine_dst.shape != (4, 4):
        raise ValueError(f"expected 4x4 affines, got {affine_src.shape} and {affine_dst.shape}")
    try:
        dst_to_src = np.linalg.inv(affine_src) @ affine_dst
    except np.linalg.LinAlgError as e:
        raise ValueError("the source affine is singular (a zero voxel size?)") from e
    shape_dst = tuple(int(s) for s in shape_dst)
    idx = np.indices(shape_dst, dtype=np.float64).reshape(3, -1)
    coords = dst_to_src[:3, :3] @ idx + dst_to_src[:3, 3:4]
    # Positions a rounding error outside the first/last voxel centre are inside: without this
    # a destination plane lying exactly on the source's border would read cval.
    for axis, n in enumerate(volume.shape):
        near = (coords[axis] > -1e-3) & (coords[axis] < n - 1 + 1e-3)
        coords[axis][near] = np.clip(coords[axis][near], 0, n - 1)
    out = map_coordinates(volume.astype(np.float32, copy=False), coords, order=order, mode="constant", cval=cval,
                          prefilter=False)
    return out.reshape(shape_dst).astype(np.float32, copy=False)
