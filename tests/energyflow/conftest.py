"""Shared fixtures for the energyflow tests: clean gin state, tiny models, tiny data, tiny trainers."""
from __future__ import annotations

from typing import Callable

import gin
import pytest
import torch

from architectures import TransformerConfig, TransformerPP
from energyflow.data import TextData, text_data
from energyflow.tasks import LanguageModelTask
from energyflow.trainer import Trainer

SEQ_LEN = 16

# The tests' models are tiny and the test machine's cores are shared: extra intra-op threads only spin
# against other processes (measured ~80x slower per step at 2 threads under load than at 1).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def clean_gin():
    """No test sees another test's gin bindings."""
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(scope="session")
def tiny_data() -> TextData:
    return text_data(seq_len=SEQ_LEN)


def build_tiny_task(seed: int = 0, dim: int = 32) -> LanguageModelTask:
    """A one-layer Transformer++ (smaller than the 4xs preset) so that trainer tests take milliseconds."""
    torch.manual_seed(seed)
    config = TransformerConfig(dim=dim, num_layers=1, num_heads=2, max_seq_len=SEQ_LEN)
    return LanguageModelTask(TransformerPP(config, vocab_size=256))


@pytest.fixture
def make_task() -> Callable[..., LanguageModelTask]:
    return build_tiny_task


def build_tiny_trainer(**overrides) -> Trainer:
    settings = dict(num_steps=6, batch_size=4, learning_rate=3e-3, warmup_steps=2, checkpoint_every=3,
                    eval_batches=2, device="cpu", progress=False)
    return Trainer(**{**settings, **overrides})


@pytest.fixture
def make_trainer() -> Callable[..., Trainer]:
    return build_tiny_trainer


@pytest.fixture(scope="session")
def token_corpus(tmp_path_factory):
    """The embedded pydoc corpus prepared at token level with a 512-token BPE trained on it (the hf extra), for
    the token-level recipes: the corpus directory (``DATA_DIR``)."""
    pytest.importorskip("tokenizers", reason="the hf extra: pip install 'energyflow[hf]'")
    from energyflow.data import pydoc_corpus
    from energyflow.data import tokens

    folder = tmp_path_factory.mktemp("token_corpus")
    (folder / "pydoc.txt").write_bytes(pydoc_corpus())
    tokens.train_tokenizer([folder / "pydoc.txt"], 512, folder / "tok.json")
    tokens.prepare_corpus(lambda: tokens.text_file_documents([folder / "pydoc.txt"]), folder / "tok.json",
                          folder / "data", source="pydoc", validation_fraction=0.05, shard_tokens=1 << 16)
    return folder / "data"
