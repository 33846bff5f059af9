"""Built-in models. They know nothing of LoRA: the runtime patches them from outside."""

from lora_runtime.rl.models.vla import MODEL_TYPE, TinyVLA, build_tiny_vla, init_weights

__all__ = ["MODEL_TYPE", "TinyVLA", "build_tiny_vla", "init_weights"]
