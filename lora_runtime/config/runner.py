"""The `runner` section: how a run is carried out (output, length, seed, threads, device,
distribution, saving, display), apart from what is learned and how."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, StrictBool, StrictInt, field_validator

from lora_runtime.config.base import Strict, not_blank


class RunnerConfig(Strict):
    """The `runner` section: where the outputs go and how the loop runs."""

    output_dir: str = "runs/run"
    overwrite: StrictBool = False
    steps: StrictInt = Field(60, ge=1)
    seed: StrictInt = 0
    compile: StrictBool = False
    rollout_weights: Literal["auto", "unmerged", "merged"] = "unmerged"
    device: str = "cpu"
    num_threads: StrictInt | None = Field(None, ge=1)
    distributed: Literal["none", "fsdp", "ddp"] = "none"
    save_every: StrictInt = Field(0, ge=0)
    resume_train_state: StrictBool = True
    base_dir: str | None = None
    progress: StrictBool = True
    plot: StrictBool = True

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda", "auto") or (index and not index.isdigit()) or (index and kind != "cuda"):
            raise ValueError("allowed: 'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)")
        return device

    _dir_not_blank = field_validator("output_dir", "base_dir")(not_blank)
