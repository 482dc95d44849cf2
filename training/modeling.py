"""Model side of the training child: base model + tokenizer, the LoRA config, shared Trainer arguments, saving.

Device and dtype come only from models.device (`pick_placement`, `training_dtype_name`). Torch, transformers and
peft are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.common import CommonConfig
from training.configparse import ConfigError
from training.progress import is_main_process


def quiet_progress_bars() -> None:
    """No tqdm bars from transformers/datasets in log.txt (progress.jsonl is the progress record)."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def load_tokenizer_for_training(cfg: CommonConfig, padding_side: str = "left"):
    from models.loading import load_tokenizer

    return load_tokenizer(cfg.base_model, cfg.model_cache, padding_side=padding_side)


def load_model_for_training(cfg: CommonConfig, kind: str = "causal"):
    """(model, tokenizer) on no particular device (the Trainer places it).

    kind "causal": AutoModelForCausalLM; with `cfg.init_adapter` it is a PeftModel continuing from that adapter
    (trainable), else the plain base (wrap it with `lora_config`). kind "seq_cls": AutoModelForSequenceClassification
    with one output (a reward/value head), pad_token_id set; `init_adapter` is not applied (the caller decides).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    from models.device import training_dtype_name
    from models.loading import resolve_model

    quiet_progress_bars()
    set_seed(cfg.seed)  # the LoRA A init and any head init are then reproducible
    try:
        path = resolve_model(cfg.base_model, cfg.model_cache)
        tokenizer = load_tokenizer_for_training(cfg)
    except OSError as exc:  # a hub id that is not there (or no network): one line, not a traceback
        raise ConfigError(f"base_model: cannot load {cfg.base_model!r}: {str(exc).splitlines()[0]}") from None
    dtype = getattr(torch, training_dtype_name())
    if kind == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    if kind != "causal":
        raise ValueError(f"kind must be 'causal' or 'seq_cls', not {kind!r}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
    return model, tokenizer


def lora_config(cfg: CommonConfig, task_type: str = "CAUSAL_LM", **extra: Any):
    """peft.LoraConfig from the config's lora_* fields (extra kwargs, e.g. modules_to_save, pass through)."""
    from peft import LoraConfig

    names = cfg.lora_target_modules.strip()
    targets: str | list[str] = names if names == "all-linear" else [n.strip() for n in names.split(",") if n.strip()]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type=task_type,
        bias="none",
        **extra,
    )


def trainer_args_kwargs(cfg: CommonConfig) -> dict:
    """TrainingArguments kwargs every method shares; the device/dtype choice comes from models.device."""
    from models.device import pick_placement

    placement = pick_placement()
    on_gpu = placement.device != "cpu"
    return {
        "output_dir": str(Path(cfg.out) / "trainer"),
        "report_to": "none",
        "logging_steps": 1,
        "save_strategy": "no",
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "max_steps": cfg.max_steps,
        "num_train_epochs": cfg.epochs,
        "learning_rate": cfg.learning_rate,
        "warmup_steps": cfg.warmup_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "activation_checkpointing": cfg.gradient_checkpointing,  # the new name of gradient_checkpointing
        "use_cpu": not on_gpu,
        "bf16": on_gpu and placement.dtype_name == "bfloat16",
        "fp16": on_gpu and placement.dtype_name == "float16",
        "disable_tqdm": True,  # progress.jsonl and the echoed lines replace the bar (no \r noise in log.txt)
        "dataloader_num_workers": 0,
    }


def save_adapter(model, tokenizer, out_dir: str | Path) -> Path:
    """The trained adapter (only "default", not TRL's frozen "ref" copy) + tokenizer, loadable with
    `PeftModel.from_pretrained(base, out_dir)`."""
    out_dir = Path(out_dir)
    if not is_main_process():
        return out_dir
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    if hasattr(model, "peft_config") and "default" in model.peft_config:
        model.save_pretrained(out_dir, selected_adapters=["default"])
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
