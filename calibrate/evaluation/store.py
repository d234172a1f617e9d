"""results.json: the resumable store of per-sample records, with their statistics per (task, group, config)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runtime.schedule import write_atomic

from .. import metrics
from .config import Config, EvalError

STATS = {  # per task: per-sample field -> scale of its statistics (100: percent)
    "lm": {"kl": 1.0, "nll": 1.0},
    "longbench": {"score": 100.0, "gold_nll": 1.0},
    "needle": {"correct": 100.0},
}


def aggregate(task: str, samples: list[dict[str, Any]], seed: int = 0) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    for name, scale in STATS[task].items():
        values = [s[name] * scale for s in samples if s.get(name) is not None and not _isnan(s[name])]
        stats[name] = metrics.bootstrap_ci(values, seed=seed).to_dict()
    if task == "lm":
        nll = stats["nll"]
        stats["ppl"] = {k: (math.exp(v) if k != "n" else v) for k, v in nll.items()}
    kv = [s["kv_fraction"] for s in samples if s.get("kv_fraction") is not None]
    return {"stats": stats, "kv_fraction": sum(kv) / len(kv) if kv else None}


def _isnan(x: Any) -> bool:
    return isinstance(x, float) and math.isnan(x)


class Store:
    """results.json: one record per (task, group, config) holding its per-sample results and their statistics.

    Written atomically after every change; samples already present are never recomputed.
    """

    def __init__(self, path: Path, meta: dict[str, Any]):
        self.path = Path(path)
        self.records: dict[str, dict[str, Any]] = {}
        self.meta = dict(meta)
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise EvalError(f"'{self.path}' is not valid JSON; remove it or use another --out-dir") from None
            self._check(old.get("meta", {}))
            merged = dict(old.get("meta", {}).get("task_settings", {}))
            merged.update(self.meta.get("task_settings", {}))
            self.meta["task_settings"] = merged
            for r in old.get("records", []):
                self.records[r["key"]] = r

    def _check(self, old: dict[str, Any]) -> None:
        new = self.meta
        if old.get("model") and old.get("model") != new.get("model"):
            raise EvalError(
                f"'{self.path}' holds results for model {old['model']}, not {new['model']}; use another --out-dir"
            )
        if old.get("dtype") and old.get("dtype") != new.get("dtype"):
            raise EvalError(f"'{self.path}' holds {old['dtype']} results, not {new['dtype']}; use another --out-dir")
        for task, settings in new.get("task_settings", {}).items():
            before = old.get("task_settings", {}).get(task)
            if before is not None and before != settings:
                diff = next(k for k in settings if before.get(k) != settings.get(k))
                raise EvalError(
                    f"'{self.path}' holds {task} results made with {diff}={before.get(diff)!r}, not "
                    f"{settings.get(diff)!r}; use the same options or another --out-dir"
                )

    @staticmethod
    def key(task: str, group: str, config: Config) -> str:
        return f"{task}|{group}|{config.key}"

    def forget_stale(self, configs: Sequence[Config]) -> None:
        """Drop the stored records of these columns that were made from another schedule (same label, changed
        file or borrowed settings): they are computed again."""
        for key, r in list(self.records.items()):
            config = next((c for c in configs if key.endswith("|" + c.key)), None)  # task|group|column
            if config is not None and r.get("schedule_digest", "") != config.digest:
                del self.records[key]

    def has(self, task: str, group: str, config: Config, sample_id: str) -> bool:
        r = self.records.get(self.key(task, group, config))
        return r is not None and any(s["id"] == sample_id for s in r["samples"])

    def add(self, task: str, group: str, config: Config, fields: dict[str, Any], samples: list[dict[str, Any]],
            expected: Sequence[str]) -> dict[str, Any]:  # fmt: skip
        key = self.key(task, group, config)
        r = self.records.get(key)
        if r is None:
            r = {"key": key, "task": task, "group": group, "method": config.method, "budget": config.budget,
                 "mode": config.mode, "schedule_file": config.path, "schedule_digest": config.digest, **fields,
                 "samples": []}  # fmt: skip
            self.records[key] = r
        have = {s["id"] for s in r["samples"]}
        r["samples"] += [s for s in samples if s["id"] not in have]
        r.update(aggregate(task, r["samples"]))
        r["complete"] = set(expected) <= {s["id"] for s in r["samples"]}
        return r

    def save(self) -> Path:
        body = {"meta": self.meta, "records": list(self.records.values())}
        return write_atomic(self.path, json.dumps(body, indent=1, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, (set, tuple)):
        return list(x)
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")
