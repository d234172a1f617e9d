"""The model families the runtime supports, and what it needs to know about each one's layers."""

from __future__ import annotations

from torch import nn

from .schedule import ModelInfo, ScheduleError, config_fingerprint, show_value

FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3",
}


class UnsupportedModelError(ScheduleError):
    pass


def text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def check_supported(model: nn.Module) -> None:
    model_type = getattr(text_config(model), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model type '{model_type}' is not supported; supported families: {', '.join(FAMILIES.values())}"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UnsupportedModelError("cannot find the decoder layers (expected model.model.layers)")
    return layers


def layer_plan(model_or_config) -> list[tuple[bool, int | None]]:
    """Per layer: may it be compressed, and its sliding window (None for full attention).

    Layers that the model itself declares sliding keep their own window and are never compressed; a model whose
    every layer slides (Mistral) has no such declaration and is compressed under its window.
    """
    cfg = text_config(model_or_config)
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if types is None:
        return [(True, window)] * cfg.num_hidden_layers
    return [(t != "sliding_attention", window if t == "sliding_attention" else None) for t in types]


def model_info(model: nn.Module, name: str | None = None) -> ModelInfo:
    cfg = text_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return ModelInfo(
        name=name or getattr(cfg, "_name_or_path", "") or cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        fingerprint=config_fingerprint(cfg),
        compressible=[c for c, _ in layer_plan(cfg)],
    )


def check_schedule_fits(model: nn.Module, schedule) -> None:
    """One-line errors for a schedule made for another model."""
    cfg = text_config(model)
    n = cfg.num_hidden_layers
    if schedule.num_layers != n:
        raise ScheduleError(
            f"schedule has {schedule.num_layers} layer ratios but the model has {n} layers; "
            "use a schedule calibrated for this model (calibrate run --model ...)"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if schedule.head_ratios is not None and len(schedule.head_ratios[0]) != kv_heads:
        raise ScheduleError(
            f"schedule has {len(schedule.head_ratios[0])} head shares per layer but the model has {kv_heads} KV "
            "heads; use a schedule calibrated for this model (calibrate run --model ...)"
        )
    m = schedule.model
    if m is not None and m.fingerprint != config_fingerprint(cfg):
        raise ScheduleError(
            f"schedule was calibrated for {show_value(m.name)} (fingerprint {show_value(m.fingerprint)}), not for this "
            f"model (fingerprint '{config_fingerprint(cfg)}'); calibrate one for it with calibrate run --model ..."
        )
