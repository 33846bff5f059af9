"""Fixtures of the CLI tests."""

from __future__ import annotations

import pytest
from support.isolation import isolated
from support.tiny_runs import tiny_raw, write_yaml

from lora_runtime.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base_dir):
    """A LoRA run made through the CLI: (config path, output dir)."""
    d = tmp_path_factory.mktemp("trained")
    config = write_yaml(d / "new.yaml", tiny_raw(d / "lora_new", base_dir, steps=4))
    with isolated():
        assert main(["train", config]) == 0
    return config, d / "lora_new"
