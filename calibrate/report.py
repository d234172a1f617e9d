"""Summaries and markdown tables of `calibrate eval` results (results.json), one row per method, budget and mode.

from calibrate import report
records = report.load("runs/eval_x/results.json")
rows = report.summarize(records)
print(report.markdown(rows, records))
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import metrics

SCORE_COLUMNS = ("longbench_score", "needle_in-prompt", "needle_after-compression")  # 0-100, averaged in "avg"


def load(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())["records"]


def _values(record: dict[str, Any], field: str, scale: float) -> list[float]:
    out = []
    for s in record["samples"]:
        v = s.get(field)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out.append(float(v) * scale)
    return out


def _config_key(r: dict[str, Any]) -> tuple:
    return (r["method"], r["budget"], r["mode"], r.get("schedule_file"))


def _order(key: tuple) -> tuple:
    method, budget, mode, path = key
    rank = {"full": 0, "uniform": 1, "pyramidkv": 2, "pyramidinfer": 3, "streamingllm": 4, "random": 5}
    return (method != "full", mode, budget, rank.get(method, 9 if path is None else 6), method)


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config: LM KL/PPL, LongBench average (stratified over datasets), needle accuracy per question setting,
    each {mean, ci_low, ci_high, n}; KV fraction (measured) overall and per task; `avg` of the 0-100 scores."""
    by_config: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_config[_config_key(r)].append(r)
    rows = []
    for key in sorted(by_config, key=_order):
        recs = by_config[key]
        method, budget, mode, path = key
        row: dict[str, Any] = {"method": method, "budget": budget, "mode": mode, "schedule_file": path}
        kv_task: dict[str, list[float]] = defaultdict(list)
        for r in recs:
            kv_task[r["task"]] += _values(r, "kv_fraction", 1.0)
        row["kv_by_task"] = {t: sum(v) / len(v) for t, v in kv_task.items() if v}
        every = [x for v in kv_task.values() for x in v]
        row["kv_fraction"] = sum(every) / len(every) if every else None
        row["complete"] = all(r.get("complete", False) for r in recs)
        lm = [r for r in recs if r["task"] == "lm"]
        if lm:
            row["lm_kl"] = metrics.bootstrap_ci(_values(lm[0], "kl", 1.0)).to_dict()
            nll = metrics.bootstrap_ci(_values(lm[0], "nll", 1.0)).to_dict()
            row["lm_ppl"] = {k: (math.exp(v) if k != "n" else v) for k, v in nll.items()}
        lb = sorted((r for r in recs if r["task"] == "longbench"), key=lambda r: r["group"])
        if lb:
            row["longbench"] = {r["group"]: r["stats"]["score"] for r in lb}
            row["longbench_score"] = metrics.stratified_ci([_values(r, "score", 100.0) for r in lb]).to_dict()
            row["longbench_gold_nll"] = metrics.stratified_ci([_values(r, "gold_nll", 1.0) for r in lb]).to_dict()
        for question in ("in-prompt", "after-compression"):
            nd = [r for r in recs if r["task"] == "needle" and r.get("question") == question]
            if nd:
                row[f"needle_{question}"] = metrics.stratified_ci([_values(r, "correct", 100.0) for r in nd]).to_dict()
                by_len: dict[int, list[float]] = defaultdict(list)
                for r in nd:
                    by_len[r["length"]] += _values(r, "correct", 100.0)
                row[f"needle_{question}_by_length"] = {n: sum(v) / len(v) for n, v in sorted(by_len.items()) if v}
        scores = [row[c]["mean"] for c in SCORE_COLUMNS if c in row and math.isfinite(row[c]["mean"])]
        row["avg"] = sum(scores) / len(scores) if scores else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------- markdown


def _cell(stat: dict[str, Any] | None, digits: int) -> str:
    if not stat or not isinstance(stat.get("mean"), (int, float)) or not math.isfinite(stat["mean"]):
        return "-"
    half = max(stat["mean"] - stat["ci_low"], stat["ci_high"] - stat["mean"])
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ±{half:.{digits}f}" if half > 0 else "")


def _label(row: dict[str, Any]) -> list[str]:
    star = "" if row.get("complete", True) else " *"
    budget = "1" if row["method"] == "full" else f"{row['budget']:g}"
    kv = row.get("kv_fraction")
    return [row["method"] + star, budget, row["mode"], "-" if kv is None else f"{kv:.3f}"]


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    columns = [
        ("lm_kl", "WikiText-2 KL ↓", 3),
        ("lm_ppl", "PPL ↓", 2),
        ("longbench_score", "LongBench ↑", 1),
        ("longbench_gold_nll", "gold NLL ↓", 3),
        ("needle_in-prompt", "needle ↑", 0),
        ("needle_after-compression", "needle, question after ↑", 0),
    ]
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    header = ["method", "budget", "mode", "KV"] + [c[1] for c in columns] + ["avg score ↑"]
    body = []
    for r in rows:
        avg = "-" if r.get("avg") is None else f"{r['avg']:.1f}"
        body.append(_label(r) + [_cell(r.get(name), d) for name, _, d in columns] + [avg])
    return _table(header, body)


def longbench_table(rows: Sequence[dict[str, Any]]) -> str | None:
    datasets = sorted({d for r in rows for d in r.get("longbench", {})})
    if not datasets:
        return None
    header = ["method", "budget", "mode", "KV"] + datasets + ["average"]
    body = []
    for r in rows:
        if "longbench" not in r:
            continue
        cells = [_cell(r["longbench"].get(d), 1) if d in r["longbench"] else "-" for d in datasets]
        body.append(_label(r) + cells + [_cell(r.get("longbench_score"), 1)])
    return _table(header, body)


def needle_table(rows: Sequence[dict[str, Any]], question: str) -> str | None:
    field = f"needle_{question}_by_length"
    lengths = sorted({n for r in rows for n in r.get(field, {})})
    if not lengths:
        return None
    header = ["method", "budget", "mode", "KV"] + [f"{n} tokens" for n in lengths] + ["all"]
    body = []
    for r in rows:
        if field not in r:
            continue
        cells = [f"{r[field][n]:.0f}" if n in r[field] else "-" for n in lengths]
        body.append(_label(r) + cells + [_cell(r.get(f"needle_{question}"), 0)])
    return _table(header, body)


def sample_counts(records: Sequence[dict[str, Any]]) -> str:
    per: dict[str, set[str]] = defaultdict(set)
    groups: dict[str, set[str]] = defaultdict(set)
    for r in records:
        groups[r["task"]].add(r["group"])
        for s in r["samples"]:
            per[r["task"]].add(f"{r['group']}/{s['id']}")
    names = {"lm": "WikiText-2 windows", "longbench": "LongBench-E rows", "needle": "needle prompts"}
    parts = [
        f"{len(per[t])} {names.get(t, t)} ({len(groups[t])} group{'s' if len(groups[t]) != 1 else ''})"
        for t in ("lm", "longbench", "needle")
        if t in per
    ]
    return ", ".join(parts)


def markdown(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]], command: str = "") -> str:
    """The results as markdown: the command, a summary table, LongBench per dataset and needle per length."""
    out = []
    if command:
        out += ["```", command, "```", ""]
    out += ["### Quality against KV memory", "", summary_table(rows), ""]
    notes = [
        "KV: mean fraction of the full KV cache kept after prefill (measured, compressible layers).",
        "Cells: mean ±half-width of the 95% bootstrap CI over samples (LongBench and needle: stratified over "
        "datasets / cells).",
        "avg score: mean of the 0-100 columns (LongBench average and needle exact match).",
        f"Samples: {sample_counts(records)}.",
    ]
    if not all(r.get("complete", True) for r in rows):
        notes.append("* incomplete: some samples of this row are still missing (rerun to resume).")
    out += ["- " + n for n in notes] + [""]
    lb = longbench_table(rows)
    if lb:
        out += ["### LongBench-E score per dataset (0-100)", "", lb, ""]
    for q in ("in-prompt", "after-compression"):
        nt = needle_table(rows, q)
        if nt:
            title = "question in the compressed prompt" if q == "in-prompt" else "question fed after compression"
            out += [f"### Needle exact match % per prompt length ({title})", "", nt, ""]
    return "\n".join(out)
