"""The notebooks run top to bottom without a model: on the artifacts in the repository (when there are any), on small
synthetic artifacts built here (a Profile, an Optuna study, eval and bench JSON), and with every artifact missing
(they must then say what is missing instead of failing). A failing cell fails the test (nbclient raises).

The kernel runs this interpreter (notebooks/execute.py writes a kernel spec for it), with the Agg backend; the
notebooks' parameter cells read the artifact paths from PYRAMIDINFER_NB_SCHEDULE / _STUDY / _EVAL / _BENCH.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

pytest.importorskip("nbclient")
pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

from calibrate import views  # noqa: E402
from calibrate.profiling import Profile  # noqa: E402
from runtime.schedule import load_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
ENV_VARS = ("PYRAMIDINFER_NB_SCHEDULE", "PYRAMIDINFER_NB_STUDY", "PYRAMIDINFER_NB_STUDY_NAME")
ENV_VARS += ("PYRAMIDINFER_NB_EVAL", "PYRAMIDINFER_NB_BENCH")


def _executor():
    spec = importlib.util.spec_from_file_location("notebooks_execute", NOTEBOOKS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name: str, env: dict[str, str]) -> tuple[str, int]:
    """Execute notebooks/<name>.ipynb with these variables (the others unset); return its text output and the
    number of PNG images it displayed."""
    nb = _executor().execute(NOTEBOOKS / f"{name}.ipynb", env={**dict.fromkeys(ENV_VARS), **env}, timeout=120)
    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text.append(out["text"])
            data = out.get("data", {})
            images += "image/png" in data
            text.append(data.get("text/markdown", ""))
    return "".join(text), images


# ---------------------------------------------------------------- synthetic artifacts (no model)


def make_profile(stem: Path, num_layers: int, compressible: list[bool]):
    import torch

    grid = [0.02, 0.05, 0.1, 0.25, 0.5]
    windows = [8, 16, 32]
    recall = torch.tensor([[g ** (0.25 + 0.5 * layer / num_layers) for g in grid] for layer in range(num_layers)])
    sens = torch.tensor([[(1 - g) * 10 ** -(1 + (layer * 7) % 4) for g in grid] for layer in range(num_layers)])
    parts = torch.stack([sens, sens.flip(0) * 30])  # text and tasks at different scales, as measured
    head_parts = torch.stack([parts, parts * 0.1], dim=2)  # [K, L, 2, G]: two KV heads, the second matters less
    prof = Profile(
        grid=grid,
        windows=windows,
        recall=recall,
        overlap=recall * 0.8,
        window_recall=recall[:, 3:4].repeat(1, len(windows)),
        sensitivity=parts.mean(0),
        compressible=compressible,
        parts=parts,
        part_names=["text", "retrieval"],
        head_parts=head_parts,
        meta={"sinks": 4, "window": 16, "synthetic": True},
    )
    prof.save(stem)
    return prof


def make_schedule(path: Path, budget: float, trial: int, prof, compressible: list[bool]):
    from runtime.reference import rescale_to_budget
    from runtime.schedule import ModelInfo, Schedule

    n = len(compressible)
    info = ModelInfo(name="tiny", num_layers=n, num_kv_heads=2, head_dim=8, fingerprint="0", compressible=compressible)
    base = Schedule(ratios=[1.0 / (1 + layer % 3) for layer in range(n)], window=16, sinks=4, model=info)
    s = rescale_to_budget(base, budget, 256)
    baselines = {
        kind: {"objective": 0.5 + i / 10, "kl": 0.2 + i / 10, "accuracy": 0.5, "kv_fraction": budget}
        for i, kind in enumerate(("uniform", "pyramidkv", "pyramidinfer"))
    }
    provenance = {
        "command": "calibrate run (synthetic, tests/test_notebooks.py)",
        "score": {"objective": 0.1, "kl": 0.1, "task_kl": 0.12, "accuracy": 1.0, "kv_fraction": budget},
        "baselines": baselines,
        "margin_vs_best_baseline": 0.4,
        "additivity": {"sum_of_single_layer_kl": prof.predicted_kl(s.ratios), "measured_kl": 0.11},
        "trial": trial,
        "trials": 14,
        "params": {"shape": "sensitivity"},
    }
    s = s.with_ratios(s.ratios, name=path.stem, provenance=provenance, budget=budget)
    # uneven shares per KV head around each layer's ratio (same mean), as a per-head calibration writes
    s.head_ratios = [[r - min(r, 1 - r) / 2, r + min(r, 1 - r) / 2] for r in s.ratios]
    s.save(path)
    return s


def make_study(db: Path, budgets: list[float]) -> dict[float, int]:
    """A two-objective study shaped like `calibrate run --budgets`: enqueued baselines, then sampled trials;
    returns the best trial number per budget."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=f"sqlite:///{db}",
        study_name="tiny_b0.2-0.3_synthetic",
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.NSGAIISampler(seed=0, population_size=4),
    )
    for key, value in (("budgets", budgets), ("trials", 14), ("out", str(db.with_name("tiny.json")))):
        study.set_user_attr(key, value)
    for b in budgets:
        for shape in ("uniform", "pyramidkv"):
            study.enqueue_trial({"budget": b, "shape": shape, "window": 16, "pooling": "max", "per_head": True})
    rng = random.Random(0)

    def objective(trial):
        b = trial.suggest_categorical("budget", budgets)
        shape = trial.suggest_categorical("shape", ["uniform", "pyramidkv", "sensitivity"])
        window = trial.suggest_categorical("window", [8, 16, 32])
        pooling = trial.suggest_categorical("pooling", ["none", "avg", "max"])
        trial.suggest_categorical("per_head", [True, False])
        value = (0.05 if shape == "sensitivity" else 0.4) * (1.2 - b) * (1 + window / 64) * (1 + 0.1 * rng.random())
        value *= 1.3 if pooling == "none" else 1.0
        kv = b + rng.uniform(-0.002, 0.002)
        for k, v in (("kl", value), ("accuracy", max(0.0, 1 - value)), ("kv_fraction", kv), ("objective", value)):
            trial.set_user_attr(k, v)
        return kv, value

    study.optimize(objective, n_trials=14)
    done = views.complete_trials(study)
    return {b: min((t for t in done if t.params["budget"] == b), key=views.objective_of).number for b in budgets}


def _stat(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    return {"mean": mean, "ci_low": min(values), "ci_high": max(values), "n": len(values)}


def make_eval(path: Path) -> None:
    """results.json in the record format of `calibrate eval`: lm, longbench and needle records."""
    configs = [("full", 1.0), ("uniform", 0.3), ("pyramidkv", 0.3), ("uniform", 0.5), ("pyramidkv", 0.5)]
    records = []
    for method, budget in configs:
        kv = budget if method != "full" else 1.0
        loss = 0.0 if method == "full" else (0.3 if method == "uniform" else 0.2) * (1 - budget)
        common = {"method": method, "budget": budget, "mode": "evict", "schedule_file": None, "complete": True}
        lm = [
            {"id": f"w{i}", "kl": loss * (1 + i / 4), "nll": 2.5 + loss + i / 10, "kv_fraction": kv} for i in range(3)
        ]
        records.append(
            {
                **common,
                "key": f"lm|{method}@{budget}",
                "task": "lm",
                "group": "wikitext2",
                "dataset": "wikitext2",
                "samples": lm,
                "stats": {"kl": _stat([s["kl"] for s in lm]), "nll": _stat([s["nll"] for s in lm])},
                "kv_fraction": kv,
            }  # fmt: skip
        )
        lb = [{"id": f"q{i}", "score": max(0.0, 0.6 - loss - i / 10), "gold_nll": 2 + loss, "kv_fraction": kv}
              for i in range(2)]  # fmt: skip
        records.append(
            {
                **common,
                "key": f"longbench|hotpotqa|{method}@{budget}",
                "task": "longbench",
                "group": "hotpotqa",
                "dataset": "hotpotqa",
                "metric": "qa_f1",
                "samples": lb,
                "stats": {
                    "score": _stat([100 * s["score"] for s in lb]),
                    "gold_nll": _stat([s["gold_nll"] for s in lb]),
                },
                "kv_fraction": kv,
            }  # fmt: skip
        )
        for length in (256, 512):
            for depth in (0, 50, 100):
                ok = [float(method == "full" or (depth + length / 8 + i * 40) % 100 > 100 * loss) for i in range(3)]
                samples = [{"id": f"v{i}", "correct": c, "kv_fraction": kv, "prompt_tokens": length}
                           for i, c in enumerate(ok)]  # fmt: skip
                records.append(
                    {
                        **common,
                        "key": f"needle|in-prompt|{length}|{depth}|{method}@{budget}",
                        "task": "needle",
                        "group": f"in-prompt|{length}|{depth}",
                        "dataset": "gutenberg",
                        "question": "in-prompt",
                        "length": length,
                        "depth": depth,
                        "samples": samples,
                        "stats": {"correct": _stat([100 * c for c in ok])},
                        "kv_fraction": kv,
                    }  # fmt: skip
                )
    meta = {"model": "tiny", "dtype": "float32", "command": "calibrate eval (synthetic)", "task_settings": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "records": records}))


def make_bench(path: Path) -> None:
    def stats(scale: float) -> dict[str, float]:
        return {
            "prefill_s": 2.0 * scale,
            "decode_tokens_per_s": 50 / math.sqrt(scale),
            "kv_bytes_prefill": int(2**27 * scale),
            "kv_bytes_end": int(2**27 * scale) + 2**20,
            "kv_bytes_peak": int(2**27 * scale) + 2**20,
            "peak_memory_bytes": int(2**28 * scale),
        }

    stock, ours = stats(1.0), stats(0.3)
    result = {
        "batch": 4,
        "prompt_tokens": 1024,
        "new_tokens": 16,
        "repeats": 1,
        "kv_limit_bytes": stock["kv_bytes_peak"],
        "stock": stock,
        "schedule": ours,
        "largest_batch": {"stock": 4, "schedule": 13},
        "ratios": {k: ours[k] / stock[k] for k in stock if k != "kv_bytes_peak"} | {"largest_batch": 13 / 4},
        "model": "tiny",
        "dtype": "float32",
        "device": "cpu",
        "schedule_name": "synthetic",
        "prefill_mode": "drop",
        "kv_fraction": 0.3,
    }
    path.write_text(json.dumps(result))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("notebook_artifacts")
    compressible = [True] * 8
    compressible[3] = False  # a sliding-window layer, as in Gemma 3
    prof = make_profile(tmp / "tiny", 8, compressible)  # the run's profile: tiny_b0.3.json falls back to it
    best = make_study(tmp / "tiny.optuna.db", [0.2, 0.3])
    for b, trial in best.items():
        make_schedule(tmp / f"tiny_b{b:g}.json", b, trial, prof, compressible)
    make_eval(tmp / "eval" / "results.json")
    make_bench(tmp / "bench_tiny.json")
    return {
        "PYRAMIDINFER_NB_SCHEDULE": str(tmp / "tiny_b0.3.json"),
        "PYRAMIDINFER_NB_STUDY": str(tmp / "tiny.optuna.db"),
        "PYRAMIDINFER_NB_EVAL": str(tmp / "eval"),
        "PYRAMIDINFER_NB_BENCH": str(tmp / "bench_tiny.json"),
    }


# ---------------------------------------------------------------- tests


def test_inspect_schedule_synthetic(synthetic):
    text, images = run("inspect_schedule", synthetic)
    assert "profile:" in text and "margin vs the best baseline" in text and "additivity:" in text
    assert images == 7  # recall heat map, decay, sensitivity, sensitivity per kind, retention, head shares, kept


def test_sensitivity_by_kind_draws_the_allocation_curves(tmp_path):
    import dataclasses

    compressible = [True, False, True, True, True, True]
    prof = make_profile(tmp_path / "p", len(compressible), compressible)
    fig = views.sensitivity_by_kind(prof, ratio=0.1)
    g = list(prof.grid).index(0.1)
    layers = [i for i, c in enumerate(compressible) if c]
    left, right = fig.axes[:2]
    assert [line.get_label() for line in left.get_lines()] == ["text", "retrieval"]
    assert list(left.get_lines()[1].get_ydata()) == pytest.approx([prof.parts[1, i, g].item() for i in layers])
    black = right.get_lines()[-1]  # what water_fill receives, column g; the kinds' relative curves average to it
    assert list(black.get_xdata()) == layers
    assert list(black.get_ydata()) == pytest.approx([prof.allocation_curves()[i][g] for i in layers])
    relative = [list(line.get_ydata()) for line in right.get_lines()[:2]]
    assert [(a + b) / 2 for a, b in zip(*relative, strict=True)] == pytest.approx(list(black.get_ydata()))
    assert views.sensitivity_by_kind(dataclasses.replace(prof, parts=None)) is None  # profiles from before


def test_head_shares_draws_the_schedule_and_the_head_curves(tmp_path):
    import dataclasses

    compressible = [True, False, True, True, True, True]
    prof = make_profile(tmp_path / "p", len(compressible), compressible)
    s = make_schedule(tmp_path / "s.json", 0.3, 0, prof, compressible)
    fig = views.head_shares(s, prof, ratio=0.1)
    left, right = (ax.get_images()[0].get_array() for ax in fig.axes[:2])
    g = list(prof.grid).index(0.1)
    for layer, c in enumerate(compressible):
        if c:
            assert list(left[layer]) == pytest.approx(s.head_ratios[layer])
            assert list(right[layer]) == pytest.approx(prof.head_parts.mean(0)[layer, :, g].tolist())
        else:  # never compressed: blank, whatever its share says
            assert left.mask[layer].all() or all(math.isnan(v) for v in left[layer])
    per_layer = dataclasses.replace(s, head_ratios=None)
    assert len(views.head_shares(per_layer, prof).axes) == 2  # one heat map and its colour bar
    assert views.head_shares(per_layer, dataclasses.replace(prof, head_parts=None)) is None


def test_search_synthetic(synthetic):
    text, images = run("search", synthetic)
    assert "2 objective(s)" in text and "shipped: tiny_b0.3.json from trial" in text
    assert "unavailable" not in text
    assert images == 3  # history, importances, Pareto front


def test_tradeoff_synthetic(synthetic):
    text, images = run("tradeoff", synthetic)
    assert "(40 records)" in text and "benchmark:" in text
    assert images == 4  # quality vs KV, needle heat maps at 0.3 and 0.5, bench bars


def test_notebooks_say_what_is_missing(tmp_path):
    missing = {var: str(tmp_path / "nothing_here") for var in ENV_VARS if var != "PYRAMIDINFER_NB_STUDY_NAME"}
    for name, expected in (
        ("inspect_schedule", ["No schedule file found"]),
        ("search", ["No study to show"]),
        ("tradeoff", ["No evaluation results", "No benchmark file"]),
    ):
        text, images = run(name, missing)
        assert all(e in text for e in expected) and images == 0, text
    assert not list(tmp_path.iterdir())  # nothing created (Optuna would create an empty SQLite file)


def test_notebooks_on_repository_artifacts():
    """The artifacts the notebooks pick by default (schedules/, else runs/ and docs/) where this checkout has them."""
    schedule, study = views.find_schedule(ROOT, env=None), views.find_study(ROOT, env=None)
    eval_path, bench = views.find_eval(ROOT, env=None), views.find_bench(ROOT, env=None)
    if not any((schedule, study, eval_path, bench)):
        pytest.skip("no schedule, study, eval or bench results in this checkout")
    if schedule:
        text, images = run("inspect_schedule", {})
        assert f"schedule: {views.rel(schedule, ROOT)}" in text
        stem = views.find_profile(schedule)
        # with a profile: recall, decay, sensitivity (+ per kind when the profile has them); retention, tokens
        # kept; head shares when the schedule or the profile has them
        prof = Profile.load(stem) if stem else None
        head = load_schedule(schedule).head_ratios is not None or (prof is not None and prof.head_parts is not None)
        expected = 2 + head + (3 + (prof.parts is not None) if prof else 0)
        assert images == expected, text
    if study:
        text, images = run("search", {})
        assert f"storage: {views.rel(study, ROOT)}" in text and images >= 1, text
    if eval_path or bench:
        text, images = run("tradeoff", {})
        assert images >= bool(eval_path) + len(bench), text
