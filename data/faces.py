"""The embedded default dataset: procedurally rendered face-like images in insightface layout.

Identities differ in structure (face shape, skin, eyes, brows, nose, mouth, hair, marks); images of one identity
differ in pose, expression, lighting, background, noise and JPEG quality. `ensure_dataset` writes `train.rec`,
`train.idx`, `property` and a held-out verification `val.bin` once into a cache folder, so the default training
run needs no downloads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg

from data.recordio import write_insightface_layout
from models.recipe import key

logger = logging.getLogger(__name__)

# Bump whenever the rendered pixels or the file layout change: it is part of the cache key.
GENERATOR_VERSION = 1
IMAGE_SIZE = 112
TRAIN_REC, TRAIN_IDX, PROPERTY, VAL_BIN, META = "train.rec", "train.idx", "property", "val.bin", "faces.json"
VAL_FOLDS = 10  # the folds of the verification protocol (evaluation.verification.compute_accuracy)

_HALF = IMAGE_SIZE / 2
# Pixel centres in image units: the image spans [-1, 1] on both axes, y pointing down.
_GRID_X, _GRID_Y = np.meshgrid(
    (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / _HALF - 1.0,
    (np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5) / _HALF - 1.0,
)

# Faces are drawn in face units and then enlarged and lifted so that eyes and mouth land near the ArcFace
# alignment template (eyes at y = 51.6 px, mouth at y = 92 px of 112).
_ZOOM = 1.25
_FACE_SHIFT_Y = -0.05
# Pose jitter at variation 1: rotation sigma (radians), relative scale range, shift sigma (image units, 1 = 56 px).
_ROTATION_SIGMA = 0.10
_SCALE_JITTER = 0.08
_SHIFT_SIGMA = 0.04

_SKIN_LIGHT = np.array([0.97, 0.82, 0.71], dtype=np.float32)
_SKIN_DARK = np.array([0.33, 0.20, 0.13], dtype=np.float32)
_HAIR_COLOURS = np.array(
    [
        [0.06, 0.05, 0.05],  # black
        [0.22, 0.13, 0.07],  # dark brown
        [0.45, 0.29, 0.15],  # brown
        [0.82, 0.68, 0.40],  # blonde
        [0.65, 0.25, 0.10],  # red
        [0.72, 0.72, 0.72],  # grey
    ],
    dtype=np.float32,
)
_IRIS_COLOURS = np.array(
    [
        [0.30, 0.18, 0.08],  # brown
        [0.12, 0.08, 0.05],  # dark
        [0.25, 0.45, 0.75],  # blue
        [0.30, 0.55, 0.30],  # green
        [0.50, 0.55, 0.58],  # grey
    ],
    dtype=np.float32,
)


@dataclass
class FacesConfig:
    """What `generate` renders; every field is part of the cache key."""

    num_identities: int = key(300, help="identities of the training set")
    images_per_identity: int = key(30, help="training images per identity")
    num_val_identities: int = key(60, help="held-out identities of the verification set val.bin (>= 2)")
    num_val_pairs: int = key(
        1200, help="pairs in val.bin, half the same identity, half different (even, >= 10: one per verification fold)"
    )
    seed: int = key(0, help="the generator's seed: the same settings render the same images")
    jpeg_quality: int = key(
        95, help="highest JPEG quality: each image's is drawn uniformly from [jpeg_quality_min, jpeg_quality]"
    )
    jpeg_quality_min: int = key(60, help="lowest JPEG quality")
    variation: float = key(
        1.0,
        help="scales every nuisance factor (pose, expression, lighting, noise); 0 renders each identity canonically",
    )

    def __post_init__(self) -> None:
        if self.num_identities < 1 or self.images_per_identity < 1:
            raise ValueError("num_identities and images_per_identity must be >= 1")
        if self.num_val_identities < 2:
            raise ValueError("num_val_identities must be >= 2 (different-identity pairs need two)")
        if self.num_val_pairs < VAL_FOLDS or self.num_val_pairs % 2:
            # Verification splits the pairs into 10 folds (insightface's protocol): fewer pairs leave a fold empty.
            raise ValueError(
                f"num_val_pairs must be an even number >= {VAL_FOLDS} (half same, half different; one pair at least "
                f"per verification fold), got {self.num_val_pairs}"
            )
        if not 1 <= self.jpeg_quality_min <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality_min must be in [1, jpeg_quality] and jpeg_quality <= 100")
        if self.variation < 0:
            raise ValueError("variation must be >= 0")


@dataclass(frozen=True)
class IdentityParams:
    """The structure of one identity, in face units (the image spans [-1, 1])."""

    face_w: float
    face_h_top: float
    face_h_chin: float
    face_cy: float
    jaw_power: float  # superellipse exponent: 2 is an ellipse, larger is squarer
    skin: tuple[float, float, float]
    blush: float
    texture: tuple[tuple[float, float, float, float], ...]  # (freq_x, freq_y, phase, amplitude)
    moles: tuple[tuple[float, float, float], ...]  # (x, y, radius)
    ear_size: float
    eye_dx: float
    eye_y: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: tuple[float, float, float]
    iris_frac: float
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_tilt: float
    nose_len: float
    nose_w: float
    nose_shade: float
    mouth_y: float
    mouth_w: float
    mouth_thick: float
    mouth_curve: float
    lip: tuple[float, float, float]
    hair: tuple[float, float, float]
    hair_top: float
    hair_side: float
    hair_length: float
    hairline: float
    hair_part: float
    beard: float  # 0: none, else opacity
    glasses: float  # 0: none, else frame thickness
    glasses_colour: tuple[float, float, float]


def _colour(values: np.ndarray) -> tuple[float, float, float]:
    clipped = np.clip(values, 0.0, 1.0)
    return (float(clipped[0]), float(clipped[1]), float(clipped[2]))


def sample_identity(rng: np.random.Generator) -> IdentityParams:
    """Draw one identity's structure."""
    u = rng.uniform
    skin = _SKIN_LIGHT + (_SKIN_DARK - _SKIN_LIGHT) * u(0.0, 1.0) + rng.normal(0.0, 0.03, 3)
    hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * u(0.8, 1.2) + rng.normal(0.0, 0.04, 3)
    iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] + rng.normal(0.0, 0.04, 3)
    lip = np.clip(skin, 0.0, 1.0) * np.array([0.95, 0.62, 0.62]) + rng.normal(0.0, 0.03, 3)
    texture = tuple(
        (float(u(3.0, 14.0) * rng.choice([-1, 1])), float(u(3.0, 14.0)), float(u(0, 2 * np.pi)), float(u(0.02, 0.06)))
        for _ in range(rng.integers(2, 5))
    )
    moles = tuple(
        (float(u(-0.4, 0.4)), float(u(-0.35, 0.45)), float(u(0.012, 0.03))) for _ in range(rng.integers(0, 4))
    )
    glasses_colour = _HAIR_COLOURS[rng.integers(2)] if u() < 0.5 else rng.uniform(0.0, 0.8, 3)
    return IdentityParams(
        face_w=float(u(0.48, 0.66)),
        face_h_top=float(u(0.62, 0.78)),
        face_h_chin=float(u(0.58, 0.82)),
        face_cy=float(u(0.0, 0.12)),
        jaw_power=float(u(1.8, 3.2)),
        skin=_colour(skin),
        blush=float(u(0.0, 0.35)),
        texture=texture,
        moles=moles,
        ear_size=float(u(0.06, 0.11)),
        eye_dx=float(u(0.17, 0.29)),
        eye_y=float(u(-0.16, 0.0)),
        eye_w=float(u(0.065, 0.115)),
        eye_h=float(u(0.032, 0.06)),
        eye_tilt=float(u(-0.25, 0.25)),
        iris=_colour(iris),
        iris_frac=float(u(0.4, 0.7)),
        brow_gap=float(u(0.07, 0.15)),
        brow_len=float(u(0.09, 0.17)),
        brow_thick=float(u(0.015, 0.045)),
        brow_tilt=float(u(-0.35, 0.35)),
        nose_len=float(u(0.12, 0.28)),
        nose_w=float(u(0.045, 0.11)),
        nose_shade=float(u(0.15, 0.4)),
        mouth_y=float(u(0.26, 0.42)),
        mouth_w=float(u(0.11, 0.25)),
        mouth_thick=float(u(0.018, 0.05)),
        mouth_curve=float(u(-2.0, 2.0)),
        lip=_colour(lip),
        hair=_colour(hair),
        hair_top=float(u(0.02, 0.3)),
        hair_side=float(u(0.0, 0.16)),
        hair_length=float(u(-0.3, 0.9)),
        hairline=float(u(-0.72, -0.3)),
        hair_part=float(u(-0.3, 0.3)),
        beard=float(u(0.5, 0.9)) if u() < 0.2 else 0.0,
        glasses=float(u(0.012, 0.03)) if u() < 0.15 else 0.0,
        glasses_colour=_colour(glasses_colour),
    )


def _edge(signed_dist: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage from a signed distance (negative inside), in face units."""
    return np.clip(0.5 - signed_dist * (1.0 / pixel), 0.0, 1.0)


def _ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, pixel: float, angle: float = 0.0
) -> np.ndarray:
    dx, dy = x - cx, y - cy
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = c * dx + s * dy, c * dy - s * dx
    d = np.sqrt((dx * (1.0 / a)) ** 2 + (dy * (1.0 / b)) ** 2)
    # (d - 1) * min(a, b) under-estimates the true distance, which only softens the edge slightly.
    return _edge((d - 1.0) * min(a, b), pixel)


def _blend(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | tuple[float, float, float]) -> None:
    """Paint `colour` over the channel-first `img` with coverage `alpha`, in place."""
    # One plane at a time: broadcasting over a length-3 axis is several times slower in NumPy.
    for k in range(3):
        plane = img[k]
        plane += alpha * (colour[k] - plane)


def render_face(identity: IdentityParams, rng: np.random.Generator, variation: float = 1.0) -> np.ndarray:
    """Render one 112x112 RGB uint8 image of `identity`; pose, expression, lighting, background and noise come from
    `rng`, scaled by `variation` (0: no pose/expression/lighting jitter)."""
    p = identity
    v = float(variation)

    # Python floats throughout: NumPy float64 scalars would silently upcast the float32 grids (NEP 50).
    def u(lo: float = 0.0, hi: float = 1.0) -> float:
        return float(rng.uniform(lo, hi))

    def n(sigma: float) -> float:
        return float(rng.normal(0.0, sigma)) * v

    def colour() -> np.ndarray:
        return rng.uniform(0.0, 1.0, 3).astype(np.float32)

    # Pose: image = zoom * scale * R(angle) * squeeze * face + shift; invert it on the pixel grid.
    angle = n(_ROTATION_SIGMA)
    scale = _ZOOM * (1.0 + u(-_SCALE_JITTER, _SCALE_JITTER) * v)
    shift_x, shift_y = n(_SHIFT_SIGMA), _FACE_SHIFT_Y + n(_SHIFT_SIGMA)
    yaw = u(-1.0, 1.0) * v
    squeeze = 1.0 - 0.12 * abs(yaw)
    c, s = math.cos(angle), math.sin(angle)
    gx, gy = (_GRID_X - shift_x) * (1.0 / scale), (_GRID_Y - shift_y) * (1.0 / scale)
    x = (c * gx + s * gy) * (1.0 / squeeze)
    y = c * gy - s * gx
    pixel = 1.0 / (_HALF * scale)

    # Background: a tilted two-colour gradient plus a few blurry blobs, all independent of the identity.
    phi = u(0.0, 2 * math.pi)
    t = np.clip(math.cos(phi) * _GRID_X + math.sin(phi) * _GRID_Y, -1.0, 1.0) * 0.5 + 0.5
    bg, bg2 = colour(), colour()
    img = bg[:, None, None] + (bg2 - bg)[:, None, None] * t
    for _ in range(int(rng.integers(0, 4))):
        blob = _ellipse(_GRID_X, _GRID_Y, u(-1, 1), u(-1, 1), u(0.1, 0.5), u(0.1, 0.5), 0.08, u(0.0, math.pi))
        _blend(img, 0.8 * blob, colour())

    hair = np.asarray(p.hair, dtype=np.float32)
    skin = np.asarray(p.skin, dtype=np.float32)
    fy = p.face_cy
    hair_len = p.hair_length + n(0.03)
    hair_a = p.face_w + p.hair_side + 0.04
    hair_b = p.face_h_top + p.hair_top
    hair_cy = fy - p.hair_top * 0.5

    # Hair behind the head: an ellipse around the skull, plus a longer part down the sides when it is long.
    skull = _ellipse(x, y, 0.0, hair_cy, hair_a, hair_b, pixel)
    back = skull * _edge(y - (fy + hair_len), pixel)
    if hair_len > 0:
        back = np.maximum(back, _ellipse(x, y, 0.0, fy, hair_a, hair_len + 0.05, pixel) * (y > fy))
    _blend(img, back, hair * 0.8)

    # Neck below the chin, ears on both sides half hidden by the face.
    neck = _edge(np.abs(x) - p.face_w * 0.5, pixel) * _edge(fy + 0.2 - y, pixel)
    _blend(img, neck, skin * 0.8)
    for side in (-1.0, 1.0):
        _blend(img, _ellipse(x, y, side * p.face_w, fy - 0.02, p.ear_size * 0.6, p.ear_size, pixel), skin * 0.9)

    # Face: a superellipse with different top and chin heights, with a per-identity low-frequency texture.
    inv_h = np.where(y < fy, np.float32(1.0 / p.face_h_top), np.float32(1.0 / p.face_h_chin))
    power = p.jaw_power
    d = (np.abs(x * (1.0 / p.face_w)) ** power + np.abs((y - fy) * inv_h) ** power) ** (1.0 / power)
    face = _edge((d - 1.0) * p.face_w, pixel)
    shade = np.ones_like(x)
    for freq_x, freq_y, phase, amp in p.texture:
        shade += amp * np.sin(freq_x * x + freq_y * y + phase)
    _blend(img, face, skin[:, None, None] * shade)

    # Inner features move sideways with yaw while the outline stays: a cheap out-of-plane rotation.
    fx = x - yaw * 0.05
    for side in (-1.0, 1.0):
        blush = _ellipse(fx, y, side * (p.eye_dx + 0.05), fy + 0.12, 0.1, 0.07, 0.05)
        _blend(img, blush * face * p.blush, (0.9, 0.35, 0.35))
    for mole_x, mole_y, radius in p.moles:
        _blend(img, _ellipse(fx, y, mole_x * p.face_w * 1.6, fy + mole_y, radius, radius, pixel) * face, skin * 0.35)

    # Eyes: outline, white, iris (clipped to the white), pupil; blink and gaze vary per image.
    eye_open = min(max(1.0 - abs(n(0.2)), 0.35), 1.0)
    gaze_x, gaze_y = n(0.2), n(0.2)
    eye_y = fy + p.eye_y
    eye_h = p.eye_h * eye_open
    iris_r = p.eye_h * p.iris_frac * 1.4
    for side in (-1.0, 1.0):
        ex = side * p.eye_dx
        tilt = -side * p.eye_tilt
        _blend(img, _ellipse(fx, y, ex, eye_y, p.eye_w + pixel, eye_h + pixel, pixel, tilt), skin * 0.3)
        white = _ellipse(fx, y, ex, eye_y, p.eye_w, eye_h, pixel, tilt)
        _blend(img, white, (0.93, 0.92, 0.9))
        ix, iy = ex + gaze_x * p.eye_w * 0.4, eye_y + gaze_y * p.eye_h * 0.3
        _blend(img, _ellipse(fx, y, ix, iy, iris_r, iris_r, pixel) * white, p.iris)
        _blend(img, _ellipse(fx, y, ix, iy, iris_r * 0.45, iris_r * 0.45, pixel) * white, (0.02, 0.02, 0.02))
        # Brow: a thick rotated ellipse above the eye.
        brow_tilt = -side * (p.brow_tilt + n(0.06))
        brow_y = eye_y - p.eye_h - p.brow_gap + n(0.01)
        brow = _ellipse(fx, y, ex, brow_y, p.brow_len, p.brow_thick, pixel, brow_tilt)
        _blend(img, brow * face, hair * 0.85)

    # Nose: a shaded wedge widening downwards and two nostrils.
    nose_top = eye_y + 0.02
    nose_bottom = nose_top + p.nose_len
    depth = np.clip((y - nose_top) * (1.0 / p.nose_len), 0.0, 1.0)
    wedge = _edge(np.abs(fx - 0.02) - (0.012 + p.nose_w * depth), pixel)
    wedge *= _edge(np.abs(y - (nose_top + nose_bottom) * 0.5) - p.nose_len * 0.5, pixel)
    _blend(img, wedge * depth * p.nose_shade, skin * 0.45)
    for side in (-1.0, 1.0):
        nostril = _ellipse(fx, y, side * p.nose_w * 0.55, nose_bottom, p.nose_w * 0.35, 0.016, pixel)
        _blend(img, nostril * 0.8, skin * 0.3)

    # Mouth: a band along a parabola whose curvature and opening vary with expression; beard around it.
    mouth_y = fy + p.mouth_y
    curve = p.mouth_curve + n(0.5)
    mouth_open = max(0.0, n(0.012))
    centre = mouth_y - curve * 0.05 * (1.0 - (fx * (1.0 / p.mouth_w)) ** 2)
    within = _edge(np.abs(fx) - p.mouth_w, pixel)
    if p.beard:
        beard = face * _edge(mouth_y - 0.1 - y, pixel)
        mustache = _ellipse(fx, y, 0.0, mouth_y - 0.06, p.mouth_w * 1.1, 0.035, pixel)
        _blend(img, np.maximum(beard, mustache) * p.beard, hair * 0.8)
    lips = np.abs(y - centre)
    _blend(img, _edge(lips - p.mouth_thick - mouth_open, pixel) * within, p.lip)
    if mouth_open > pixel:
        _blend(img, _edge(lips - mouth_open, pixel) * within, (0.15, 0.05, 0.05))

    # Glasses: two rings and a bridge.
    if p.glasses:
        ring_a, ring_b = p.eye_w * 1.7, p.eye_h * 2.6 + 0.03
        frame = np.zeros_like(x)
        for side in (-1.0, 1.0):
            outer = _ellipse(fx, y, side * p.eye_dx, eye_y, ring_a + p.glasses, ring_b + p.glasses, pixel)
            frame = np.maximum(frame, outer - _ellipse(fx, y, side * p.eye_dx, eye_y, ring_a, ring_b, pixel))
        bridge = _edge(np.abs(fx) - max(p.eye_dx - ring_a, 0.01), pixel)
        bridge *= _edge(np.abs(y - (eye_y - 0.02)) - p.glasses * 0.6, pixel)
        _blend(img, np.maximum(frame, bridge), p.glasses_colour)

    # Hair over the forehead: the skull ellipse above a curved hairline with a side parting.
    parting = x - p.hair_part
    hairline = (fy + p.hairline) + 0.5 * parting**2 - 0.06 * np.abs(parting)
    _blend(img, skull * _edge(y - hairline, pixel), hair)

    # Lighting: directional gradient, colour cast, contrast, brightness and gamma.
    phi = u(0.0, 2 * math.pi)
    strength = u(0.0, 0.35) * v
    light = 1.0 + strength * (math.cos(phi) * _GRID_X + math.sin(phi) * _GRID_Y)
    for k in range(3):
        img[k] *= light * (1.0 + n(0.05))
    mean = float(img.mean())
    img = (img - mean) * (1.0 + u(-0.2, 0.15) * v) + mean * (1.0 + u(-0.25, 0.15) * v)
    img = np.clip(img, 0.0, 1.0) ** math.exp(n(0.12))
    if u() < 0.3 * v:
        # A 3x3 box blur stands in for focus and resolution changes.
        padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
        img = sum(padded[:, i : i + IMAGE_SIZE, j : j + IMAGE_SIZE] for i in range(3) for j in range(3)) * (1.0 / 9.0)
    noise = u(0.0, 0.03) * v
    if noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * noise
    assert img.dtype == np.float32
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(1, 2, 0).copy()


def _rng(seed: int, *key: int) -> np.random.Generator:
    # Every stream has its own spawn key (stream tag first), so changing one count never shifts another stream.
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def identity_params(seed: int, identity: int) -> IdentityParams:
    """The structure of global identity number `identity` (train identities first, then validation ones)."""
    return sample_identity(_rng(seed, 0, identity))


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """Encode an RGB uint8 image as JPEG."""
    return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB", colorsubsampling="420")


def _render_jpeg(cfg: FacesConfig, params: IdentityParams, rng: np.random.Generator) -> bytes:
    image = render_face(params, rng, cfg.variation)
    return encode_jpeg(image, int(rng.integers(cfg.jpeg_quality_min, cfg.jpeg_quality + 1)))


def iter_train_samples(cfg: FacesConfig) -> Iterator[tuple[int, bytes]]:
    """`(label, jpeg)` for every training image, grouped by label in ascending order; label = identity number."""
    for identity in range(cfg.num_identities):
        params = identity_params(cfg.seed, identity)
        for image in range(cfg.images_per_identity):
            yield identity, _render_jpeg(cfg, params, _rng(cfg.seed, 1, identity, image))


def val_identities(cfg: FacesConfig) -> list[int]:
    """Global identity numbers of the held-out identities: the ones after the training identities."""
    return list(range(cfg.num_identities, cfg.num_identities + cfg.num_val_identities))


def plan_val_pairs(cfg: FacesConfig) -> list[tuple[int, int, bool]]:
    """`(identity_a, identity_b, same)` for every validation pair: half same, half different, shuffled."""
    rng = _rng(cfg.seed, 3)
    ids = np.array(val_identities(cfg))
    half = cfg.num_val_pairs // 2
    # Same pairs cycle through the identities so each is used about equally often.
    same_ids = rng.permutation(np.resize(ids, half))
    pairs = [(int(i), int(i), True) for i in same_ids]
    for _ in range(half):
        a, b = rng.choice(ids, size=2, replace=False)
        pairs.append((int(a), int(b), False))
    # Shuffled so that every one of the 10 contiguous evaluation folds holds both kinds of pair.
    return [pairs[i] for i in rng.permutation(len(pairs))]


def render_val_pairs(cfg: FacesConfig) -> tuple[list[bytes], list[bool]]:
    """The `.bin` content: JPEGs of pair i at 2i and 2i+1, and the same/different flags."""
    params = {identity: identity_params(cfg.seed, identity) for identity in val_identities(cfg)}
    bins: list[bytes] = []
    issame: list[bool] = []
    for index, (a, b, same) in enumerate(plan_val_pairs(cfg)):
        bins.append(_render_jpeg(cfg, params[a], _rng(cfg.seed, 2, index, 0)))
        bins.append(_render_jpeg(cfg, params[b], _rng(cfg.seed, 2, index, 1)))
        issame.append(same)
    return bins, issame


def generate(out_dir: str | Path, cfg: FacesConfig) -> Path:
    """Write `train.rec`, `train.idx`, `property`, `val.bin` and the bookkeeping `faces.json` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_insightface_layout(
        out / TRAIN_REC,
        out / TRAIN_IDX,
        iter_train_samples(cfg),
        property_path=out / PROPERTY,
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
    )
    bins, issame = render_val_pairs(cfg)
    with open(out / VAL_BIN, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "config": dataclasses.asdict(cfg),
        "train_identities": list(range(cfg.num_identities)),
        "val_identities": val_identities(cfg),
        "val_pairs": [list(pair) for pair in plan_val_pairs(cfg)],
    }
    (out / META).write_text(json.dumps(meta, indent=1) + "\n")
    num_images = cfg.num_identities * cfg.images_per_identity + len(bins)
    logger.info("rendered %d face images into %s in %.1f s", num_images, out, time.perf_counter() - start)
    return out


def cache_key(cfg: FacesConfig) -> str:
    """A short hash of the config and the generator version: the cache folder's suffix."""
    blob = json.dumps({"config": dataclasses.asdict(cfg), "version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in (TRAIN_REC, TRAIN_IDX, PROPERTY, VAL_BIN, META))


def ensure_dataset(cfg: FacesConfig | None = None, cache_dir: str | Path | None = None) -> Path:
    """The folder holding the dataset for `cfg`, generating it on first use.

    The folder is `<cache>/faces-<cache_key>`, with `<cache>` = `cache_dir`, else `$ARCFACE_CACHE`, else
    `~/.cache/arcface-accelerate`. It is written into a temporary sibling and renamed into place, so a reader never
    sees a half-written folder and concurrent first uses do not clash (the loser of the rename uses the winner's copy).
    """
    cfg = cfg or FacesConfig()
    if cache_dir is None:
        env = os.environ.get("ARCFACE_CACHE")
        cache_dir = Path(env) if env else Path.home() / ".cache" / "arcface-accelerate"
    final = Path(cache_dir).expanduser() / f"faces-{cache_key(cfg)}"
    if _is_complete(final):
        return final
    if final.exists() and any(final.iterdir()):
        raise RuntimeError(f"dataset cache folder {final} exists but is incomplete; delete it to regenerate")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would make a shared cache unreadable to others
        logger.info("generating the default face dataset into %s (first use; cached afterwards)", final)
        generate(tmp, cfg)
        try:
            os.rename(tmp, final)
        except OSError:
            # rename onto a non-empty folder fails: another process finished first, and its copy is as good.
            if not _is_complete(final):
                raise
            logger.info("another process generated %s meanwhile; using it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
