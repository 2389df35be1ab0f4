"""Text at scale: a byte-level BPE trained on the embedded corpus, `prepare` into memory-mapped shards (split by
document, resumable to the same bytes), the shard DataSource (windows equal the token stream, rank-sharded,
resumable bit for bit, a permutation per epoch that is never materialized), and the token-level recipes."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console

pytest.importorskip("tokenizers", reason="the hf extra: pip install 'energyflow[hf]'")

from energyflow.cli import main  # noqa: E402
from energyflow.data import pydoc_corpus  # noqa: E402
from energyflow.data import tokens  # noqa: E402


def _cli(args):
    buffer = io.StringIO()
    return main(args, console=Console(file=buffer, width=300)), buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The pydoc corpus as a text file, a 1024-token BPE trained on it, and the corpus prepared with it."""
    folder = tmp_path_factory.mktemp("tokens")
    text = folder / "pydoc.txt"
    text.write_bytes(pydoc_corpus())
    status, output = _cli(["tokenizer", "train", str(text), "--vocab-size", "1024", "--out", str(folder / "tok.json")])
    assert status == 0, output
    status, output = _cli(["prepare", str(text), "--tokenizer", str(folder / "tok.json"), "--out",
                           str(folder / "data"), "--shard-tokens", "20000", "--validation-fraction", "0.05",
                           "--no-progress"])
    assert status == 0, output
    return folder


def test_the_tokenizer_round_trips_text_and_has_its_separator(corpus):
    tokenizer = tokens.load_tokenizer(corpus / "tok.json")
    assert tokenizer.get_vocab_size(with_added_tokens=True) == 1024
    sample = "def f(x):\n    return x ** 2  # ünïcödé, 中文\n"
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample  # byte-level: any text encodes
    assert tokens.end_of_text_id(tokenizer) == tokenizer.token_to_id("<|endoftext|>")
    assert tokens.tokenizer_vocab_size(str(corpus / "tok.json")) == 1024
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        (corpus / "bad.json").write_text("{}")
        tokens.load_tokenizer(corpus / "bad.json")


def test_prepare_writes_every_document_once_split_by_its_hash(corpus):
    meta = tokens.read_meta(corpus / "data")
    assert meta["complete"] and meta["dtype"] == "uint16" and meta["vocab_size"] == 1024
    tokenizer = tokens.load_tokenizer(corpus / "tok.json")
    documents = list(tokens.text_file_documents([corpus / "pydoc.txt"]))
    eot = tokens.end_of_text_id(tokenizer)
    expected = {"train": [], "validation": []}
    for document in documents:
        split = "validation" if tokens.in_validation(document, 0.05) else "train"
        expected[split].extend(tokenizer.encode(document).ids + [eot])
    for split in ("train", "validation"):
        written = np.concatenate([np.fromfile(corpus / "data" / s["name"], dtype=np.uint16)
                                  for s in meta["shards"][split]])
        assert written.tolist() == expected[split]
        assert meta["tokens"][split] == len(expected[split])
    assert meta["documents"]["train"] + meta["documents"]["validation"] == len(documents)
    assert 0.02 < meta["documents"]["validation"] / len(documents) < 0.08  # 5% of ~2600 documents by hash
    assert len(meta["shards"]["train"]) > 3  # sharded at ~20k tokens
    # a rerun is a no-op; other settings into the same directory are refused
    assert tokens.prepare_corpus(lambda: iter(documents), corpus / "tok.json", corpus / "data",
                                 source=meta["settings"]["source"], validation_fraction=0.05,
                                 shard_tokens=20000) == meta
    status, output = _cli(["prepare", str(corpus / "pydoc.txt"), "--tokenizer", str(corpus / "tok.json"),
                           "--out", str(corpus / "data"), "--validation-fraction", "0.1", "--no-progress"])
    assert status == 1 and "other settings" in output and "Traceback" not in output


def test_a_killed_prepare_resumes_to_the_same_shards(corpus, tmp_path):
    documents = list(tokens.text_file_documents([corpus / "pydoc.txt"]))
    source = "text:test"
    whole = tokens.prepare_corpus(lambda: iter(documents), corpus / "tok.json", tmp_path / "whole", source=source,
                                  validation_fraction=0.05, shard_tokens=20000)

    class Killed(Exception):
        pass

    def dying():  # the process dies after ~half of the documents
        for index, document in enumerate(documents):
            if index == len(documents) // 2:
                raise Killed
            yield document

    with pytest.raises(Killed):
        tokens.prepare_corpus(dying, corpus / "tok.json", tmp_path / "resumed", source=source,
                              validation_fraction=0.05, shard_tokens=20000, batch_documents=64)
    partial = tokens.read_meta(tmp_path / "resumed")
    assert not partial["complete"] and 0 < partial["documents_consumed"] < len(documents)
    resumed = tokens.prepare_corpus(lambda: iter(documents), corpus / "tok.json", tmp_path / "resumed",
                                    source=source, validation_fraction=0.05, shard_tokens=20000, batch_documents=64)
    assert resumed["tokens"] == whole["tokens"] and resumed["documents"] == whole["documents"]
    for split in ("train", "validation"):
        joined = [np.fromfile(d / s["name"], dtype=np.uint16) for d, m in ((tmp_path / "whole", whole),)
                  for s in m["shards"][split]]
        again = [np.fromfile(tmp_path / "resumed" / s["name"], dtype=np.uint16) for s in resumed["shards"][split]]
        assert np.concatenate(joined).tolist() == np.concatenate(again).tolist()


def test_jsonl_sources_and_their_errors(corpus, tmp_path):
    lines = [json.dumps({"text": f"document number {i} " * 20, "id": i}) for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    status, output = _cli(["prepare", str(tmp_path / "docs.jsonl"), "--tokenizer", str(corpus / "tok.json"),
                           "--out", str(tmp_path / "jsonl"), "--validation-fraction", "0.2", "--no-progress"])
    assert status == 0, output
    meta = tokens.read_meta(tmp_path / "jsonl")
    assert meta["documents"]["train"] + meta["documents"]["validation"] == 40
    status, output = _cli(["prepare", str(tmp_path / "docs.jsonl"), "--field", "body", "--tokenizer",
                           str(corpus / "tok.json"), "--out", str(tmp_path / "bad"), "--no-progress"])
    assert status == 1 and "docs.jsonl, line 1: no field 'body'" in output


def test_a_hugging_face_dataset_streams_into_the_same_corpus(corpus, tmp_path):
    pytest.importorskip("datasets")
    lines = [json.dumps({"text": f"streamed record {i}. " * 10}) for i in range(30)]
    (tmp_path / "web.jsonl").write_text("\n".join(lines) + "\n")
    status, output = _cli(["prepare", "hf:json", "--data-files", str(tmp_path / "web.jsonl"), "--tokenizer",
                           str(corpus / "tok.json"), "--out", str(tmp_path / "hf"), "--validation-fraction", "0.2",
                           "--no-progress"])
    assert status == 0, output
    status, _ = _cli(["prepare", str(tmp_path / "web.jsonl"), "--tokenizer", str(corpus / "tok.json"),
                      "--out", str(tmp_path / "local"), "--validation-fraction", "0.2", "--no-progress"])
    hf, local = tokens.read_meta(tmp_path / "hf"), tokens.read_meta(tmp_path / "local")
    assert hf["tokens"] == local["tokens"] and hf["documents"] == local["documents"]


def test_shard_windows_are_the_token_stream_and_the_stream_resumes_exactly(corpus):
    data = tokens.TokenShards(corpus / "data", seq_len=32)
    meta = data.meta
    stream = np.concatenate([np.fromfile(corpus / "data" / s["name"], dtype=np.uint16)
                             for s in meta["shards"]["train"]]).astype(np.int64)
    windows = data.train
    assert len(windows) == (len(stream) - 1) // 32
    # windows that cross a shard boundary too
    boundary = meta["shards"]["train"][0]["tokens"] // 32
    for index in (0, 1, boundary - 1, boundary, boundary + 1, len(windows) - 1):
        assert windows[torch.tensor([index])][0].tolist() == stream[index * 32:index * 32 + 33].tolist()
    # the random order: a permutation of the windows in every epoch, different between epochs
    train = data.train_stream(micro_batch=len(windows), seed=3)
    first, second = train._indices(0, len(windows)), train._indices(len(windows), len(windows))
    assert sorted(first.tolist()) == list(range(len(windows))) == sorted(second.tolist())
    assert first.tolist() != second.tolist()
    assert data.train_stream(micro_batch=4, seed=3)._indices(0, 8).tolist() == first[:8].tolist()
    # resumed from its state: the same batches bit for bit; ranks take disjoint rows of one global batch
    whole = data.train_stream(micro_batch=4, accumulation_steps=2, seed=1)
    batches = [whole.next_step() for _ in range(5)]
    resumed = data.train_stream(micro_batch=4, accumulation_steps=2, seed=1)
    probe = data.train_stream(micro_batch=4, accumulation_steps=2, seed=1)
    for _ in range(3):
        probe.next_step()
    resumed.load_state_dict(probe.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed.next_step() + resumed.next_step(),
                                                 batches[3] + batches[4]))
    ranks = [data.train_stream(micro_batch=2, accumulation_steps=2, seed=1, rank=r, world_size=2).next_step()
             for r in range(2)]
    rows = sorted(tuple(row.tolist()) for part in ranks for micro in part for row in micro)
    assert rows == sorted(tuple(row.tolist()) for micro in batches[0] for row in micro)
    sequential = tokens.TokenShards(corpus / "data", seq_len=32, order="sequential").train_stream(micro_batch=3)
    assert sequential._indices(0, 5).tolist() == [0, 1, 2, 3, 4]
    batch = data.to_batch(batches[0][0])
    assert torch.equal(batch["tokens"][:, 1:], batch["targets"][:, :-1]) and batch["tokens"].dtype == torch.long


def test_the_token_recipes_train_with_the_corpus_vocabulary(corpus, tmp_path):
    runs = tmp_path / "runs"
    status, output = _cli(["train", "experiments/quickstart_tokens_debug.gin", "--out", str(runs), "--bind",
                           f"DATA_DIR = '{corpus / 'data'}'", "--bind", "Trainer.progress = False"])
    assert status == 0, output
    from energyflow.runs import load_run

    for name in ("ebt", "baseline"):
        result, _, step = load_run(runs / name, device="cpu")
        assert step == 4 and result.task.model.vocab_size == 1024  # from the corpus, one binding
    status, output = _cli(["eval", str(runs / "baseline"), "--no-progress"])
    assert status == 0 and "baseline (step 4)" in output
    # downstream evaluation encodes with the corpus's tokenizer
    choice = tmp_path / "choice.jsonl"
    choice.write_text(json.dumps({"context": "The for statement", "choices": [" is", " banana"], "answer": 0}) + "\n")
    report = tmp_path / "choice.json"
    status, output = _cli(["evaluate-task", str(runs / "ebt"), "--baseline", str(runs / "baseline"), "--task",
                           "choice", "--data", str(choice), "--json", str(report), "--no-progress"])
    assert status == 0, output
    encodings = {run["encoding"] for run in json.loads(report.read_text())["runs"].values()}
    assert encodings == {"tokenizer tok.json"}
    status, output = _cli(["train", "experiments/transformer_pp_tokens_debug.gin", "--out", str(tmp_path / "t"),
                           "--bind", f"DATA_DIR = '{tmp_path / 'nowhere'}'"])
    assert status == 1 and "not a prepared corpus" in output and "energyflow prepare" in output
