"""Offline image data as a ``DataSource``: patches of the photographs that ship inside scikit-image, sklearn's
8x8 digits, a local image folder (Pillow) and a Hugging Face ``datasets`` image column.

Images are float tensors ``[N, C, H, W]`` scaled to [-1, 1]; a batch is ``{"images": [B, C, H, W]}``. Nothing
downloads: scikit-image's photographs and sklearn's digits are files inside those packages (the ``images``
extra: ``pip install 'energyflow[images]'``), imported only when used.

Photographs: training and validation use disjoint lists of *different* photographs (a held-out scene, not a
random split of one scene's pixels; ``skimage.data.cat`` is the same photograph as ``chelsea`` and is not
offered). Patches are cut on a regular grid in a fixed order, so the data are the same on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from energyflow.data.base import TensorData

TRAIN_PHOTOGRAPHS = ("astronaut", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
                     "camera", "coins", "moon", "brick", "grass", "gravel")
VALIDATION_PHOTOGRAPHS = ("coffee", "page", "text")
PHOTOGRAPHS = TRAIN_PHOTOGRAPHS + VALIDATION_PHOTOGRAPHS
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _import(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as error:
        raise ImportError(f"{what} needs the optional extra: pip install 'energyflow[images]'") from error


@dataclass
class ImageData(TensorData):
    """``train [N, C, H, W]`` and ``validation [M, C, H, W]`` float images in [-1, 1]; a batch is
    ``{"images": [B, C, H, W]}``."""

    batch_key: ClassVar[str] = "images"
    example_layout: ClassVar[str] = "[N, C, H, W]"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.train.shape[1:])


def to_unit_range(array: np.ndarray) -> Tensor:
    """An ``[H, W]`` or ``[H, W, C]`` image (uint8, bool or float in [0, 1]) -> float32 ``[C, H, W]`` in [-1, 1]."""
    if array.dtype == bool:
        values = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        values = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    else:
        values = np.clip(array.astype(np.float32), 0.0, 1.0)
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    return tensor * 2.0 - 1.0


def convert_channels(image: Tensor, channels: int) -> Tensor:
    """``[C, H, W]`` -> ``[channels, H, W]``: RGBA drops alpha; gray repeats into RGB; RGB to gray by luminance."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image.shape[0] == 4:
        image = image[:3]
    if image.shape[0] == channels:
        return image
    if channels == 3:
        return image.expand(3, -1, -1).clone()
    weights = torch.tensor([0.2125, 0.7154, 0.0721], dtype=image.dtype).view(3, 1, 1)  # ITU-R 709, as skimage
    return (image * weights).sum(dim=0, keepdim=True)


def patches(image: Tensor, patch_size: int, stride: Optional[int] = None) -> Tensor:
    """``[C, H, W]`` -> ``[P, C, patch, patch]`` on a regular grid (row by row), ``stride`` default ``patch``."""
    stride = patch_size if stride is None else stride
    if patch_size < 1 or stride < 1:
        raise ValueError(f"patch_size and stride must be >= 1, got {patch_size}, {stride}")
    height, width = image.shape[1:]
    if patch_size > min(height, width):
        raise ValueError(f"a {patch_size}x{patch_size} patch does not fit a {height}x{width} image; use a smaller "
                         "patch_size")
    grid = image.unfold(1, patch_size, stride).unfold(2, patch_size, stride)  # [C, rows, cols, p, p]
    return grid.permute(1, 2, 0, 3, 4).reshape(-1, image.shape[0], patch_size, patch_size).contiguous()


def photograph(name: str, channels: int = 3) -> Tensor:
    """One of scikit-image's bundled photographs (``PHOTOGRAPHS``) as ``[channels, H, W]`` in [-1, 1]."""
    if name not in PHOTOGRAPHS:
        raise ValueError(f"unknown photograph {name!r}; choose from {PHOTOGRAPHS}")
    data = _import("skimage.data", "photo_patches")
    return convert_channels(to_unit_range(getattr(data, name)()), channels)


def photo_patches(*, patch_size: int = 32, stride: Optional[int] = None, channels: int = 3,
                  train_photographs: Sequence[str] = TRAIN_PHOTOGRAPHS,
                  validation_photographs: Sequence[str] = VALIDATION_PHOTOGRAPHS,
                  max_validation: Optional[int] = None) -> ImageData:
    """Patches of scikit-image's photographs: ``train_photographs`` for training, the disjoint
    ``validation_photographs`` held out (at most ``max_validation`` patches, taken evenly through them)."""
    overlap = sorted(set(train_photographs) & set(validation_photographs))
    if overlap:
        raise ValueError(f"photographs {overlap} are both training and validation; the held-out scenes must be "
                         "different photographs")
    if not train_photographs or not validation_photographs:
        raise ValueError("photo_patches needs at least one training and one validation photograph")
    cut = [torch.cat([patches(photograph(name, channels), patch_size, stride) for name in names])
           for names in (train_photographs, validation_photographs)]
    train, validation = cut
    if max_validation is not None and len(validation) > max_validation:
        validation = validation[torch.linspace(0, len(validation) - 1, max_validation).long()]
    return ImageData(train, validation)


def digits_images(*, validation_fraction: float = 0.1) -> ImageData:
    """sklearn's 1,797 8x8 handwritten digits ``[N, 1, 8, 8]`` in [-1, 1]; the last ``validation_fraction``
    (in the data set's fixed order) validates."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    datasets = _import("sklearn.datasets", "digits_images")
    images = torch.from_numpy(datasets.load_digits().images.astype(np.float32))[:, None] / 16.0 * 2.0 - 1.0
    cut = int(round(len(images) * (1.0 - validation_fraction)))
    return ImageData(images[:cut].contiguous(), images[cut:].contiguous())


def _read_image(path: Path) -> np.ndarray:
    image_module = _import("PIL.Image", "image_folder")
    try:
        with image_module.open(path) as image:
            return np.asarray(image.convert("RGBA") if image.mode in ("P", "LA") else image)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {path} as an image ({error}); remove it or convert it to PNG/JPEG") from error


def _folder_patches(folder: Path, patch_size: int, stride: Optional[int], channels: int) -> Tensor:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return torch.cat([patches(convert_channels(to_unit_range(_read_image(path)), channels), patch_size, stride)
                      for path in files])


def image_folder(train: Union[str, Path], validation: Union[str, Path], *, patch_size: int = 32,
                 stride: Optional[int] = None, channels: int = 3) -> ImageData:
    """Patches of the images under two local folders (every file with an image suffix, recursively, in
    sorted order): ``train`` and a separate ``validation`` folder (keep them different scenes)."""
    return ImageData(_folder_patches(Path(train), patch_size, stride, channels),
                     _folder_patches(Path(validation), patch_size, stride, channels))


def hf_images(path: str, *, image_field: str = "image", train_split: str = "train",
              validation_split: str = "validation", patch_size: int = 32, stride: Optional[int] = None,
              channels: int = 3, data_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> ImageData:
    """The ``image_field`` column of a Hugging Face ``datasets`` data set (extra ``hf``), e.g.
    ``hf_images("imagefolder", data_dir=...)`` for local files, cut into patches like ``image_folder``."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError("hf_images needs the optional extra: pip install 'energyflow[hf]'") from error
    parts = []
    for split in (train_split, validation_split):
        dataset = datasets.load_dataset(path, split=split, data_dir=data_dir, cache_dir=cache_dir)
        if image_field not in dataset.column_names:
            raise ValueError(f"hf_images: dataset {path!r} has no column {image_field!r}; set image_field to one "
                             f"of {dataset.column_names}")
        parts.append(torch.cat([patches(convert_channels(to_unit_range(np.asarray(image)), channels), patch_size,
                                        stride) for image in dataset[image_field]]))
    return ImageData(*parts)
