"""Image loading and the Kosmos-2 image transforms (docs/official_behaviour.md#inference-image-view,
#training-image-view).

* `load_image` turns a path, bytes, file object or PIL image of any mode into an RGB PIL image the way a user
  expects to see it: EXIF orientation applied, transparency composited on white, the first frame of an animation,
  high-bit-depth data scaled to 8 bits. Its `.size` is the original size (after EXIF rotation), the one that
  normalised boxes are mapped back to.
* `inference_transform(S)`: squash-resize to S x S (bicubic, aspect ratio not kept, no crop), ToTensor, CLIP
  mean/std — the official demo/evaluation transform and HF's processor.
* `train_transform(S)` / `train_transform_numpy(S)` (loader workers): bicubic resize of the shorter side to S,
  centre crop S x S, /255, normalise — the official GRIT loader. `CentreCrop` is that geometry, and the grounding
  labels map boxes with the same object (`kosmos2.data.grounding_labels.centercrop_box`).
"""
from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Pillow's own decompression-bomb warning threshold (~179 MP, e.g. 13377 x 13377); above it we refuse unless the
# caller raises the limit (or passes None), because decoding such a file can take many GB of memory.
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MIN_SIZE = 1

ImageInput = Union[str, os.PathLike, bytes, bytearray, io.IOBase, Image.Image]
_pillow_limit_lock = threading.Lock()


class ImageLoadError(ValueError):
    """The input could not be read as an image (not an image, truncated, unsupported mode)."""


class ImageSizeError(ValueError):
    """The image is smaller or larger than the configured limits; `.size` is its (width, height)."""

    def __init__(self, message: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.size = size


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def _open(source, max_pixels: int | None) -> Image.Image:
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_file():
            raise FileNotFoundError(f"image file not found: {source}")
        fp = source
    elif isinstance(source, (bytes, bytearray)):
        fp = io.BytesIO(source)
    elif hasattr(source, "read"):
        fp = source
    else:
        raise TypeError(f"load_image expects a path, bytes, a binary file object or a PIL.Image, got {type(source).__name__}")
    # Pillow refuses (DecompressionBombError) or warns on big images using a module-global limit, before we can
    # look at the size. Switch its check off for the header read (under a lock: it is a global) and apply our own
    # `max_pixels` right after, so one configurable limit with one clear message decides. Nothing is decoded yet.
    with _pillow_limit_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(fp)
        except UnidentifiedImageError as e:
            raise ImageLoadError(f"{_describe(source)} is not an image Pillow can read (JPEG, PNG, GIF, WebP, BMP, TIFF, …): {e}") from e
        except (OSError, SyntaxError, EOFError, ValueError) as e:
            raise ImageLoadError(f"{_describe(source)} has a corrupt or truncated image header: {e}") from e
        finally:
            Image.MAX_IMAGE_PIXELS = saved
    return image


def _check_size(image: Image.Image, source, min_size: int, max_pixels: int | None) -> None:
    w, h = image.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageSizeError(f"{_describe(source)} is {w}x{h} = {w * h} pixels, more than max_pixels={max_pixels} "
                             "(decompression-bomb guard); pass a larger max_pixels (or None) if you trust the file, "
                             "or downscale it first", size=(w, h))
    if w < min_size or h < min_size:
        raise ImageSizeError(f"{_describe(source)} is {w}x{h}, smaller than min_size={min_size} pixels per side",
                             size=(w, h))


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """I;16*, I and F images -> 8-bit L. Pillow's own conversion clips at 255, which turns ordinary 16-bit photos
    white; scale by the value range the mode implies instead."""
    data = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        data = data / 257.0  # 0..65535 -> 0..255
    elif image.mode == "I":
        top = data.max(initial=0)
        if top > 65535 or data.min(initial=0) < 0:  # arbitrary 32-bit data: stretch to the range it uses
            data = (data - data.min()) / max(np.ptp(data), 1e-12) * 255.0
        elif top > 255:  # 16-bit data stored as I (how Pillow long opened 16-bit PNGs)
            data = data / 257.0
    else:  # F: [0, 1] floats are the common convention; [0, 255] is left alone; anything else is stretched
        finite = np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = finite.min(initial=0), finite.max(initial=0)
        if lo >= 0 and hi <= 1:
            data = finite * 255.0
        elif lo >= 0 and hi <= 255:
            data = finite
        else:
            data = (finite - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(data), 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparent areas become white (the usual look of a transparent PNG on a page)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    if image.mode in ("La", "RGBa"):
        # Premultiplied alpha: over white, colour = premultiplied colour + (1 - alpha) * 255.
        data = np.asarray(image).astype(np.int32)
        colour = data[..., :-1] + (255 - data[..., -1:])
        colour = np.clip(colour, 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(colour, 3, axis=-1) if image.mode == "La" else colour, mode="RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageLoadError(f"cannot convert a {image.mode!r} image to RGB: {e}") from e


def load_image(source: ImageInput, min_size: int = DEFAULT_MIN_SIZE, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Path / bytes / binary file / PIL image -> RGB PIL image with EXIF orientation applied (first frame of an
    animation). Raises FileNotFoundError, ImageLoadError (not an image, truncated) or ImageSizeError."""
    image = source if isinstance(source, Image.Image) else _open(source, max_pixels)
    _check_size(image, source, min_size, max_pixels)
    try:
        if getattr(image, "is_animated", False):
            image.seek(0)
        image.load()  # decode now so that truncated files fail here, with the file name in the message
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, EOFError) as e:
        raise ImageLoadError(f"{_describe(source)} could not be decoded (truncated or corrupt file?): {e}") from e
    image = to_rgb(image)
    _check_size(image, source, min_size, max_pixels)  # EXIF rotation may swap width and height
    return image


def _normalize(array_hwc_uint8: np.ndarray) -> torch.Tensor:
    # Same arithmetic order as torchvision ToTensor + Normalize: /255 in float32, then (x - mean) / std.
    x = torch.from_numpy(np.array(array_hwc_uint8, dtype=np.uint8)).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


def square_view(rgb: Image.Image, image_size: int) -> Image.Image:
    """Bicubic squash-resize to S x S (aspect ratio not kept, nothing cut): the official demo/evaluation geometry."""
    return rgb.resize((image_size, image_size), Image.BICUBIC)


def inference_transform(image_size: int = 224) -> Callable[[ImageInput], torch.Tensor]:
    """Image -> float tensor [3, S, S]: `square_view`, ToTensor, CLIP normalisation."""
    def transform(image: ImageInput) -> torch.Tensor:
        return _normalize(np.asarray(square_view(load_image(image), image_size)))
    return transform


# ---------------------------------------------------------------------------------------------------------------
# the training view: one geometry for the pixels (torch and numpy transforms) and the boxes (grounding labels)

def short_side_resize_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """torchvision Resize(S) output size: shorter side -> S, longer side int(S * long / short) (truncated); a
    shorter side already equal to S leaves the size unchanged."""
    if width <= height:
        return image_size, int(image_size * height / width)
    return int(image_size * width / height), image_size


@dataclass(frozen=True)
class CentreCrop:
    """Where the training view of a `width` x `height` image comes from: the official GRIT loader's torchvision
    `Resize(S)` (shorter side -> S, bicubic) then `CenterCrop(S)`.

    `offset` is the crop's exact top-left corner in the resized image, half the excess: the official box correction
    subtracts it from box coordinates. The pixels are cut at `pixel_offset`, torchvision's `int(round(.))` of it, so
    for an odd excess boxes and pixels disagree by half a pixel, as in the official code (kept: the labels of the
    released model were made that way)."""
    width: int
    height: int
    size: int

    @property
    def resized(self) -> tuple[int, int]:
        return short_side_resize_size(self.width, self.height, self.size)

    @property
    def offset(self) -> tuple[float, float]:
        resized_w, resized_h = self.resized
        return (resized_w - self.size) / 2.0, (resized_h - self.size) / 2.0

    @property
    def pixel_offset(self) -> tuple[int, int]:
        left, top = self.offset
        return int(round(left)), int(round(top))

    def view(self, rgb: Image.Image) -> Image.Image:
        """The S x S training view of `rgb` (which must be `width` x `height`)."""
        if rgb.size != (self.width, self.height):
            raise ValueError(f"this CentreCrop is for a {self.width}x{self.height} image, "
                             f"got a {rgb.size[0]}x{rgb.size[1]} one")
        resized = rgb.resize(self.resized, Image.BICUBIC) if self.resized != rgb.size else rgb
        left, top = self.pixel_offset
        return resized.crop((left, top, left + self.size, top + self.size))


def training_view(rgb: Image.Image, image_size: int, only_resize: bool = False) -> Image.Image:
    """The pixels training sees: `CentreCrop`, or with --training-image-only-resize the `square_view` of inference."""
    if only_resize:
        return square_view(rgb, image_size)
    return CentreCrop(rgb.width, rgb.height, image_size).view(rgb)


def train_transform(image_size: int = 224, only_resize: bool = False) -> Callable[[ImageInput], torch.Tensor]:
    """Image -> float tensor [3, S, S]: `training_view` (official GRIT loader: bicubic resize of the shorter side to
    S, centre crop), CLIP normalisation."""
    def transform(image: ImageInput) -> torch.Tensor:
        return _normalize(np.asarray(training_view(load_image(image), image_size, only_resize)))
    return transform


def train_transform_numpy(image_size: int = 224, only_resize: bool = False) -> Callable[[ImageInput], np.ndarray]:
    """`train_transform` in numpy: float32 [3, S, S], bit-identical (tested). The data loader's prefetch workers
    are forked, and touching torch there after the parent has used its OpenMP pool deadlocks (observed: a warm
    parent + 224 px images hangs the first batch), so they never call torch."""
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(CLIP_STD, dtype=np.float32)[:, None, None]

    def transform(image: ImageInput) -> np.ndarray:
        view = training_view(load_image(image), image_size, only_resize)
        pixels = np.asarray(view, dtype=np.uint8).astype(np.float32).transpose(2, 0, 1) / np.float32(255.0)
        return (pixels - mean) / std

    return transform


def preprocess(images: ImageInput | Sequence[ImageInput], image_size: int = 224) -> torch.Tensor:
    """One or several images -> Tensor[N, 3, S, S] with the inference transform. Keep `load_image(x).size` if you
    need the original sizes (e.g. `grounding.box_to_pixels`)."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)) or hasattr(images, "read"):
        images = [images]
    if len(images) == 0:
        raise ValueError("preprocess needs at least one image")
    transform = inference_transform(image_size)
    return torch.stack([transform(image) for image in images])


def denormalize(pixels: torch.Tensor) -> torch.Tensor:
    """Inverse of the normalisation: [3, S, S] (or [N, 3, S, S]) -> values in [0, 1], e.g. to look at model inputs."""
    mean = torch.tensor(CLIP_MEAN, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=pixels.dtype, device=pixels.device)[:, None, None]
    return (pixels * std + mean).clamp(0, 1)
