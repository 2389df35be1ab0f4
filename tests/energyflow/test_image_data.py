"""Offline image data (``energyflow.data.images``): scikit-image's photographs cut into patches with disjoint
training and validation scenes, sklearn's digits, a local image folder and a Hugging Face image column, all
deterministic, in [-1, 1], with clear errors for bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from energyflow.data import ImageData, digits_images, hf_images, image_folder, photo_patches
from energyflow.data.images import TRAIN_PHOTOGRAPHS, VALIDATION_PHOTOGRAPHS, patches, photograph

pytest.importorskip("skimage", reason="the images extra: pip install 'energyflow[images]'")


def test_training_and_validation_photographs_are_different_scenes():
    assert not set(TRAIN_PHOTOGRAPHS) & set(VALIDATION_PHOTOGRAPHS)
    # no validation photograph is a crop or copy of a training one: compare 32x32 grayscale thumbnails
    thumbnails = {}
    for name in TRAIN_PHOTOGRAPHS + VALIDATION_PHOTOGRAPHS:
        image = photograph(name, channels=1)
        thumbnails[name] = torch.nn.functional.adaptive_avg_pool2d(image[None], 32)[0]
    for held_out in VALIDATION_PHOTOGRAPHS:
        for seen in TRAIN_PHOTOGRAPHS:
            assert (thumbnails[held_out] - thumbnails[seen]).abs().mean() > 0.05, (held_out, seen)
    with pytest.raises(ValueError, match="both training and validation"):
        photo_patches(train_photographs=("camera", "coffee"), validation_photographs=("coffee",))


def test_photo_patches_are_deterministic_in_range_and_shaped():
    first = photo_patches(patch_size=32, train_photographs=("astronaut", "camera"),
                          validation_photographs=("coffee",), max_validation=20)
    second = photo_patches(patch_size=32, train_photographs=("astronaut", "camera"),
                           validation_photographs=("coffee",), max_validation=20)
    assert torch.equal(first.train, second.train) and torch.equal(first.validation, second.validation)
    assert first.train.shape == (2 * 16 * 16, 3, 32, 32) and first.validation.shape == (20, 3, 32, 32)
    assert first.train.dtype == torch.float32 and -1.0 <= float(first.train.min()) < float(first.train.max()) <= 1.0
    # the grid is row by row: patch (row 0, col 1) of the astronaut is its pixels [0:32, 32:64]
    astronaut = photograph("astronaut")
    torch.testing.assert_close(first.train[1], astronaut[:, :32, 32:64], rtol=0, atol=0)
    gray = photo_patches(patch_size=16, stride=8, channels=1, train_photographs=("camera",),
                         validation_photographs=("page",))
    assert gray.train.shape[1:] == (1, 16, 16) and gray.train.shape[0] == 63 * 63


def test_digits_and_the_data_source_contract():
    digits = digits_images(validation_fraction=0.1)
    assert digits.train.shape == (1617, 1, 8, 8) and digits.validation.shape == (180, 1, 8, 8)
    assert float(digits.train.min()) == -1.0 and float(digits.train.max()) == 1.0
    stream = digits.train_stream(micro_batch=4, seed=3)
    batch = digits.to_batch(stream.next_step()[0])
    assert batch["images"].shape == (4, 1, 8, 8)
    assert [len(b) for b in digits.validation_batches(64, 5)] == [64, 64]


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not fit a 8x8 image"):
        patches(torch.zeros(1, 8, 8), 16)
    with pytest.raises(ValueError, match="unknown photograph 'cat'"):
        photograph("cat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        image_folder(tmp_path / "empty", tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read .*broken.png as an image"):
        image_folder(bad, bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        image_folder(tmp_path / "nowhere", bad)
    with pytest.raises(ValueError, match="non-empty float tensor"):
        ImageData(torch.zeros(0, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def _write_images(folder, count, seed, size=(20, 24)):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for index in range(count):
        array = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img_{index}.png")
        arrays.append(array)
    return arrays


def test_image_folder_reads_the_files_a_user_has(tmp_path):
    train = _write_images(tmp_path / "train", 2, seed=0)
    _write_images(tmp_path / "validation", 1, seed=1)
    data = image_folder(tmp_path / "train", tmp_path / "validation", patch_size=8)
    assert data.train.shape == (2 * 2 * 3, 3, 8, 8) and data.validation.shape == (6, 3, 8, 8)
    expected = torch.from_numpy(train[0][:8, 8:16].astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    torch.testing.assert_close(data.train[1], expected)


def test_hugging_face_image_column_on_local_files(tmp_path):
    pytest.importorskip("datasets")
    _write_images(tmp_path / "data" / "train", 2, seed=0)
    _write_images(tmp_path / "data" / "validation", 1, seed=1)
    data = hf_images("imagefolder", data_dir=str(tmp_path / "data"), patch_size=8, cache_dir=str(tmp_path / "cache"))
    folder = image_folder(tmp_path / "data" / "train", tmp_path / "data" / "validation", patch_size=8)
    assert data.train.shape == folder.train.shape and data.validation.shape == folder.validation.shape
    # the same pixels, whatever order the builder lists the files in
    assert torch.equal(data.train.sort(dim=0).values, folder.train.sort(dim=0).values)
