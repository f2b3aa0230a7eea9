"""The verification `.bin` container (insightface's LFW, CFP-FP, AgeDB-30, CALFW, CPLFW, VGG2-FP, ...): a pickle of
`(bins, issame_list)`, `bins` the 2N encoded images (pair i = images 2i and 2i+1), `issame_list` N booleans.

Read here, below `evaluation/`, because `data.tools` (`build-bin`, `extract`) and `evaluation.verification` both read
it; decoding and the protocol are `evaluation.verification`'s.

Unpickling: `.bin` files are pickles, and pickles can run code. `read_bin` refuses every global except the few that
real `.bin` files need: `_codecs.encode` and `bytearray` (how Python 3 writes bytes in protocol <= 2), and NumPy's
array reconstruction, because insightface's `build_eval_pack.py` stores each image as the uint8 array returned by
`cv2.imencode`: `numpy.ndarray`, `numpy.dtype`, `multiarray._reconstruct` and `multiarray.scalar` (protocols <= 4)
and `numeric._frombuffer` (protocol 5, what `pickle.HIGHEST_PROTOCOL` gives on Python 3.8+), each under NumPy 1's
`numpy.core` and NumPy 2's `numpy._core` name. None of these calls user-chosen code (`_frombuffer` refuses object
arrays); every element is then checked to be bytes or a uint8 array.
"""

from __future__ import annotations

import importlib
import io
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

from models.errors import InputError

__all__ = ["BinFormatError", "encoded_images", "image_bytes", "read_bin"]

_ALLOWED_GLOBALS = frozenset(
    {
        ("_codecs", "encode"),
        ("builtins", "bytearray"),
        ("__builtin__", "bytearray"),  # the Python 2 spelling; the base class maps it to builtins
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)


class BinFormatError(InputError, ValueError):
    """A `.bin` file that is missing, unsafe, not in the `(bins, issame_list)` layout or too small for the protocol;
    the message names the file."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], path: Path, encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise BinFormatError(f"file {self.path}: refusing to unpickle global '{module}.{name}'")
        if module.startswith(("numpy.core.", "numpy._core.")):
            return _numpy_internal(module.split(".", 2)[2], name)
        return super().find_class(module, name)


def _numpy_internal(submodule: str, name: str) -> Any:
    """A NumPy internal under either name: NumPy 2 calls the package `numpy._core` (and warns on `numpy.core`),
    NumPy 1 `numpy.core` (1.26 has a partial `numpy._core`), so a file pickled under one loads under the other."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"this NumPy has no {submodule}.{name}")


def _unpickle(path: Path) -> Any:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BinFormatError(f"file {path}: not found") from None
    except OSError as err:
        raise BinFormatError(f"file {path}: cannot be read ({err.strerror or err})") from None
    try:
        try:
            return _RestrictedUnpickler(io.BytesIO(data), path).load()
        except UnicodeDecodeError:
            # A Python 2 pickle: its JPEGs are `str`, which Python 3 can only take as raw bytes (as insightface does).
            return _RestrictedUnpickler(io.BytesIO(data), path, encoding="bytes").load()
    except BinFormatError:
        raise
    except Exception as err:  # the unpickler raises many types on garbage: report them all the same way
        raise BinFormatError(f"file {path}: not a readable pickle ({type(err).__name__}: {err})") from None


def image_bytes(item: Any, path: Path, index: int) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise BinFormatError(f"file {path}: image {index} is a {type(item).__name__}, expected encoded image bytes")


def _as_bool(item: Any, path: Path, index: int) -> bool:
    if isinstance(item, bool | np.bool_) or (isinstance(item, int | np.integer) and item in (0, 1)):
        return bool(item)
    raise BinFormatError(f"file {path}: issame_list[{index}] is {item!r}, expected a bool")


def read_bin(path: str | Path, folds: int | None = None) -> tuple[list[Any], list[bool]]:
    """The `(encoded images, issame)` of a verification `.bin`, checked for layout but not decoded.

    With `folds`, a file with fewer pairs than that is refused (`BinFormatError` naming the file, its pair count and
    the folds)."""
    path = Path(path)
    obj = _unpickle(path)
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise BinFormatError(f"file {path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame_raw = obj
    if not isinstance(bins, list | tuple) or not isinstance(issame_raw, list | tuple | np.ndarray):
        raise BinFormatError(
            f"file {path}: expected (list of images, list of bools), got ({type(bins).__name__}, "
            f"{type(issame_raw).__name__})"
        )
    issame = [_as_bool(item, path, i) for i, item in enumerate(issame_raw)]
    if not issame:
        raise BinFormatError(f"file {path}: no pairs")
    if len(bins) != 2 * len(issame):
        raise BinFormatError(f"file {path}: {len(bins)} images for {len(issame)} pairs (need exactly 2 per pair)")
    if folds is not None and len(issame) < folds:
        raise BinFormatError(
            f"file {path}: {len(issame)} pairs, fewer than the {folds} folds of the verification protocol "
            f"(it needs at least {folds} pairs)"
        )
    return list(bins), issame


def encoded_images(path: str | Path) -> tuple[list[bytes], list[bool]]:
    """The encoded images (bytes) and the same/different flags of a `.bin`, checked for layout, not decoded."""
    path = Path(path)
    bins, issame = read_bin(path)
    return [image_bytes(item, path, index) for index, item in enumerate(bins)], issame
