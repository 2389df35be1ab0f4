"""Offline data: the corpus, the split, packing, and the batch stream (determinism, resume, sharding)."""
from __future__ import annotations

import os

import pytest
import torch

from energyflow.data import BatchStream, hf_corpus, pack, pydoc_corpus, split_bytes, text_data, text_files, to_batch


def test_pydoc_corpus_is_deterministic_and_split_is_a_contiguous_tail():
    corpus = pydoc_corpus()
    assert corpus == pydoc_corpus() and len(corpus) > 400_000
    train, validation = split_bytes(corpus, 0.05)
    assert len(train) + len(validation) == len(corpus)
    assert bytes(validation.tolist()) == corpus[len(train):]
    assert abs(len(validation) / len(corpus) - 0.05) < 1e-4
    with pytest.raises(ValueError, match="validation_fraction"):
        split_bytes(corpus, 1.0)


def test_pack_makes_shifted_windows_covering_every_byte():
    data = torch.arange(23, dtype=torch.uint8)
    windows = pack(data, 5)  # (23 - 1) // 5 = 4 windows of 6 bytes, stride 5
    assert windows.shape == (4, 6)
    assert torch.equal(windows[1], torch.arange(5, 11, dtype=torch.uint8))
    batch = to_batch(windows)
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (4, 5)
    assert torch.equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
    # each target byte appears once: targets cover bytes 1..20 exactly
    assert torch.equal(batch["targets"].flatten(), torch.arange(1, 21))
    with pytest.raises(ValueError, match="cannot fill one window"):
        pack(data, 30)


def test_text_data_seq_len_and_validation_batches():
    data = text_data(seq_len=32, validation_fraction=0.1)
    assert data.train.shape[1] == 33 and data.validation.shape[1] == 33
    batches = data.validation_batches(8, max_batches=3)
    assert len(batches) == 3 and torch.equal(batches[1], data.validation[8:16])
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.validation_batches(len(data.validation) + 1)


def _stream(windows, **kwargs):
    settings = dict(micro_batch=2, accumulation_steps=1, seed=3)
    return BatchStream(windows, **{**settings, **kwargs})


def test_stream_is_seeded_and_covers_each_epoch_once():
    windows = torch.arange(10, dtype=torch.uint8).unsqueeze(1)
    def drain(stream):  # five steps of two windows: exactly one epoch
        return torch.cat([torch.cat(stream.next_step()) for _ in range(5)])

    first, again, other = drain(_stream(windows)), drain(_stream(windows)), drain(_stream(windows, seed=4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert sorted(first.flatten().tolist()) == list(range(10))  # one epoch = a permutation


def test_stream_resumes_from_its_state():
    windows = torch.arange(7, dtype=torch.uint8).unsqueeze(1)
    reference = _stream(windows)
    expected = [torch.cat(reference.next_step()) for _ in range(6)]  # crosses epoch boundaries
    first = _stream(windows)
    for _ in range(2):
        first.next_step()
    resumed = _stream(windows)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(torch.cat(resumed.next_step()), e) for e in expected[2:])
    with pytest.raises(ValueError, match="seed"):
        _stream(windows, seed=9).load_state_dict(first.state_dict())


def test_stream_shards_the_same_global_batch_over_ranks_and_micro_batches():
    windows = torch.arange(40, dtype=torch.uint8).unsqueeze(1)
    single = _stream(windows, micro_batch=8)
    ranks = [_stream(windows, micro_batch=2, accumulation_steps=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = single.next_step()[0].flatten().tolist()
        parts = [w.flatten().tolist() for r in ranks for w in r.next_step()]
        assert sorted(sum(parts, [])) == sorted(whole)
        assert not set(parts[0]) & set(parts[2])  # the two ranks never see the same window


def test_text_files_loader(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert text_files([tmp_path / "a.txt", tmp_path / "b.txt"]) == b"alpha\n\nbeta"
    with pytest.raises(FileNotFoundError, match="no such file"):
        text_files([tmp_path / "missing.txt"])


def test_hf_corpus_from_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # never the network (read when datasets is imported)
    pytest.importorskip("datasets")
    path = tmp_path / "lines.jsonl"
    path.write_text('{"text": "first line"}\n{"text": "second line"}\n')
    corpus = hf_corpus("json", data_files=str(path), cache_dir=str(tmp_path / "cache"))
    assert corpus == b"first line\n\nsecond line"
    with pytest.raises(ValueError, match="no column"):
        hf_corpus("json", data_files=str(path), text_field="body", cache_dir=str(tmp_path / "cache"))
    assert os.path.isdir(tmp_path / "cache")
