"""Resampling a volume onto another grid through the two grids' affines.

Used for sequences of one patient stored on different grids (a 1 mm isotropic T1 beside
a FLAIR of 5 mm slices): scans of one session share the scanner's frame, so each affine
(voxel index i, j, k -> patient mm) places both volumes in the same space, and sampling
one at the other's voxel centres aligns them. This does NOT correct motion between
sequences: a patient who moved between the scans stays misaligned (co-register with a
registration tool for that).

scipy.ndimage.affine_transform does the work (not nibabel.processing.resample_from_to,
which wraps the same call around image objects): arrays and affines in, an array out,
no header to build, and scipy is already a dependency. Values are sampled at the target
voxel centres (point sampling, no anti-aliasing when the target is coarser), as the
linear and nearest-neighbour interpolators of registration tools do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def grid_mapping(src_affine: np.ndarray, dst_affine: np.ndarray) -> np.ndarray:
    """The 4x4 matrix taking a voxel index of the target grid to the (fractional) voxel
    index of the source grid: inv(src_affine) @ dst_affine.

    Raises:
        ValueError: a singular or non-finite affine.
    """
    src, dst = np.asarray(src_affine, dtype=np.float64), np.asarray(dst_affine, dtype=np.float64)
    if src.shape != (4, 4) or dst.shape != (4, 4):
        raise ValueError(f"expected 4x4 affines, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("affines must be finite")
    try:
        return np.linalg.inv(src) @ dst
    except np.linalg.LinAlgError:
        raise ValueError("the source affine is singular; it does not place voxels in space") from None


def resample_to_grid(array: np.ndarray, src_affine: np.ndarray, dst_shape: Sequence[int], dst_affine: np.ndarray,
                     order: int = 1, cval: float = 0.0) -> np.ndarray:
    """`array` (I, J, K) on the grid of `src_affine`, sampled at the voxel centres of the
    grid (`dst_shape`, `dst_affine`).

    Args:
        array: (I, J, K) values; bool is resampled as 0/1 and returned as bool.
        src_affine, dst_affine: 4x4 voxel index -> mm (world) of each grid.
        dst_shape: (I', J', K') of the target grid.
        order: 1 linear (images), 0 nearest neighbour (labels).
        cval: the value of target voxels outside the source volume (NaN marks them, to
            count how much of the target the source covers).

    Returns:
        (I', J', K') array of `array`'s dtype (float32 for integer input at order 1, so
        that interpolated values are kept).

    Raises:
        ValueError: not 3-D, an order other than 0 or 1, or a singular affine.
    """
    from scipy.ndimage import affine_transform

    arr = np.asarray(array)
    if arr.ndim != 3 or len(dst_shape) != 3:
        raise ValueError(f"expected a 3-D array and a 3-D target shape, got {arr.shape} and {tuple(dst_shape)}")
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (nearest) or 1 (linear), got {order}")
    mapping = grid_mapping(src_affine, dst_affine)
    is_bool = arr.dtype == bool
    if is_bool:
        arr = arr.astype(np.uint8)
    out_dtype = arr.dtype if (order == 0 or arr.dtype.kind == "f") else np.dtype(np.float32)
    if np.isnan(cval) and out_dtype.kind != "f":
        out_dtype = np.dtype(np.float32)
    out = affine_transform(arr.astype(out_dtype, copy=False), mapping[:3, :3], offset=mapping[:3, 3],
                           output_shape=tuple(int(s) for s in dst_shape), output=out_dtype, order=order,
                           mode="constant", cval=cval, prefilter=False)
    return out.astype(bool) if is_bool else out
