"""Offline video as a ``DataSource``: procedurally generated clips (digits bouncing in a canvas; bouncing shapes)
and a loader for local ``.npy`` clips. A clip is ``[T, C, H, W]`` in [-1, 1] (background -1); a batch is
``{"frames": [B, T, C, H, W]}``.

Moving digits: ``num_digits`` of sklearn's 8x8 digit images (upsampled ``scale`` times, nearest neighbour) move
inside a ``canvas`` x ``canvas`` frame at ``speed`` pixels per frame in a random direction; a digit that would
leave the canvas is reflected back and its velocity along that axis reverses (elastic walls). Digits pass over
each other (occlusion: the brighter pixel wins). Every clip has its own seed (``seed``, split, clip index), so the
data are the same on every machine; training clips draw from the first 90% of the digit images in
sklearn's fixed order and validation clips from the last 10% -- digit images the training clips never show.

Bouncing shapes: squares and discs of random size and grey level under the same physics, a harder or
out-of-distribution variant (faster, more objects) for a model trained on digits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional, Union

import numpy as np
import torch
from torch import Tensor

from energyflow.data.base import TensorData

SPLIT_SEEDS = {"train": 0, "validation": 1}


@dataclass
class VideoData(TensorData):
    """``train [N, T, C, H, W]`` and ``validation [M, T, C, H, W]`` clips in [-1, 1]; a batch is
    ``{"frames": [B, T, C, H, W]}``."""

    validation_collisions: Optional[Tensor] = None  # [M, T] bool: two objects' ink overlaps in this frame
    validation_bounces: Optional[Tensor] = None  # [M, T] bool: an object turned off a wall into this frame
    batch_key: ClassVar[str] = "frames"
    example_layout: ClassVar[str] = "[N, T, C, H, W]"

    @property
    def frame_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return tuple(self.train.shape[2:])

    @property
    def clip_length(self) -> int:
        return self.train.shape[1]


def bounce(position: np.ndarray, velocity: np.ndarray, limit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One step of the walls' physics: ``position + velocity``, reflected into ``[0, limit]`` per axis, the
    velocity reversed along every axis that hit a wall. ``position``, ``velocity``, ``limit``: ``[..., 2]``."""
    moved, velocity = position + velocity, velocity.copy()
    low, high = moved < 0, moved > limit
    moved = np.where(low, -moved, np.where(high, 2 * limit - moved, moved))
    velocity[low | high] *= -1
    return np.clip(moved, 0, limit), velocity


def trajectories(rng: np.random.Generator, count: int, frames: int, limit: np.ndarray,
                 speed: float) -> np.ndarray:
    """``count`` objects' top-left corners ``[frames, count, 2]`` from uniform starts, direction uniform at ``speed``."""
    position = rng.uniform(0, 1, size=(count, 2)) * limit
    angle = rng.uniform(0, 2 * np.pi, size=count)
    velocity = speed * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    path = np.empty((frames, count, 2))
    for t in range(frames):
        path[t] = position
        position, velocity = bounce(position, velocity, limit)
    return path


def bounces(paths: list[np.ndarray]) -> np.ndarray:
    """Per frame of one clip: whether an object's velocity reversed on the way into it (a bounce off a wall).
    ``paths``: one ``[T, 2]`` corner track per object."""
    frames = len(paths[0])
    turned = np.zeros(frames, dtype=bool)
    for path in paths:
        step = np.diff(path, axis=0)  # [T-1, 2]: the move into frame t+1
        if len(step) >= 2:
            turned[2:] |= np.any(np.sign(step[1:]) * np.sign(step[:-1]) < 0, axis=1)
    return turned


def _render(frame: np.ndarray, sprites, corners) -> bool:
    """Paste every sprite into ``frame`` (max-composite); True if two sprites' ink (> 0.25) overlaps: a collision,
    one digit occluding the other."""
    ink = np.zeros(frame.shape, dtype=np.int64)
    for sprite, corner in zip(sprites, corners):
        row, col = (int(round(v)) for v in corner)
        h, w = sprite.shape
        np.maximum(frame[row:row + h, col:col + w], sprite, out=frame[row:row + h, col:col + w])
        ink[row:row + h, col:col + w] += sprite > 0.25
    return bool((ink >= 2).any())


def _digit_images(split: str, scale: int) -> np.ndarray:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("moving_digits needs the optional extra: pip install 'energyflow[images]'") from error
    images = load_digits().images.astype(np.float64) / 16.0  # [1797, 8, 8] in [0, 1], fixed order
    cut = int(round(len(images) * 0.9))
    chosen = images[:cut] if split == "train" else images[cut:]
    return chosen.repeat(scale, axis=1).repeat(scale, axis=2)


def _check(canvas: int, sprite: int, frames: int, counts: tuple[int, int], objects: int, speed: float) -> None:
    if frames < 2:
        raise ValueError(f"a clip needs at least 2 frames (context and a next frame), got frames={frames}")
    if min(counts) < 1 or objects < 1:
        raise ValueError(f"num_train, num_validation and the number of objects must be >= 1, got {counts}, {objects}")
    if sprite > canvas:
        raise ValueError(f"a {sprite}x{sprite} object does not fit a {canvas}x{canvas} canvas; raise canvas or lower "
                         "scale / max_size")
    if speed < 0:
        raise ValueError(f"speed must be >= 0 pixels per frame, got {speed}")


def _to_clips(frames: np.ndarray) -> Tensor:
    """``[N, T, H, W]`` intensities in [0, 1] -> float32 ``[N, T, 1, H, W]`` in [-1, 1]."""
    return torch.from_numpy(frames.astype(np.float32) * 2.0 - 1.0)[:, :, None].contiguous()


def moving_digits(*, num_train: int = 2048, num_validation: int = 256, frames: int = 16, canvas: int = 32,
                  num_digits: int = 2, scale: int = 2, speed: float = 2.0, seed: int = 0) -> VideoData:
    """Clips of ``num_digits`` digits bouncing in a ``canvas`` x ``canvas`` frame (see the module docstring)."""
    size = 8 * scale
    _check(canvas, size, frames, (num_train, num_validation), num_digits, speed)
    limit = np.array([canvas - size, canvas - size], dtype=np.float64)
    splits, flags = {}, {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        digits = _digit_images(split, scale)
        clips = np.zeros((count, frames, canvas, canvas))
        collisions, turned = np.zeros((count, frames), dtype=bool), np.zeros((count, frames), dtype=bool)
        for index in range(count):
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index])
            sprites = digits[rng.integers(0, len(digits), size=num_digits)]
            path = trajectories(rng, num_digits, frames, limit, speed)
            for t in range(frames):
                collisions[index, t] = _render(clips[index, t], sprites, path[t])
            turned[index] = bounces([path[:, k] for k in range(num_digits)])
        splits[split], flags[split] = _to_clips(clips), (torch.from_numpy(collisions), torch.from_numpy(turned))
    return VideoData(splits["train"], splits["validation"], *flags["validation"])


def bouncing_shapes(*, num_train: int = 2048, num_validation: int = 256, frames: int = 16, canvas: int = 32,
                    num_shapes: int = 3, min_size: int = 4, max_size: int = 10, speed: float = 3.0,
                    seed: int = 0) -> VideoData:
    """Clips of ``num_shapes`` squares and discs (side/diameter in ``[min_size, max_size]``, grey level in
    [0.4, 1]) bouncing in the canvas under the digits' physics."""
    if not 1 <= min_size <= max_size:
        raise ValueError(f"bouncing_shapes needs 1 <= min_size <= max_size, got {min_size}, {max_size}")
    _check(canvas, max_size, frames, (num_train, num_validation), num_shapes, speed)
    splits, flags = {}, {}
    for split, count in (("train", num_train), ("validation", num_validation)):
        clips = np.zeros((count, frames, canvas, canvas))
        collisions, turned = np.zeros((count, frames), dtype=bool), np.zeros((count, frames), dtype=bool)
        for index in range(count):
            rng = np.random.default_rng([seed, SPLIT_SEEDS[split], index, 7])
            sizes = rng.integers(min_size, max_size + 1, size=num_shapes)
            sprites = []
            for size in sizes:
                level = rng.uniform(0.4, 1.0)
                if rng.random() < 0.5:
                    sprites.append(np.full((size, size), level))
                else:
                    centre = (size - 1) / 2
                    rows, cols = np.mgrid[:size, :size]
                    sprites.append(level * (((rows - centre) ** 2 + (cols - centre) ** 2) <= (size / 2) ** 2))
            paths = [trajectories(rng, 1, frames, np.array([canvas - s, canvas - s], dtype=np.float64), speed)
                     for s in sizes]
            for t in range(frames):
                collisions[index, t] = _render(clips[index, t], sprites, [path[t, 0] for path in paths])
            turned[index] = bounces([path[:, 0] for path in paths])
        splits[split], flags[split] = _to_clips(clips), (torch.from_numpy(collisions), torch.from_numpy(turned))
    return VideoData(splits["train"], splits["validation"], *flags["validation"])


def _read_clips(path: Union[str, Path]) -> Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no clip file {path}; give a .npy array [N, T, H, W] or [N, T, H, W, C]")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not a readable .npy array ({error}); save clips with numpy.save") from error
    if array.ndim == 4:
        array = array[..., None]
    if array.ndim != 5 or array.shape[1] < 2 or 0 in array.shape:
        raise ValueError(f"{path} holds an array of shape {array.shape}; clips are [N, T, H, W] or [N, T, H, W, C] "
                         "with at least 2 frames")
    if np.issubdtype(array.dtype, np.integer):
        values = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    elif np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if values.min() < 0.0 or values.max() > 1.0:
            raise ValueError(f"{path}: float clips must hold intensities in [0, 1], got [{values.min():.3g}, "
                             f"{values.max():.3g}]; divide by the maximum or save uint8")
    else:
        raise ValueError(f"{path} holds {array.dtype} values; save uint8 or float intensities in [0, 1]")
    return torch.from_numpy(values * 2.0 - 1.0).permute(0, 1, 4, 2, 3).contiguous()


def npy_clips(train: Union[str, Path], validation: Union[str, Path], *, max_frames: Optional[int] = None) -> VideoData:
    """Your own clips: two ``.npy`` files ``[N, T, H, W]`` or ``[N, T, H, W, C]`` (uint8, or floats in [0, 1]),
    cut to the first ``max_frames`` frames if given."""
    clips = [_read_clips(train), _read_clips(validation)]
    if max_frames is not None:
        if max_frames < 2:
            raise ValueError(f"max_frames must be >= 2, got {max_frames}")
        clips = [c[:, :max_frames] for c in clips]
    return VideoData(*clips)
