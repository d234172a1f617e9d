"""Text for calibration and benchmarks: local files, folders, JSONL, or `datasets` names, cut into token windows.

Local files are read through `datasets` fully offline. Windows are cut from one token stream per source;
calibration and validation windows come from disjoint parts of it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrateError

TEXT_SUFFIXES = {".txt", ".md", ".text", ".raw", ""}
JSON_SUFFIXES = {".jsonl", ".json"}
TASK_BATCH = 8  # retrieval tasks per scoring batch (`CalibrationSet.evaluators`)


class DataError(CalibrateError):
    pass


def files_in(folder: Path) -> list[Path]:
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and (p.suffix.lower() in TEXT_SUFFIXES | JSON_SUFFIXES) and not p.name.startswith(".")
    )
    files = [p for p in files if p.suffix.lower() in JSON_SUFFIXES or p.suffix.lower() in {".txt", ".md", ".raw"}]
    if not files:
        raise DataError(f"folder '{folder}' holds no .txt, .md, .raw or .jsonl files; point --data at text files")
    return files


def strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg licence header and footer, which are the same in every book."""
    start = re.search(r"\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*?\*\*\*", text)
    end = re.search(r"\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG", text)
    if start:
        text = text[start.end() : end.start() if end else None]
    return text.strip()


def _read_local(path: Path, text_field: str) -> list[str]:
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    datasets.disable_progress_bars()
    suffix = path.suffix.lower()
    try:
        if suffix in JSON_SUFFIXES:
            ds = datasets.load_dataset("json", data_files=str(path), split="train")
            if text_field not in ds.column_names:
                raise DataError(
                    f"'{path}' has no '{text_field}' field (fields: {', '.join(ds.column_names)}); "
                    "pass --text-field NAME"
                )
            return [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
        ds = datasets.load_dataset("text", data_files=str(path), sample_by="document", split="train")
        return [strip_gutenberg(t) for t in ds["text"] if t.strip()]
    except DataError:
        raise
    except Exception as e:  # datasets wraps decode and parse errors in many types
        msg = " ".join(str(e).split())[:200]
        raise DataError(f"cannot read '{path}': {msg}; check that it is UTF-8 text or JSONL") from None


def load_texts(specs: list[str | os.PathLike], text_field: str = "text") -> list[str]:
    """Documents from files, folders, JSONL files, or (on a connected machine) `datasets` names."""
    texts: list[str] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            for f in files_in(path):
                texts += _read_local(f, text_field)
        elif path.is_file():
            if not os.access(path, os.R_OK):
                raise DataError(f"cannot read '{path}': permission denied")
            texts += _read_local(path, text_field)
        elif os.sep in str(spec) or path.suffix:
            raise DataError(f"data path '{spec}' does not exist; check the path")
        else:
            texts += _read_hub(str(spec), text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"no text found in {', '.join(map(str, specs))}; give files with text in them")
    return texts


def _read_hub(name: str, text_field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataError(
            f"'{name}' is neither a local path nor a loadable dataset ({' '.join(str(e).split())[:120]}); "
            "give a text file, folder or JSONL file"
        ) from None
    if text_field not in ds.column_names:
        raise DataError(f"dataset '{name}' has no '{text_field}' field; pass --text-field NAME")
    return [t for t in ds[text_field] if isinstance(t, str)]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """One long stream of token ids: documents joined by a blank line."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t + "\n\n", add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(stream: torch.Tensor, length: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` non-overlapping windows of `length` tokens, spread evenly over the stream (seeded offset)."""
    slots = stream.numel() // length
    if slots < 1:
        raise DataError(
            f"the data has {stream.numel()} tokens, fewer than one window of {length}; give more text or a shorter "
            "--context-length"
        )
    count = min(count, slots)
    g = torch.Generator().manual_seed(seed)
    offset = int(torch.randint(0, stream.numel() - slots * length + 1, (1,), generator=g))
    picks = torch.linspace(0, slots - 1, count).round().long().tolist()
    return torch.stack([stream[offset + p * length : offset + (p + 1) * length] for p in picks])


def calibration_split(
    stream: torch.Tensor, length: int, n_calib: int, n_valid: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows from the first part of the stream, validation windows from the rest (disjoint)."""
    need = (n_calib + n_valid) * length
    if stream.numel() < need:
        if stream.numel() < 2 * length:
            raise DataError(
                f"the data has {stream.numel()} tokens; calibration needs at least {2 * length} "
                f"(two windows of {length}); give more text or a shorter --context-length"
            )
        n_calib = n_valid = max(1, stream.numel() // length // 2)
    cut = stream.numel() * n_calib // (n_calib + n_valid)
    return cut_windows(stream[:cut], length, n_calib, seed), cut_windows(stream[cut:], length, n_valid, seed + 1)


def calibration_split_each(
    streams: list[torch.Tensor], length: int, n_calib: int, n_valid: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`calibration_split` within each source, windows shared out over the sources (each gets at least one).

    Splitting the joined stream would put the first sources in calibration and the last ones in validation. With
    one source this is exactly `calibration_split` (same counts, same seed).
    """
    k = len(streams)
    calib, valid = [], []
    for i, stream in enumerate(streams):
        c = max(1, n_calib // k + (i < n_calib % k))
        v = max(1, n_valid // k + (i < n_valid % k))
        a, b = calibration_split(stream, length, c, v, seed=seed + i)
        calib.append(a)
        valid.append(b)
    return torch.cat(calib), torch.cat(valid)


def held_out(specs: list[str | os.PathLike], seen: list[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """The files of `specs` that are not among the files of `seen` (e.g. a schedule's calibration sources).

    Returns (kept, excluded), so that an evaluation can say which files it left out and why.
    """

    def files(spec) -> list[Path]:
        path = Path(spec)
        return files_in(path) if path.is_dir() else [path] if path.is_file() else []

    used = {f.resolve() for spec in seen for f in files(spec)}
    candidates = [f for spec in specs for f in files(spec)]
    return [f for f in candidates if f.resolve() not in used], [f for f in candidates if f.resolve() in used]


class CalibrationSet:
    """Calibration and validation examples cut from the user's text, plus generated retrieval tasks."""

    def __init__(self, tokenizer, settings):
        from . import tasks

        s = settings
        if s.data:  # one stream per source, so that every source is in both the calibration and validation sets
            streams = [token_stream(tokenizer, load_texts([d], s.text_field)) for d in s.data]
            self.source = list(s.data)
        else:
            streams = [token_stream(tokenizer, [tasks.filler_text(12000, seed=s.seed)])]
            self.source = ["generated filler"]
        stream = torch.cat(streams)
        length = s.context_length + s.continuation
        calib, valid = calibration_split_each(streams, length, s.calib_windows, s.valid_windows, s.seed)
        self.calib_text = tasks.text_examples(calib, s.context_length)
        if s.profile_continuation is not None:  # the same windows, scored on fewer tokens
            self.calib_text = tasks.cut_continuations(self.calib_text, s.profile_continuation)
        self.valid_text = tasks.text_examples(valid, s.context_length)
        self.calib_tasks = tasks.make_tasks(tokenizer, s.calib_tasks, s.context_length, s.task_continuation, s.seed)
        self.valid_tasks = tasks.make_tasks(
            tokenizer, s.valid_tasks, s.context_length, s.task_continuation, s.seed + 7919
        )
        self.tokens = int(stream.numel())
        self.digest = hashlib.sha256(stream.numpy().tobytes()).hexdigest()[:12]

    def evaluators(self, model, split: str, sinks: int, progress=None):
        """(text, tasks) `Evaluator`s of the "calibration" (profile) or "validation" (search) examples; tasks is
        None where there are none. A query window of 64 covers every recent window a trial may pick."""
        from .scoring import Evaluator

        text, tasks = {
            "calibration": (self.calib_text, self.calib_tasks),
            "validation": (self.valid_text, self.valid_tasks),
        }[split]
        text_ev = Evaluator(model, text, query_window=64, sinks=sinks, progress=progress)
        # a task feeds a few dozen tokens and scores a few, so even 8 rows' activations stay small: the default 6 in
        # one batch are no slower than in 4 + 2 (experiments.unit_cost, docs/method.md), the same curves to float
        # rounding
        task_ev = Evaluator(model, tasks, query_window=64, sinks=sinks, batch_size=TASK_BATCH) if tasks else None
        return text_ev, task_ev

    def describe(self) -> dict[str, Any]:
        return {
            "sources": self.source,
            "tokens": self.tokens,
            "sha256": self.digest,
            "calibration": {"text_windows": len(self.calib_text), "tasks": len(self.calib_tasks)},
            "validation": {"text_windows": len(self.valid_text), "tasks": len(self.valid_tasks)},
        }
