"""Five-point face alignment onto the ArcFace 112x112 template, in NumPy (no OpenCV).

`estimate_similarity` is Umeyama's least-squares similarity (rotation, uniform scale, translation; never a
reflection), the transform insightface gets from scikit-image's `SimilarityTransform.estimate`. `warp_affine`
samples bilinearly with a zero border, as `cv2.warpAffine(..., borderValue=0)` does: pixel centres sit at integer
coordinates, and a sample near the edge blends the image with zeros. OpenCV interpolates in fixed point (1/32 pixel,
15-bit weights), so its crops can differ from these by a grey level here and there.
"""

from __future__ import annotations

import numpy as np

# Where insightface puts the eyes, nose tip and mouth corners in a 112x112 crop (x, y in pixels).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
ALIGNED_SIZE = 112


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix `[sR | t]` minimising `sum ||dst_i - (sR src_i + t)||^2` over rotations R, scales s >= 0.

    Raises `ValueError` for mismatched shapes, fewer than two points, or source points that all coincide.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 2 or src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need two (N, 2) point arrays with N >= 2, got {src.shape} and {dst.shape}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks must be finite numbers")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_centred, dst_centred = src - src_mean, dst - dst_mean
    src_var = float((src_centred**2).sum()) / len(src)
    if src_var <= 1e-12:
        raise ValueError("all landmarks are at the same point: no similarity transform is defined")
    covariance = dst_centred.T @ src_centred / len(src)
    u, singular, vt = np.linalg.svd(covariance)
    # The best orthogonal matrix may be a reflection; the best rotation flips the weakest axis instead (Umeyama).
    signs = np.array([1.0, 1.0 if np.linalg.det(u) * np.linalg.det(vt) > 0 else -1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = float((singular * signs).sum()) / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.hstack([scale * rotation, translation[:, None]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Warp an `(H, W, C)` uint8 image by the 2x3 `matrix` (source pixel -> output pixel) into `size = (h, w)`.

    Bilinear; whatever maps from outside the source reads as 0. Returns uint8 `(h, w, C)`.
    """
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"need an (H, W, C) uint8 image, got {image.dtype} {image.shape}")
    linear, shift = np.asarray(matrix, dtype=np.float64)[:, :2], np.asarray(matrix, dtype=np.float64)[:, 2]
    if abs(np.linalg.det(linear)) < 1e-12:
        raise ValueError("the transform is singular (zero scale)")
    height, width = image.shape[:2]
    out_h, out_w = size
    out_y, out_x = np.mgrid[0:out_h, 0:out_w]
    # Inverse mapping: each output pixel centre reads the source at A^-1 (p - t).
    source = np.linalg.solve(linear, np.stack([out_x.ravel() - shift[0], out_y.ravel() - shift[1]]))
    x0f, y0f = np.floor(source[0]), np.floor(source[1])
    fx, fy = source[0] - x0f, source[1] - y0f
    x0, y0 = x0f.astype(np.int64), y0f.astype(np.int64)
    pixels = image.astype(np.float64)
    out = np.zeros((out_h * out_w, image.shape[2]), dtype=np.float64)
    for dy, weight_y in ((0, 1.0 - fy), (1, fy)):
        for dx, weight_x in ((0, 1.0 - fx), (1, fx)):
            xs, ys = x0 + dx, y0 + dy
            inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
            values = pixels[np.clip(ys, 0, height - 1), np.clip(xs, 0, width - 1)]
            out += (weight_x * weight_y * inside)[:, None] * values
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(out_h, out_w, image.shape[2])


def align_face(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Map the 5 `landmarks` (x, y) of an `(H, W, 3)` uint8 image onto the ArcFace template: a 112x112x3 crop."""
    matrix = estimate_similarity(landmarks, ARCFACE_TEMPLATE)
    return warp_affine(image, matrix, (ALIGNED_SIZE, ALIGNED_SIZE))
