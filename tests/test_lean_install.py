"""The base install is the runtime: it needs only torch, transformers and safetensors (and what they need)."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME_DEPS = {"torch", "transformers", "safetensors"}
# what the [calibrate] extra brings and the runtime must never need
CALIBRATION_ONLY = ["calibrate", "experiments", "optuna", "datasets", "scipy", "accelerate", "gguf", "matplotlib",
                    "psutil", "hypothesis"]  # fmt: skip

SERVE = f"""
import sys
BLOCKED = {CALIBRATION_ONLY!r}
for name in BLOCKED:  # None in sys.modules: import fails, importlib.util.find_spec says "not installed"
    sys.modules[name] = None

import torch
from transformers import LlamaConfig, LlamaForCausalLM
import runtime

# the shipped SmolLM2 schedule on a random model of SmolLM2's architecture (a small MLP: speed only)
schedule = runtime.load_schedule("schedules/smollm2-135m-instruct_b0.3.json")
torch.manual_seed(0)
config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=64, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                     tie_word_embeddings=True)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(3, 49152, (2, 200))
with runtime.apply(model, schedule):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                         return_dict_in_generate=True)
assert out.sequences.shape == (2, 204), out.sequences.shape
assert 0 < runtime.kv_bytes(runtime.cache_of(out))
leaked = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print("served", out.sequences.shape[1] - 200, "tokens")
"""


def test_base_requirements_are_the_runtimes_only():
    """`pip show`'s requirements: nothing but torch, transformers, safetensors outside the extras."""
    requires = importlib.metadata.requires("pyramidinfer") or []
    base = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r}
    assert base == RUNTIME_DEPS
    extras = importlib.metadata.metadata("pyramidinfer").get_all("Provides-Extra")
    assert {"calibrate", "test", "postgres"} <= set(extras)
    # the CLI names the extra for exactly the modules the extra brings (each package imports as its own name)
    from calibrate.cli import EXTRA_MODULES

    extra = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requires if 'extra == "calibrate"' in r}
    assert extra == EXTRA_MODULES


def test_runtime_applies_a_shipped_schedule_without_the_calibration_stack():
    """Every module only the [calibrate] extra brings is made unimportable; the runtime still serves."""
    run = subprocess.run([sys.executable, "-c", SERVE], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "served 4 tokens" in run.stdout


def test_calibrate_without_its_extra_names_the_extra(tmp_path):
    """The `calibrate` command is installed by the base install too: without the extra it says what to install."""
    db = tmp_path / "study.db"
    db.write_bytes(b"")  # exists, so the command gets as far as opening it with Optuna
    code = (
        "import sys\n"
        "for name in ('optuna', 'gguf', 'accelerate', 'datasets', 'scipy'):\n"
        "    sys.modules[name] = None\n"
        "from calibrate.cli import main\n"
        f"sys.exit(main(['export', '--storage', 'sqlite:///{db}', '--study-name', 'x']))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "calibrate: error: this command needs the calibration extra (no module 'optuna'); "
        "install it with: pip install 'pyramidinfer[calibrate]'"
    ]
