"""`energyflow evaluate-task`: LAMBADA-style last-word accuracy and multiple-choice scoring on JSONL files the test
writes, the EBT (energy, or likelihood after thinking) and the Transformer++ (likelihood) side by side; every
accuracy is recomputed here from the models' own outputs."""
from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console

from energyflow.cli import main
from energyflow.inference.downstream import read_examples, run_codec
from energyflow.runs import load_run

SENTENCES = ["The for statement is used to iterate over the elements of a sequence",
             "A function definition defines a user-defined function object",
             "The import statement finds and loads a module",
             "An expression statement evaluates the expression list"]


def _cli(args):
    buffer = io.StringIO()
    return main(args, console=Console(file=buffer, width=300)), buffer.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("downstream") / "runs"
    status, output = _cli(["train", "experiments/quickstart_debug.gin", "--out", str(out), "--bind",
                           "Trainer.progress = False", "--bind", "SEQ_LEN = 32"])
    assert status == 0, output
    return out


@pytest.fixture
def files(tmp_path):
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    choice = tmp_path / "choice.jsonl"
    rows = [{"context": s.rsplit(" ", 1)[0], "choices": [" " + s.rsplit(" ", 1)[1], " banana", " qq"], "answer": 0}
            for s in SENTENCES]
    choice.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return lambada, choice


def test_bad_files_are_one_line_naming_the_line(runs, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"context": "x", "choices": ["a"], "answer": 0}) + "\n")
    status, output = _cli(["evaluate-task", str(runs / "ebt"), "--task", "choice", "--data", str(bad)])
    assert status == 1 and "bad.jsonl, line 1" in output and "two or more" in output and "Traceback" not in output
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        read_examples(str(bad), "lambada")
    status, output = _cli(["evaluate-task", str(runs / "ebt"), "--task", "lambada", "--data", str(tmp_path / "no")])
    assert status == 1 and "no data file" in output


def test_choice_accuracies_are_the_models_own_rankings(runs, files, tmp_path):
    from energyflow.verifier import score_continuations

    _, choice = files
    out = tmp_path / "choice.json"
    status, output = _cli(["evaluate-task", str(runs / "ebt"), "--baseline", str(runs / "baseline"), "--task",
                           "choice", "--data", str(choice), "--json", str(out), "--no-progress"])
    assert status == 0, output
    report = json.loads(out.read_text())["runs"]
    examples = read_examples(str(choice), "choice")
    ebt, _, _ = load_run(runs / "ebt", device="cpu")
    baseline, _, _ = load_run(runs / "baseline", device="cpu")
    codec = run_codec(ebt)
    assert codec.name == "bytes"
    ebt_right = tpp_right = 0
    for example in examples:
        choices = [torch.tensor(codec.encode(c)) for c in example["choices"]]
        width = max(len(c) for c in choices)  # the context's last tokens that leave room in the 32-token window
        context = torch.tensor(codec.encode(example["context"]))[-(32 - width + 1):]
        scores = score_continuations(ebt.task.eval().model, context, choices)
        ebt_right += int(scores.mean_energy.argmin()) == example["answer"]
        means = []
        for c in choices:  # the Transformer++ teacher-forced on context + choice, mean log-probability of the choice
            tokens = torch.cat([context, c])[None]
            with torch.no_grad():
                log_p = torch.log_softmax(baseline.task.eval().model(tokens[:, :-1]).float(), -1)
            means.append(float(log_p[0, len(context) - 1:].gather(-1, c[:, None]).mean()))
        tpp_right += max(range(len(means)), key=means.__getitem__) == example["answer"]
    assert report[str(runs / "ebt")]["scores"]["mean energy"]["accuracy"] == pytest.approx(ebt_right / 4)
    assert report[str(runs / "baseline")]["scores"]["mean log-likelihood"]["accuracy"] == pytest.approx(tpp_right / 4)
    status, output = _cli(["evaluate-task", str(runs / "ebt"), "--task", "choice", "--score", "thinking", "--steps",
                           "2", "--data", str(choice), "--no-progress"])
    assert status == 0 and "after thinking" in output


def test_lambada_accuracy_is_exact_match_of_the_greedy_continuation(runs, files, tmp_path):
    from energyflow.inference import Decoding, generate_baseline

    lambada, _ = files
    out = tmp_path / "lambada.json"
    status, output = _cli(["evaluate-task", str(runs / "baseline"), "--task", "lambada", "--data", str(lambada),
                           "--json", str(out), "--no-progress"])
    assert status == 0, output
    (scores,) = json.loads(out.read_text())["runs"].values()
    baseline, _, _ = load_run(runs / "baseline", device="cpu")
    right = 0
    for example in read_examples(str(lambada), "lambada"):
        target = list(example["target"].encode())
        context = list(example["context"].encode())[-(32 - len(target) + 1):]
        tokens = generate_baseline(baseline.task.eval().model, torch.tensor([context]), len(target), Decoding()).tokens
        right += tokens[0].tolist() == target
    assert scores["scores"]["greedy exact match"]["accuracy"] == pytest.approx(right / 4)
    assert read_examples(str(lambada), "lambada")[0]["target"] == " sequence"
    status, output = _cli(["evaluate-task", str(runs / "ebt"), "--task", "lambada", "--data", str(lambada),
                           "--no-progress"])
    assert status == 0 and "greedy exact match after thinking" in output
