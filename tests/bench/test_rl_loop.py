"""The RL-loop benchmark (`python -m lora_runtime.bench.rl_loop`) on toy sizes: every variant
runs the same GRPO iterations and reports rollout and train time."""

from __future__ import annotations

import pytest
import yaml
from support.tiny_episodic import tiny_episodic_raw

from lora_runtime.bench.rl_loop import main, measure

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rl_loop_reports_each_variant(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(tiny_episodic_raw(tmp_path / "run", tmp_path / "base")))
    result = measure(str(config), 2, ["lora_eager", "peft_eager", "lora_overlap"])
    for name in ("lora_eager", "peft_eager", "lora_overlap"):
        r = result["variants"][name]
        assert len(r["samples"]) == 2 and r["rollout_s"] > 0 and r["env_steps_per_s"] > 0
        assert r["samples"][0]["env_steps"] >= 8  # 2 seeds x 4 episodes, at least a step each
    # same seeds, same adapter values: the first rollout (before any update) is the same episodes
    first = [result["variants"][n]["samples"][0] for n in ("lora_eager", "peft_eager", "lora_overlap")]
    for other in first[1:]:
        assert first[0]["env_steps"] == other["env_steps"] and first[0]["success_rate"] == other["success_rate"]
    assert main([str(config), "--iterations", "1", "--variants", "lora_eager"]) == 0
    assert "lora_eager" in capsys.readouterr().out


def test_rl_loop_refuses_an_unknown_variant(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["c.yaml", "--variants", "lora_eager,lora_overlapp"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--variants='lora_eager,lora_overlapp': unknown ['lora_overlapp']" in err and "lora_overlap" in err
