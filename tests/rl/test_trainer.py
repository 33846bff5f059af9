"""The GRPO trainer on toy sizes: learning, frozen base, exact resume, full mode, outputs,
Ctrl-C, and refusals that leave the disk as it was."""

from __future__ import annotations

import itertools
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from support.files import snapshot_files
from support.isolation import isolated
from support.tiny_runs import quiet, tiny_raw

from lora_runtime.adapters import AdapterError, iter_lora_layers
from lora_runtime.adapters.peft_format import ADAPTER_WEIGHTS_NAME
from lora_runtime.config import validate_config
from lora_runtime.rl.builtin_base import builtin_base_dir
from lora_runtime.rl.models import load_model_folder
from lora_runtime.rl.outputs import UsageError, read_metrics
from lora_runtime.rl.trainer import train

METRIC_KEYS = {"step", "reward_mean", "loss", "kl", "step_time_s", "samples_per_s", "chance_reward",
               "pg_loss", "clip_frac", "entropy", "grad_norm", "reward_std", "lr"}


def run(raw, **kwargs):
    return train(validate_config(raw), log=quiet, **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_state(base_dir):
    folder = builtin_base_dir(validate_config(tiny_raw(base_dir / "x", base_dir)))
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def new_run(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("runs") / "lora_new"
    with isolated():
        result = run(tiny_raw(out, base_dir, steps=12, plot=True))
    return out, result


def test_lora_new_reward_rises_from_chance(new_run):
    out, result = new_run
    rewards = [r["reward_mean"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert first < 0.45  # chance is 0.25
    assert last > first + 0.25, rewards
    assert result.summary["chance_reward"] == 0.25


def test_lora_modes_train_only_adapters_base_bit_identical(new_run, base_state):
    out, result = new_run
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        base_name = name.replace(".base_layer.", ".")
        assert torch.equal(tensor, base_state[base_name]), name
    for path, layer in iter_lora_layers(model):
        assert layer.lora_B.weight.abs().sum() > 0, path  # B left zero means nothing trained
    saved = load_file(out / "adapter" / ADAPTER_WEIGHTS_NAME)
    for path, layer in iter_lora_layers(model):
        assert torch.equal(saved[f"base_model.model.{path}.lora_B.weight"], layer.lora_B.weight)


def test_outputs_of_a_run(new_run, base_dir):
    out, result = new_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 13))
    assert all(METRIC_KEYS <= set(r) for r in records)
    assert records[0]["kl"] < 1e-6  # B starts at zero: the policy starts as the reference
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {**result.summary, "curves": str(out / "curves.png")}
    assert summary["mode"] == "new" and summary["steps_run"] == 12 and not summary["interrupted"]
    assert summary["trainable_params"] < summary["total_params"]
    names = set(os.listdir(out))
    assert names == {"adapter", "train_state", "metrics.jsonl", "summary.json", "curves.png", "config.yaml"}
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(out / "train_state")) == [".metadata", "__0_0.distcp", "meta.json"]
    meta = json.loads((out / "train_state" / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["mode"], meta["format"]) == (12, 1, "new", 2)
    cfg = validate_config(__import__("yaml").safe_load((out / "config.yaml").read_text()))
    assert os.path.abspath(cfg.runner.base_dir) == str(base_dir)


def test_resume_continues_exactly(tmp_path, base_dir):
    """3 steps, then a resume run of 3 more, equals 6 steps in one go, bit for bit."""
    run(tiny_raw(tmp_path / "straight", base_dir, steps=6))
    run(tiny_raw(tmp_path / "first", base_dir, steps=3))
    second = run(tiny_raw(tmp_path / "second", base_dir, mode="resume", lora_path=tmp_path / "first" / "adapter", steps=3))
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "second" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(straight[3:], resumed):
        assert (a["reward_mean"], a["loss"], a["kl"]) == (b["reward_mean"], b["loss"], b["kl"])
    a = load_file(tmp_path / "straight" / "adapter" / ADAPTER_WEIGHTS_NAME)
    b = load_file(tmp_path / "second" / "adapter" / ADAPTER_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.summary["first_step"] == 4


@pytest.mark.parametrize("mode", ["resume", "full"])
def test_resume_in_place_appends_and_numbers_on(tmp_path, base_dir, mode):
    """A run continued in its own folder: the same steps and weights as one straight run,
    `metrics.jsonl` keeps every step, the summary and the curve cover the whole run."""
    out = tmp_path / "run"
    run(tiny_raw(tmp_path / "straight", base_dir, mode=mode if mode == "full" else "new", steps=5))
    run(tiny_raw(out, base_dir, mode=mode if mode == "full" else "new", steps=3))
    (tmp_path / "first.jsonl").write_bytes((out / "metrics.jsonl").read_bytes())
    (out / ".adapter.writing-dead").mkdir()  # what a rank 0 killed while saving leaves
    source = {"lora_path": out / "adapter"} if mode == "resume" else {}
    raw = tiny_raw(out, base_dir, mode=mode, steps=2, plot=True, **source)
    if mode == "full":
        raw["actor"]["model"]["model_path"] = str(out / "model")
    second = run(raw)  # no runner.overwrite: continuing in place replaces nothing of another run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[:3] == read_metrics(tmp_path / "first.jsonl")
    assert second.summary["first_step"] == 4 and second.summary["steps_run"] == 2
    assert second.summary["history_steps"] == 5
    assert second.summary["first_reward"] == sum(r["reward_mean"] for r in records) / 5  # the whole run
    if mode == "resume":  # the adapter continues exactly (full mode's reference is the model it starts from)
        one_go = read_metrics(tmp_path / "straight" / "metrics.jsonl")
        assert [(r["reward_mean"], r["loss"]) for r in records] == [(r["reward_mean"], r["loss"]) for r in one_go]
    assert (out / "curves.png").is_file() and not (out / ".adapter.writing-dead").exists()


def test_resume_in_place_without_a_train_state_numbers_on_from_the_log(tmp_path, base_dir):
    out = tmp_path / "run"
    run(tiny_raw(out, base_dir, steps=3))
    run(tiny_raw(out, base_dir, mode="resume", lora_path=out / "adapter", steps=2, resume_train_state=False))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]


def test_resume_starts_from_the_adapter_not_from_chance(new_run, tmp_path, base_dir):
    out, result = new_run
    resumed = run(tiny_raw(tmp_path / "resume", base_dir, mode="resume", lora_path=out / "adapter",
                           steps=3, resume_train_state=False, seed=7))
    records = read_metrics(tmp_path / "resume" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]  # fresh optimizer and numbering
    assert records[0]["kl"] > 0.05  # the loaded adapter already moved away from the base
    assert resumed.summary["first_reward"] > result.summary["first_reward"] + 0.2


def test_full_mode_trains_every_parameter(tmp_path, base_dir, base_state):
    result = run(tiny_raw(tmp_path / "full", base_dir, mode="full", steps=3))
    model = result.model
    assert result.summary["trainable_params"] == result.summary["total_params"]
    assert not list(iter_lora_layers(model))
    for name, p in model.named_parameters():
        assert p.requires_grad, name
        assert not torch.equal(p.detach(), base_state[name]), f"{name} did not change"
    saved = load_model_folder(str(tmp_path / "full" / "model"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name
    assert not (tmp_path / "full" / "adapter").exists()
    assert read_metrics(tmp_path / "full" / "metrics.jsonl")[0]["kl"] == 0.0  # frozen copy == policy


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_last_checkpoint(tmp_path, base_dir, sig):
    def interrupt(record):
        if record["step"] == 2:
            os.kill(os.getpid(), sig)

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    result = run(tiny_raw(tmp_path / "run", base_dir, steps=50, save_every=2), on_step=interrupt)
    assert {s: signal.getsignal(s) for s in previous} == previous  # handlers restored
    assert result.interrupted and result.summary["steps_run"] == 2 and result.summary["interrupted"]
    assert result.stop_signal == sig.name
    out = tmp_path / "run"
    assert result.saved == [str(out / n) for n in ("adapter", "train_state", "metrics.jsonl", "summary.json")]
    assert json.loads((out / "train_state" / "meta.json").read_text())["step"] == 2
    assert (out / "adapter" / ADAPTER_WEIGHTS_NAME).is_file()
    assert len(read_metrics(out / "metrics.jsonl")) == 2
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no staging folder left


def test_existing_results_are_not_overwritten(tmp_path, base_dir):
    out = tmp_path / "run"
    run(tiny_raw(out, base_dir, steps=2))
    before = snapshot_files(out)
    with pytest.raises(UsageError, match=r"runner.output_dir='.*run' already holds the results of a run .*runner.overwrite=true"):
        run(tiny_raw(out, base_dir, steps=2, seed=3))
    assert snapshot_files(out) == before
    run(tiny_raw(out, base_dir, steps=2, seed=3, overwrite=True))
    assert snapshot_files(out)["metrics.jsonl"] != before["metrics.jsonl"]


def test_missing_adapter_is_named_and_nothing_is_written(tmp_path, base_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"actor.model.lora_path='.*empty'.*adapter_config.json"):
        run(tiny_raw(tmp_path / "out", base_dir, mode="resume", lora_path=tmp_path / "empty"))
    assert not (tmp_path / "out").exists()


def test_rank_mismatch_is_refused(new_run, tmp_path, base_dir):
    raw = tiny_raw(tmp_path / "out", base_dir, mode="resume", lora_path=new_run[0] / "adapter")
    raw["actor"]["model"]["lora_rank"] = 8
    with pytest.raises(AdapterError, match="lora_rank=8 but the adapter .* has r=4"):
        run(raw)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_is_refused(tmp_path, base_dir):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"runner.output_dir='.*file/out' cannot be created: .* is a file"):
        run(tiny_raw(tmp_path / "file" / "out", base_dir))
    assert (tmp_path / "file").read_text() == "x"


def test_distributed_needs_a_process_group(tmp_path, base_dir, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="runner.distributed='ddp'"):
        run(tiny_raw(tmp_path / "out", base_dir, distributed="ddp"))
    assert not (tmp_path / "out").exists()


def test_compile_uses_compile_actor(tmp_path, base_dir, monkeypatch):
    import lora_runtime.rl.trainer as trainer_mod

    calls = []
    original = trainer_mod.compile_actor

    def recording(model, **kwargs):
        calls.append(model)
        return original(model, backend="eager")  # dynamo tracing without the C++ compile

    monkeypatch.setattr(trainer_mod, "compile_actor", recording)
    result = run(tiny_raw(tmp_path / "out", base_dir, steps=2, compile=True))
    assert len(calls) == 1 and calls[0] is result.model
    assert result.summary["compile"] is True and result.summary["steps_run"] == 2


def test_transformers_causal_lm_trains_on_scene_tokens(tmp_path, base_dir, tiny_llama):
    tiny_llama.save_pretrained(tmp_path / "llama", safe_serialization=True)
    raw = tiny_raw(tmp_path / "out", base_dir, steps=2)
    raw["actor"]["model"]["model_path"] = str(tmp_path / "llama")
    result = run(raw)
    keys = load_file(tmp_path / "out" / "adapter" / ADAPTER_WEIGHTS_NAME).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.lora_B.weight" in keys
    assert result.summary["base"] == str(tmp_path / "llama") and result.summary["steps_run"] == 2


def test_cosine_schedule_runs_from_lr_to_min_ratio():
    from lora_runtime.config import GRPOConfig
    from lora_runtime.rl.loop import lr_at

    cfg = GRPOConfig(lr=1e-3, lr_schedule="cosine", min_lr_ratio=0.1)
    values = [lr_at(cfg, 11, i) for i in range(11)]
    assert values[0] == pytest.approx(1e-3) and values[-1] == pytest.approx(1e-4)
    assert values[5] == pytest.approx(0.55e-3)
    assert all(a > b for a, b in itertools.pairwise(values))
    assert lr_at(GRPOConfig(lr=1e-3), 11, 7) == 1e-3


def test_schedule_is_applied_each_step(tmp_path, base_dir):
    run(tiny_raw(tmp_path / "out", base_dir, steps=3, lr_schedule="cosine", min_lr_ratio=0.5, lr=1e-2))
    assert [r["lr"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")] == pytest.approx([1e-2, 7.5e-3, 5e-3])


def test_full_mode_continues_from_its_model_folder(tmp_path, base_dir):
    """Full mode: model_path=<run>/model finds <run>/train_state; 2 + 2 steps == 4 steps
    (kl_coef 0: the reference of the second run is its own starting point)."""
    run(tiny_raw(tmp_path / "straight", base_dir, mode="full", steps=4, kl_coef=0.0))
    run(tiny_raw(tmp_path / "a", base_dir, mode="full", steps=2, kl_coef=0.0))
    raw = tiny_raw(tmp_path / "b", base_dir, mode="full", steps=2, kl_coef=0.0)
    raw["actor"]["model"]["model_path"] = str(tmp_path / "a" / "model")
    run(raw)
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [3, 4]
    straight = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_exit_code_and_message_after_a_signal(tmp_path, base_dir, monkeypatch, capsys, sig, code):
    from support.tiny_runs import write_yaml

    from lora_runtime.cli import commands

    def interrupt(record):
        if record["step"] == 2:
            os.kill(os.getpid(), sig)

    real_train = commands.train
    monkeypatch.setattr(commands, "train", lambda cfg, **kw: real_train(cfg, on_step=interrupt, **kw))
    out = tmp_path / "run"
    assert commands.run_train(write_yaml(tmp_path / "run.yaml", tiny_raw(out, base_dir, steps=50))) == code
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("stopped by")]
    expected = (f"stopped by {sig.name} after step 2: saved adapter/, train_state/, metrics.jsonl, "
                f"summary.json in {out}; a resume run continues from there")
    assert lines == [expected]
    assert {"adapter", "train_state", "metrics.jsonl", "summary.json"} <= set(os.listdir(out))


def test_train_state_of_another_world_size_is_refused(tmp_path, base_dir):
    first = tmp_path / "first"
    run(tiny_raw(first, base_dir, steps=2))
    meta_path = first / "train_state" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "world_size": 2}))
    with pytest.raises(UsageError, match=r"train_state: the training state was saved by 2 process\(es\), this run has 1; "
                       r".*--nproc_per_node 2 or start with a fresh optimizer: --set runner.resume_train_state=false"):
        run(tiny_raw(tmp_path / "second", base_dir, mode="resume", lora_path=first / "adapter", steps=2))
    assert not (tmp_path / "second").exists()
    meta_path.write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(UsageError, match=r"meta.json: training state format 1, this version reads format 2"):
        run(tiny_raw(tmp_path / "second", base_dir, mode="resume", lora_path=first / "adapter", steps=2))
    assert not (tmp_path / "second").exists()
    result = run(tiny_raw(tmp_path / "second", base_dir, mode="resume", lora_path=first / "adapter", steps=2,
                          resume_train_state=False))
    assert result.summary["first_step"] == 1


def test_prepare_actor_draws_adapters_from_the_given_generator(base_dir):
    from lora_runtime.actor import prepare_actor
    from lora_runtime.rl.builtin_base import load_base

    cfg = validate_config(tiny_raw(base_dir / "x", base_dir))
    adapters = []
    for i, kwargs in enumerate([{"seed": 5}, {"generator": torch.Generator().manual_seed(5)}, {"seed": 6}]):
        torch.manual_seed(100 + i)  # the default generator must not matter
        model = prepare_actor(load_base(cfg, log=quiet), cfg.actor.model, **kwargs)
        adapters.append({p: layer.lora_A.weight.clone() for p, layer in iter_lora_layers(model)})
    assert adapters[0].keys() == adapters[1].keys() and len(adapters[0]) > 0
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert all(not torch.equal(adapters[0][k], adapters[2][k]) for k in adapters[0])
    assert all(a.std() > 0 for a in adapters[0].values())
    base = load_base(cfg, log=quiet)
    with pytest.raises(ValueError, match="prepare_actor: pass generator or seed, not both"):
        prepare_actor(base, cfg.actor.model, seed=1, generator=torch.Generator())
    assert not list(iter_lora_layers(base))
