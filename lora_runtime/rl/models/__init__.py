"""Model families and the built-in models. They know nothing of LoRA: the runtime patches
them from outside.

- `vla.py`: the built-in vision-language-action model (`TinyVLA`);
- `tiny_lm.py`: the built-in language model (a tiny transformers Llama, character tokenizer);
- `vla_family.py`, `causal_lm.py`: one family object each, the only code that knows a model
  class: how it reads `ModelInputs`, its vocabulary, its folders, how it exports;
- `registry.py`: `family_of(model)`, `load_model_folder`, `save_model_folder`.
"""

from lora_runtime.rl.models.family import ModelFamily
from lora_runtime.rl.models.folders import CONFIG_NAME, WEIGHTS_NAME, read_model_folder, torch_dtype
from lora_runtime.rl.models.inputs import BOS, PAD, ModelInputs
from lora_runtime.rl.models.registry import (
    FAMILIES,
    family_of,
    load_model_folder,
    save_model_folder,
)
from lora_runtime.rl.models.vla import MODEL_TYPE, TinyVLA, build_tiny_vla, init_weights

__all__ = [
    "BOS", "CONFIG_NAME", "FAMILIES", "MODEL_TYPE", "PAD", "WEIGHTS_NAME", "ModelFamily", "ModelInputs", "TinyVLA",
    "build_tiny_vla", "family_of", "init_weights", "load_model_folder", "read_model_folder", "save_model_folder",
    "torch_dtype",
]
