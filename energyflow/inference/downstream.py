"""Downstream evaluation on local JSONL files: LAMBADA-style last-word accuracy and multiple-choice scoring,
the EBT and the Transformer++ side by side (``energyflow evaluate-task``).

- ``lambada``: each line ``{"text": ...}``; the context is the text up to its last space, the target the rest
  (the space and the last word). A model is right when its greedy continuation of the context, as many tokens as
  the target has, is exactly the target. The EBT decodes by thinking at each token (``generate_ebt``, its
  trained step count unless ``steps`` is given); the Transformer++ greedily.
- ``choice`` (ARC / HellaSwag style): each line ``{"context": ..., "choices": [...], "answer": index}``. The
  EBT ranks the choices by the mean energy of their tokens given the context (``score="energy"``, lower is
  better: the energy as a verifier) or, after thinking, by the mean log-likelihood of the choice's tokens under
  the distributions it predicts at each position (``score="thinking"``, teacher-forced on the choice); the
  Transformer++ by its mean log-likelihood of the choice's tokens (and by the sum, reported too).

Text is encoded as the run was trained: bytes for a byte-level run, the corpus's tokenizer for a run on a
prepared token corpus (``TokenShards``; its ``meta.json`` names the tokenizer, checked against its SHA-256).
Contexts longer than the model's window keep their last tokens. Accuracies come with their binomial standard
error ``sqrt(p (1 - p) / n)``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from architectures import TransformerPP
from energyflow.inference.generation import Decoding, generate_baseline, generate_ebt
from energyflow.inference.text import think_tokens, thinking_config
from energyflow.models import TextEBM
from energyflow.objectives.components import resolve_num_steps

TASKS = ("lambada", "choice")


@dataclass
class Codec:
    encode: Callable[[str], list[int]]
    name: str


def run_codec(result) -> Codec:
    """How the run's text was encoded: the tokenizer of its token corpus, or UTF-8 bytes."""
    from energyflow.data.tokens import TokenShards, file_sha256, load_tokenizer

    data = result.data
    if isinstance(data, TokenShards):
        path = Path(data.meta["tokenizer"])
        if not path.is_file():
            raise FileNotFoundError(f"the run's corpus was tokenized with {path}, which is not there any more; put "
                                    "that tokenizer.json back (its SHA-256 is in the corpus's meta.json)")
        if file_sha256(path) != data.meta["settings"]["tokenizer_sha256"]:
            raise ValueError(f"{path} is not the tokenizer the run's corpus was prepared with (its SHA-256 differs)")
        tokenizer = load_tokenizer(path)
        return Codec(lambda text: tokenizer.encode(text).ids, f"tokenizer {path.name}")
    return Codec(lambda text: list(text.encode("utf-8")), "bytes")


def read_examples(path: str, task: str) -> list[dict]:
    """The JSONL examples of ``task``, each checked for its fields (a bad line names the file and line)."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no data file {path}; give a JSONL file (its format is in docs/text_at_scale.md)")
    from energyflow.data.tokens import jsonl_records

    examples = []
    for number, record in jsonl_records(path):
        if task == "lambada":
            text = record.get("text")
            if not isinstance(text, str) or " " not in text.strip():
                raise ValueError(f"{path}, line {number}: a lambada example is {{\"text\": \"... last word\"}} with at "
                                 "least two words")
            text = text.rstrip()
            cut = text.rindex(" ")
            examples.append({"context": text[:cut], "target": text[cut:]})
        else:
            choices, answer = record.get("choices"), record.get("answer")
            if (not isinstance(record.get("context"), str) or not isinstance(choices, list) or len(choices) < 2
                    or not all(isinstance(c, str) and c for c in choices) or not isinstance(answer, int)
                    or not 0 <= answer < len(choices)):
                raise ValueError(f"{path}, line {number}: a choice example is {{\"context\": str, \"choices\": [two or "
                                 "more non-empty strings], \"answer\": index of the right one}")
            examples.append({"context": record["context"], "choices": choices, "answer": answer})
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples


def _window(model: nn.Module) -> int:
    config = model.backbone.config if isinstance(model, TextEBM) else model.config
    return config.max_seq_len


def _fit(context: list[int], continuation_length: int, window: int) -> list[int]:
    """The context's last tokens that leave room for the continuation in the model's window."""
    room = window - continuation_length + 1
    if room < 1:
        raise ValueError(f"a continuation of {continuation_length} tokens does not fit the model's window of {window}")
    return context[-room:] if len(context) > room else context


def accuracy(correct: Sequence[bool]) -> tuple[float, float]:
    p = sum(correct) / len(correct)
    return p, math.sqrt(p * (1 - p) / len(correct))


def _pack(model: nn.Module, context: list[int], continuations: list[list[int]], device) -> tuple[Tensor, Tensor, int]:
    """``rows [N, P + L]`` (the fitted context, then each continuation right-padded), ``mask [N, L]`` of the real
    continuation tokens, and ``P``."""
    width = max(len(c) for c in continuations)
    prefix = _fit(context, width, _window(model))
    rows = torch.zeros(len(continuations), len(prefix) + width, dtype=torch.long, device=device)
    rows[:, :len(prefix)] = torch.tensor(prefix, device=device)
    mask = torch.zeros(len(continuations), width, dtype=torch.bool, device=device)
    for row, continuation in enumerate(continuations):
        rows[row, len(prefix):len(prefix) + len(continuation)] = torch.tensor(continuation, device=device)
        mask[row, :len(continuation)] = True
    return rows, mask, len(prefix)


@torch.no_grad()
def _baseline_log_probs(model: nn.Module, context: list[int], continuations: list[list[int]], device) -> Tensor:
    """``[N, L]`` log-probability of each continuation's tokens (0 past its end) after ``context``."""
    rows, mask, prefix = _pack(model, context, continuations, device)
    logits = model(rows[:, :-1]).float()[:, prefix - 1:]
    picked = torch.log_softmax(logits, dim=-1).gather(-1, rows[:, prefix:, None]).squeeze(-1)
    return picked * mask


def evaluate_lambada(task, examples: list[dict], codec: Codec, *, steps: Optional[int] = None,
                     device=torch.device("cpu"), advance=None) -> dict:
    model, correct = task.model, []
    is_ebt = isinstance(model, TextEBM)
    config = None
    if is_ebt:
        count = steps or resolve_num_steps(task.objective.num_steps, 0, training=False)
        config = thinking_config(task.objective, num_steps=count)
    for example in examples:
        target = codec.encode(example["target"])
        context = _fit(codec.encode(example["context"]), len(target), _window(model))
        prompt = torch.tensor([context], device=device)
        if is_ebt:
            out = generate_ebt(model, prompt, len(target), config, Decoding(),
                               generator=torch.Generator(device=device).manual_seed(0),
                               initial_state=task.objective.initial_state,
                               step_index_mode=getattr(task.objective, "step_index_mode", "per_step"))
        else:
            out = generate_baseline(model, prompt, len(target), Decoding())
        correct.append(out.tokens[0].tolist() == target)
        if advance is not None:
            advance(1)
    value, error = accuracy(correct)
    return {"accuracy": value, "stderr": error, "examples": len(correct)}


def evaluate_choice(task, examples: list[dict], codec: Codec, *, score: str = "energy", steps: Optional[int] = None,
                    device=torch.device("cpu"), advance=None) -> dict:
    from energyflow.verifier import score_continuations

    model = task.model
    is_ebt = isinstance(model, TextEBM)
    if score not in ("energy", "thinking"):
        raise ValueError(f"--score must be 'energy' or 'thinking', got {score!r}")
    results: dict[str, list[bool]] = {}
    for example in examples:
        context = codec.encode(example["context"])
        choices = [codec.encode(c) for c in example["choices"]]
        if is_ebt and score == "energy":
            prefix = _fit(context, max(len(c) for c in choices), _window(model))
            scores = score_continuations(model, torch.tensor(prefix, device=device),
                                         [torch.tensor(c, device=device) for c in choices],
                                         step_index_mode=getattr(task.objective, "step_index_mode", "per_step"))
            picks = {"mean energy": int(scores.mean_energy.argmin())}
        elif is_ebt:
            picks = {"mean log-likelihood after thinking": int(_ebt_thinking_scores(task, context, choices, steps,
                                                                                   device).argmax())}
        else:
            log_probs = _baseline_log_probs(model, context, choices, device)
            lengths = torch.tensor([len(c) for c in choices], device=device)
            picks = {"mean log-likelihood": int((log_probs.sum(1) / lengths).argmax()),
                     "total log-likelihood": int(log_probs.sum(1).argmax())}
        for name, pick in picks.items():
            results.setdefault(name, []).append(pick == example["answer"])
        if advance is not None:
            advance(1)
    return {name: dict(zip(("accuracy", "stderr"), accuracy(values)), examples=len(values))
            for name, values in results.items()}


def _ebt_thinking_scores(task, context: list[int], choices: list[list[int]], steps: Optional[int], device) -> Tensor:
    """Mean log-likelihood of each choice's tokens under the EBT's predictions after thinking (teacher-forced)."""
    model = task.model
    rows, mask, prefix = _pack(model, context, choices, device)
    count = steps or resolve_num_steps(task.objective.num_steps, 0, training=False)
    config = thinking_config(task.objective, num_steps=count)
    verified = think_tokens(model, rows[:, :-1], config, initial_state=task.objective.initial_state,
                            generator=torch.Generator(device=device).manual_seed(0),
                            step_index_mode=getattr(task.objective, "step_index_mode", "per_step"))
    log_p = torch.log_softmax(verified.state[:, prefix - 1:].float(), dim=-1)  # the state: logits
    picked = log_p.gather(-1, rows[:, prefix:, None]).squeeze(-1) * mask
    return picked.sum(1) / mask.sum(1)


def run_evaluate_task(args, console) -> int:
    """``energyflow evaluate-task RUN_DIR --task lambada|choice --data FILE.jsonl [--baseline RUN_DIR]``."""
    from rich.table import Table

    from energyflow.monitor import progress_bar
    from energyflow.runs import load_run

    examples = read_examples(args.data, args.task)
    runs = [("model", args.run_dir)] + ([("baseline", args.baseline)] if args.baseline else [])
    table = Table(title=f"{args.task}: {Path(args.data).name} ({len(examples)} examples)")
    for column in ("run", "model", "scored by", "accuracy", "± s.e."):
        table.add_column(column, justify="left" if column in ("run", "model", "scored by") else "right")
    report = {}
    for role, run_dir in runs:
        result, _, step = load_run(run_dir, device=args.device)
        for note in result.notes:
            console.print(f"[yellow]{note}[/]")
        task = result.task.eval()
        if not isinstance(task.model, (TextEBM, TransformerPP)):
            raise ValueError(f"{run_dir} is not a text EBT or Transformer++ run ({type(task.model).__name__}); "
                             "evaluate-task scores text models")
        codec = run_codec(result)
        kind = "EBT" if isinstance(task.model, TextEBM) else "Transformer++"
        with progress_bar(f"{args.task} {role}", len(examples), console=console,
                          enabled=not args.no_progress) as advance:
            if args.task == "lambada":
                scores = {"greedy exact match" + (" after thinking" if kind == "EBT" else ""):
                          evaluate_lambada(task, examples, codec, steps=args.steps, device=result.device,
                                           advance=advance)}
            else:
                scores = evaluate_choice(task, examples, codec, score=args.score, steps=args.steps,
                                         device=result.device, advance=advance)
        for name, value in scores.items():
            table.add_row(f"{Path(run_dir).name} (step {step})", kind, name, f"{value['accuracy']:.3f}",
                          f"{value['stderr']:.3f}")
        report[str(run_dir)] = {"model": kind, "encoding": codec.name, "scores": scores}
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "data": args.data, "runs": report}, indent=2))
        console.print(f"[dim]wrote {args.json}[/]")
    return 0
