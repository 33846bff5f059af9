"""FSDP2 and DDP on 2 CPU ranks (gloo, started by torchrun), against one process.

The 2-rank runs live in `support/dist_worker.py`; the same steps run here in one process on the
global batch. One launch covers every FSDP2 / DDP case, a second one a failing rank.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from support import dist_worker as W
from support.isolation import isolated
from support.numerics import rel_err_l2
from torch import nn

from lora_runtime import parallel as distributed
from lora_runtime.adapters import iter_lora_layers, iter_merged_weights, load_adapter, save_adapter
from lora_runtime.adapters.peft_format import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME

WORKER = Path(W.__file__)
LAUNCH_TIMEOUT_S = 180  # a bound on a whole 2-rank run, loaded machine included
FILES = (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, out_dir: Path) -> tuple[int, str]:
    """Runs `dist_worker.py SCENARIO OUT_DIR` on 2 ranks."""
    return torchrun([str(WORKER), scenario, str(out_dir)])


def torchrun(args: list[str]) -> tuple[int, str]:
    """`torchrun --nproc_per_node 2 ARGS`: exit code and output; kills the group on timeout."""
    port = str(_free_port())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", port, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        ranks = _descendants(proc.pid)  # torch elastic starts each rank in a session of its own
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = "(no output: a process still held the pipe)"
        pytest.fail(f"2-rank run {args} did not end within {LAUNCH_TIMEOUT_S}s:\n{out[-4000:]}")
    return proc.returncode, out


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), deepest last."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(c) for c in f.read().split()]
                found += children
                todo += children
    return found


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("dist_train")
    rc, out = launch("train", out_dir)
    assert rc == 0, f"2-rank run failed (exit {rc}):\n{out[-6000:]}"
    return out_dir


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """The worker's steps in one process on the whole global batch, per model kind."""
    out = {}
    with isolated(threads=None):  # W.build seeds the global generator
        for kind in ("llama", "tiny"):
            model = W.build(kind)
            out[kind] = W.train(model, model, slice(None))
    return out


def rank_results(run_dir: Path, case: str) -> list[dict]:
    return [torch.load(run_dir / f"{case}.rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("case", W.CASES)
def test_first_step_matches_single_process(run_dir, reference, case):
    ref = reference[case.split("-")[0]]
    for res in rank_results(run_dir, case):
        assert abs(res["loss"] - ref["loss"]) / abs(ref["loss"]) < 1e-5
        assert res["grads"].keys() == ref["grads"].keys()
        for key, grad in ref["grads"].items():
            assert grad.abs().sum() > 0, key
            assert rel_err_l2(res["grads"][key], grad) < 1e-5, key


@pytest.mark.parametrize("case", W.CASES)
def test_three_steps_agree_across_ranks_and_with_single_process(run_dir, reference, case):
    kind = case.split("-")[0]
    ref = reference[kind]
    r0, r1 = rank_results(run_dir, case)
    initial = W.build(kind).state_dict()
    assert r0["adapters"].keys() == ref["adapters"].keys()
    for key, value in ref["adapters"].items():
        assert torch.equal(r0["adapters"][key], r1["adapters"][key]), key
        assert rel_err_l2(r0["adapters"][key], value) < 1e-5, key
        path = key.removeprefix("base_model.model.")
        assert not torch.equal(value, initial[path]), f"{key} did not train"
    assert r0["frozen"].keys() == ref["frozen"].keys() and len(r0["frozen"]) > 0
    for name, value in r0["frozen"].items():
        assert torch.equal(value, initial[name]), f"frozen {name} changed"
        assert torch.equal(r1["frozen"][name], initial[name]), f"frozen {name} changed on rank 1"


@pytest.mark.parametrize("case", W.CASES)
def test_only_adapter_gradients_are_communicated(run_dir, case):
    mode = case.split("-")[1]
    r0 = rank_results(run_dir, case)[0]
    adapter_bytes = sum(t.numel() * t.element_size() for t in r0["adapters"].values())
    assert adapter_bytes < r0["param_bytes"] / 5
    for records in r0["comm"]:
        totals = {}
        for kind, n in records:
            totals[kind] = totals.get(kind, 0) + n
        if mode == "fsdp":  # forward + backward all-gather of everything, adapters reduced
            assert set(totals) == {"all_gather", "reduce_scatter"}
            assert totals["reduce_scatter"] == adapter_bytes
            assert totals["all_gather"] == 2 * r0["param_bytes"]
        else:  # one all-reduce of the adapter bucket (+ DDP's one-time bucket-order broadcast)
            assert set(totals) <= {"all_reduce", "broadcast"}
            assert totals["all_reduce"] == adapter_bytes
            assert totals.get("broadcast", 0) < 1024


@pytest.mark.parametrize("case", W.CASES)
def test_saved_adapter_loads_in_one_process_with_same_logits(run_dir, tmp_path, case):
    kind = case.split("-")[0]
    r0 = rank_results(run_dir, case)[0]
    model = W.build(kind)
    with torch.no_grad():
        before = W.logits_of(model, W.eval_ids())
    assert not torch.allclose(before, r0["logits"], atol=1e-4)
    load_adapter(model, run_dir / f"adapter_{case}")
    with torch.no_grad():
        torch.testing.assert_close(
            W.logits_of(model, W.eval_ids()), r0["logits"], rtol=1e-5, atol=1e-5
        )
    save_adapter(model, tmp_path / "single")  # the same weights, saved by one process
    for name in FILES:
        assert (run_dir / f"adapter_{case}" / name).read_bytes() == (
            tmp_path / "single" / name
        ).read_bytes()


@pytest.mark.parametrize("case", W.CASES)
def test_iter_merged_weights_gathers_one_tensor_at_a_time(run_dir, reference, case):
    kind, mode = case.split("-")
    ref = reference[kind]
    model = W.build(kind)
    load_adapter(model, run_dir / f"adapter_{case}")
    single = dict(iter_merged_weights(model))  # the same adapters, merged in one process
    sizes = sorted(p.numel() * p.element_size() for p in model.parameters())
    for res in rank_results(run_dir, case):
        assert list(res["merged"]) == list(ref["merged"]) == list(single)
        for name, value in res["merged"].items():
            assert torch.equal(value, single[name]), name
            torch.testing.assert_close(value, ref["merged"][name], rtol=1e-5, atol=1e-6)
        gathers = [n for kind_, n in res["merge_comm"] if kind_ == "all_gather"]
        assert {k for k, _ in res["merge_comm"]} <= {"all_gather"}
        if mode == "fsdp":  # every tensor gathered, never more than one tensor per collective
            assert max(gathers) == sizes[-1] and sum(gathers) >= sum(sizes)
        else:
            assert gathers == []


@pytest.mark.parametrize("case", W.CASES)
def test_load_adapter_fills_the_distributed_model(run_dir, case):
    for res in rank_results(run_dir, case):
        assert not torch.allclose(res["zeroed_logits"], res["logits"], atol=1e-4)
        torch.testing.assert_close(res["reloaded_logits"], res["logits"], rtol=0, atol=0)


def test_merged_and_compile_actor_on_a_sharded_actor_match_one_process(tmp_path):
    """FSDP2 on 2 ranks: `merged()` enters (logits of the merged weights) and leaves with
    every weight bit-exact; `compile_actor` gives the same logits and adapter gradients."""
    rc, out = launch("sharded_ops", tmp_path)
    assert rc == 0, f"2-rank run failed (exit {rc}):\n{out[-6000:]}"
    model = W.build("tiny")
    ref = W.sharded_ops(model, model)  # the same calls, unsharded, on the whole batch
    assert ref["restored_exactly"] and ref["merged_layers"] == len(list(iter_lora_layers(model)))
    base = {path: layer.base_layer.weight for path, layer in iter_lora_layers(W.build("tiny"))}
    assert all(not torch.equal(ref["merged_weights"][path], w) for path, w in base.items())  # non-zero B
    for rank in (0, 1):
        res = torch.load(tmp_path / f"sharded_ops.rank{rank}.pt")
        assert res["restored_exactly"] and res["merged_layers"] == ref["merged_layers"]
        torch.testing.assert_close(res["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res["merged_logits"], res["logits"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res["merged_logits"], ref["merged_logits"], rtol=1e-5, atol=1e-5)
        assert res["merged_weights"].keys() == ref["merged_weights"].keys()
        for path, w in ref["merged_weights"].items():
            torch.testing.assert_close(res["merged_weights"][path], w, rtol=0, atol=1e-6)
        torch.testing.assert_close(res["compiled_logits"], ref["logits"], rtol=1e-5, atol=1e-5)
        for key, grad in ref["compiled_grads"].items():
            assert grad.abs().sum() > 0, key
            assert rel_err_l2(res["compiled_grads"][key], grad) < 1e-5, key


def test_failing_rank_ends_the_run_without_partial_adapter(tmp_path):
    rc, out = launch("fail", tmp_path)
    assert rc != 0
    assert "rank 1 fails on purpose before saving" in out.rpartition("Root Cause")[2]
    assert list(tmp_path.iterdir()) == [], "a partial adapter was left behind"


# ----------------------------------------------------------------------------- the CLI trainer

CONFIG = Path(__file__).parents[2] / "configs" / "reach" / "lora_new.yaml"  # the one-step task: fast
TRAIN_SETTINGS = (
    "runner.steps=2",
    "algorithm.batch_size=4",
    "algorithm.group_size=2",
    "runner.progress=false",
    "runner.plot=false",
    "actor.builtin.pretrain_steps=2",
    "actor.builtin.pretrain_batch_size=8",
)


@pytest.fixture(scope="module")
def empty_base_dir(tmp_path_factory) -> Path:
    """A folder of its own, empty: the 2-rank CLI runs build their base in it."""
    return tmp_path_factory.mktemp("base")


def start_torchrun(args: list[str]) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 ARGS` in a new session (its own process group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def cli_args(out_dir: Path, base_dir: Path, mode: str, *settings: str) -> list[str]:
    kv = [*TRAIN_SETTINGS, f"runner.distributed={mode}", f"runner.output_dir={out_dir}",
          f"runner.base_dir={base_dir}", "algorithm.lr_schedule=constant", *settings]
    return ["-m", "lora_runtime.cli", "train", str(CONFIG), *[a for s in kv for a in ("--set", s)]]


def wait_for_steps(proc: subprocess.Popen, metrics: Path, n: int) -> None:
    """Waits until rank 0 has written `n` metrics lines (the run goes on meanwhile)."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"the run did not reach step {n}:\n{proc.communicate()[0][-4000:]}")


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not end within {LAUNCH_TIMEOUT_S}s:\n{proc.communicate()[0][-4000:]}")
    return proc.returncode, out


def compared(out_dir: Path) -> list[dict]:
    """metrics.jsonl without the measured fields (times)."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("step_time_s", "samples_per_s", "train_s")}
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def stopped_step(out: str, sig: str) -> int:
    """The step of the one 'stopped by' message, checking it names only files on disk."""
    (line,) = [ln for ln in out.splitlines() if ln.startswith(f"stopped by {sig} after step")]
    return int(line.split("after step ")[1].split(":")[0])


def stop_run(out_dir: Path, base_dir: Path, mode: str, stop: str, after: int, *settings: str) -> tuple[int, str]:
    """A run of `mode` stopped by `stop` once it has written `after` metrics lines.

    SIGINT goes to the whole process group (a terminal's Ctrl-C: torchrun and every rank);
    SIGTERM to torchrun alone (a scheduler), which sends it on to the ranks."""
    proc = start_torchrun(cli_args(out_dir, base_dir, mode, "runner.steps=1000", *settings))
    wait_for_steps(proc, out_dir / "metrics.jsonl", after)
    if stop == "SIGINT":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    rc, out = finish(proc)
    assert rc == 1, out[-3000:]  # torchrun turns the signal it got into an error (see README)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "adapter", "config.yaml", "metrics.jsonl", "summary.json", "train_state"]
    assert f"saved adapter/, train_state/, metrics.jsonl, summary.json in {out_dir}" in out
    assert json.loads((out_dir / "summary.json").read_text())["interrupted"] is True
    return stopped_step(out, stop), out


def test_cli_stop_and_resume_under_torchrun(tmp_path, empty_base_dir):
    """N straight FSDP2 steps == FSDP2 steps stopped by SIGINT + DDP steps resumed from that
    state and stopped by SIGTERM + FSDP2 steps resumed from the DDP state, bit for bit.

    One chain covers what two runs per mode did: both signals, both modes saving on a
    signal, both loading a state (each one saved by the other mode: DCP reshards)."""
    from lora_runtime.adapters import apply_and_load_adapter
    from lora_runtime.rl.models import load_model_folder

    n = 10
    rc, out = finish(start_torchrun(cli_args(tmp_path / "straight", empty_base_dir, "fsdp", f"runner.steps={n}")))
    assert rc == 0, out[-6000:]
    assert out.count("run: mode new") == 0 and out.count("straight: mode new") == 1, out[-3000:]  # rank 0 alone logs
    straight = compared(tmp_path / "straight")
    assert [r["step"] for r in straight] == list(range(1, n + 1))

    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    k1, _ = stop_run(first, empty_base_dir, "fsdp", "SIGINT", 2)
    assert 2 <= k1 < n
    assert compared(first) == straight[:k1]
    meta = json.loads((first / "train_state" / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["distributed"]) == (k1, 2, "fsdp")

    k2, out = stop_run(second, empty_base_dir, "ddp", "SIGTERM", 1, f"actor.model.lora_path={first / 'adapter'}")
    assert f"continuing from {first / 'train_state'} (optimizer, RNG) at step {k1}" in out
    assert k1 < k2 < n, (k1, k2)
    assert compared(second) == straight[k1:k2]
    meta = json.loads((second / "train_state" / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["distributed"]) == (k2, 2, "ddp")

    rc, out = finish(start_torchrun(cli_args(
        third, empty_base_dir, "fsdp", f"runner.steps={n - k2}", f"actor.model.lora_path={second / 'adapter'}")))
    assert rc == 0, out[-6000:]
    assert f"continuing from {second / 'train_state'} (optimizer, RNG) at step {k2}" in out
    assert compared(third) == straight[k2:]
    for name in FILES:
        assert (third / "adapter" / name).read_bytes() == (tmp_path / "straight" / "adapter" / name).read_bytes()
    (base,) = empty_base_dir.iterdir()
    model = apply_and_load_adapter(load_model_folder(str(base)), third / "adapter")
    summary = json.loads((third / "summary.json").read_text())
    assert summary["steps_run"] == n - k2 and summary["lora_layers"] == len(list(iter_lora_layers(model)))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_full_mode_continues_in_place_under_torchrun(tmp_path, empty_base_dir, mode):
    """Full mode with its training state on 2 ranks: 4 straight steps == 2 steps, then 2 more
    continued in the same folder from `model/` and `train_state/`, bit for bit (`kl_coef: 0`:
    full mode's reference is the model a run starts from)."""
    full = ("actor.model.is_lora=false", "algorithm.kl_coef=0")
    straight, run = tmp_path / "straight", tmp_path / "run"
    for out_dir, extra in ((straight, ["runner.steps=4"]), (run, ["runner.steps=2"]),
                           (run, ["runner.steps=2", f"actor.model.model_path={run / 'model'}"])):
        rc, out = finish(start_torchrun(cli_args(out_dir, empty_base_dir, mode, *full, *extra)))
        assert rc == 0, out[-6000:]
    assert f"continuing from {run / 'train_state'} (optimizer, RNG) at step 2" in out
    assert compared(run) == compared(straight) and [r["step"] for r in compared(run)] == [1, 2, 3, 4]
    assert (run / "model" / "model.safetensors").read_bytes() == (straight / "model" / "model.safetensors").read_bytes()
    meta = json.loads((run / "train_state" / "meta.json").read_text())
    assert (meta["step"], meta["mode"], meta["world_size"], meta["distributed"]) == (4, "full", 2, mode)


def _rank_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (read from /proc)."""
    ranks = {}
    for pid in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            ranks[int(rank[0][5:])] = int(pid)
    return ranks


def test_killed_rank_ends_the_run_and_leaves_the_last_save(tmp_path, empty_base_dir):
    """kill -9 of rank 1 while the run saves every step: torchrun ends non-zero, and the
    folder holds complete weights and train state of one step, nothing half-written."""
    from lora_runtime.adapters import read_adapter

    out_dir = tmp_path / "run"
    proc = start_torchrun(cli_args(out_dir, empty_base_dir, "fsdp", "runner.steps=1000", "runner.save_every=1"))
    wait_for_steps(proc, out_dir / "metrics.jsonl", 3)
    os.kill(_rank_pids(proc.pid)[1], signal.SIGKILL)
    rc, out = finish(proc)
    assert rc != 0
    assert "stopped by" not in out
    meta = json.loads((out_dir / "train_state" / "meta.json").read_text())
    assert meta["step"] >= 2 and (out_dir / "train_state" / ".metadata").is_file()
    assert {p.name for p in (out_dir / "train_state").iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json"}
    read_adapter(str(out_dir / "adapter"))  # complete and valid
    assert not [p.name for p in out_dir.iterdir() if ".writing-" in p.name or ".old-" in p.name]


def test_train_with_distributed_mode_needs_torchrun(tmp_path, monkeypatch):
    from lora_runtime.config import load_config
    from lora_runtime.rl.outputs import UsageError
    from lora_runtime.rl.trainer import train

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    overrides = ["runner.distributed=ddp", f"runner.output_dir={tmp_path / 'run'}"]
    cfg = load_config(str(CONFIG), overrides)
    with pytest.raises(UsageError, match=r"runner.distributed='ddp'.*torchrun"):
        train(cfg)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- one process


@pytest.fixture
def single_rank_group(tmp_path):
    """A 1-rank gloo group in this process, for argument checks that need one."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_find_blocks_picks_decoder_layers_and_model_lists():
    from lora_runtime.config import BuiltinActorConfig
    from lora_runtime.rl.models.vla import build_tiny_vla

    assert [p for p, _ in distributed.find_blocks(W.build("llama"))] == [
        "model.layers.0",
        "model.layers.1",
    ]
    assert [p for p, _ in distributed.find_blocks(W.build("tiny"))] == ["blocks.0", "blocks.1"]
    vla = build_tiny_vla(BuiltinActorConfig())
    expected = [f"vision.blocks.{i}" for i in range(len(vla.vision.blocks))]
    expected += [f"language_model.layers.{i}" for i in range(len(vla.language_model.layers))]
    assert [p for p, _ in distributed.find_blocks(vla)] == expected and len(expected) >= 4
    assert [p for p, _ in distributed.find_blocks(W.build("tiny"), block_types=[W.TinyBlock])] == [
        "blocks.0",
        "blocks.1",
    ]


@pytest.mark.parametrize("block_types", [["LoRALinear"], [nn.Linear]])
def test_find_blocks_refuses_to_split_a_lora_layer(block_types):
    with pytest.raises(ValueError, match="inside a LoRALinear"):
        distributed.find_blocks(W.build("tiny"), block_types=block_types)


def test_shard_actor_needs_a_process_group():
    model = W.build("tiny")
    with pytest.raises(RuntimeError, match="init_distributed"):
        distributed.shard_actor(model)
    assert not distributed.is_sharded(model)


@pytest.mark.usefixtures("single_rank_group")
def test_shard_and_replicate_refuse_bad_models():
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no repeated block found"):
        distributed.shard_actor(plain)
    assert not distributed.is_sharded(plain)
    frozen = W.build("tiny").requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad"):
        distributed.replicate_actor(frozen)
    ddp = distributed.wrap_actor(W.build("tiny"), "ddp")
    assert isinstance(ddp, nn.parallel.DistributedDataParallel)
    with pytest.raises(ValueError, match="got a DistributedDataParallel wrapper"):
        distributed.shard_actor(ddp)
    model = W.build("tiny")
    distributed.shard_actor(model)
    assert distributed.is_sharded(model)
    with pytest.raises(ValueError, match="already sharded"):
        distributed.shard_actor(model)
    with pytest.raises(ValueError, match="already sharded"):
        distributed.replicate_actor(model)


def test_wrap_actor_modes():
    model = W.build("tiny")
    assert distributed.wrap_actor(model, "none") is model
    with pytest.raises(
        ValueError, match=r"runner.distributed='zero3'; allowed \['none', 'fsdp', 'ddp'\]"
    ):
        distributed.wrap_actor(model, "zero3")
    assert not distributed.is_sharded(model)


def test_init_distributed_outside_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_distributed()
    with pytest.raises(ValueError, match="backend='mpi'"):
        distributed.init_distributed(backend="mpi")
    assert not dist.is_initialized()


def test_rank_slice_and_metrics_in_one_process():
    assert distributed.rank_slice(4, rank=1, world_size=2) == slice(2, 4)
    assert distributed.rank_slice(3) == slice(0, 3)
    with pytest.raises(ValueError, match="5 items cannot be split evenly over world_size=2"):
        distributed.rank_slice(5, rank=0, world_size=2)
    assert distributed.reduce_metrics({"loss": torch.tensor(2.5), "n": 3}) == {
        "loss": 2.5,
        "n": 3.0,
    }
    with pytest.raises(ValueError, match="op='median'"):
        distributed.reduce_metrics({"loss": 1.0}, op="median")


def test_copy_full_and_full_tensor_on_plain_tensors():
    t = torch.zeros(2, 3)
    assert distributed.full_tensor(t) is t
    distributed.copy_full_(t, torch.ones(2, 3))
    assert torch.equal(t, torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"source shape \[3, 2\] != parameter shape \[2, 3\]"):
        distributed.copy_full_(t, torch.zeros(3, 2))
    assert torch.equal(t, torch.ones(2, 3))


def test_builds_are_identical_and_adapters_non_zero():
    a, b = W.build("tiny"), W.build("tiny")
    for (_, la), (_, lb) in zip(iter_lora_layers(a), iter_lora_layers(b)):
        assert torch.equal(la.lora_B.weight, lb.lora_B.weight) and la.lora_B.weight.abs().sum() > 0


# ----------------------------------------------------------------------------- PPO on 2 ranks


def _ppo_config(path: Path, out_dir: Path, base_dir: Path, mode: str, **runner) -> Path:
    """A toy BabyAI PPO run (4 environments: 2 a rank under torchrun) written to `path`."""
    import yaml
    from support.tiny_episodic import tiny_episodic_raw

    algo = {"name": "ppo", "rollout_steps": 8, "update_epochs": 2, "minibatches": 1, "lr": 1e-2, "kl_coef": 0.01,
            "lr_schedule": "constant"}
    raw = tiny_episodic_raw(out_dir, base_dir, algorithm=algo, steps=3)
    raw["runner"].update(distributed=mode, **runner)
    path.write_text(yaml.safe_dump(raw))
    return path


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / ADAPTER_WEIGHTS_NAME))


@pytest.fixture(scope="module")
def ppo_one_process(tmp_path_factory) -> tuple[Path, Path]:
    """3 PPO steps in one process with 4 environments, and the base folder it built."""
    from lora_runtime.cli import main

    root = tmp_path_factory.mktemp("ppo")
    out, base = root / "one", root / "base"
    with isolated():
        assert main(["train", str(_ppo_config(root / "one.yaml", out, base, "none"))]) == 0
    return out, base


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_ppo_on_two_ranks_equals_one_process(tmp_path, ppo_one_process, mode):
    """PPO with its value head on 2 ranks (each stepping 2 of the 4 environments, drawing the
    seeds and sampling noise of all 4 from the shared stream) trains what one process with
    the 4 environments trains: the same rollouts (returns, episode counts: exact), losses and
    adapter + value head to float rounding (gradients averaged over ranks, advantages
    normalised with every rank's moments)."""
    one, base = ppo_one_process
    out = tmp_path / mode
    rc, log = torchrun(["-m", "lora_runtime.cli", "train", str(_ppo_config(tmp_path / "c.yaml", out, base, mode))])
    assert rc == 0, log[-6000:]
    assert "2 environments" in log  # each rank steps its share
    ranks, single = compared(out), compared(one)
    assert [r["step"] for r in ranks] == [1, 2, 3]
    for a, b in zip(ranks, single):
        for key in ("episodes", "env_steps", "success_rate", "reward_mean", "episode_len"):
            assert a[key] == pytest.approx(b[key], rel=1e-12, nan_ok=True), (key, a[key], b[key])
        for key in ("loss", "pg_loss", "value_loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
    assert sum(r["episodes"] for r in single) > 0
    theirs, ours = _adapter_tensors(out), _adapter_tensors(one)
    assert sorted(theirs) == sorted(ours) and any("value_head" in k for k in ours)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-4, atol=1e-6, msg=key)
    assert not torch.equal(ours["base_model.model.value_head.weight"], torch.zeros_like(ours["base_model.model.value_head.weight"]))


def test_ppo_under_torchrun_continues_in_place_bit_for_bit(tmp_path, ppo_one_process):
    """FSDP2 PPO: 3 straight steps == 2 steps, then 1 more continued from the adapter (value
    head included) and the training state, bit for bit."""
    _, base = ppo_one_process
    straight, run = tmp_path / "straight", tmp_path / "run"
    for i, (out, steps, extra) in enumerate(((straight, 3, {}), (run, 2, {}), (run, 1, {"overwrite": True}))):
        cfg = _ppo_config(tmp_path / f"c{i}.yaml", out, base, "fsdp", **extra)
        args = ["-m", "lora_runtime.cli", "train", str(cfg), "--set", f"runner.steps={steps}"]
        if i == 2:
            args += ["--set", f"actor.model.lora_path={run / 'adapter'}"]
        rc, log = torchrun(args)
        assert rc == 0, log[-6000:]
    assert "(optimizer, RNG) at step 2" in log
    timed = ("rollout_s", "env_steps_per_s")
    assert [{k: v for k, v in r.items() if k not in timed} for r in compared(run)] == [
        {k: v for k, v in r.items() if k not in timed} for r in compared(straight)]
    assert (run / "adapter" / ADAPTER_WEIGHTS_NAME).read_bytes() == (straight / "adapter" / ADAPTER_WEIGHTS_NAME).read_bytes()


# ----------------------------------------------------------------------------- text GRPO on 2 ranks


def _text_config(root: Path, model: str, out_dir: Path, mode: str) -> Path:
    """GRPO on the word-level Llama: 4 prompts x 2 completions a step (2 prompts a rank under
    torchrun), token-mean loss with the KL to the base, 3 steps."""
    import yaml

    raw = {"actor": {"model": {"is_lora": True, "lora_rank": 4, "model_path": model}},
           "task": {"kind": "text", "dataset": str(root / "data.jsonl"), "eval_fraction": 0.25,
                    # `length` varies with where EOS ends completions, so the advantages are not
                    # all 0 whatever this machine's rounding samples (`words` alone hit no
                    # answer word in 3 steps on an AMD host)
                    "reward": [{"function": f"{root / 'my_rewards.py'}:words", "weight": 2.0},
                               {"function": f"{root / 'my_rewards.py'}:length", "weight": 1.0}],
                    "max_new_tokens": 4},
           "algorithm": {"batch_size": 4, "group_size": 2, "lr": 3e-2, "kl_coef": 0.05, "loss_type": "token_mean",
                         "lr_schedule": "constant"},
           "runner": {"output_dir": str(out_dir), "steps": 3, "num_threads": 1, "progress": False, "plot": False,
                      "distributed": mode}}
    path = root / f"text-{mode}-{out_dir.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _favour_eos(folder: str) -> None:
    """Raises the EOS logit by about 2.5 where the last hidden states point (their mean
    direction), so that completions end at different lengths and ranks finish decoding apart."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    ids = torch.randint(4, 64, (16, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].reshape(-1, model.config.hidden_size)
        m = h.mean(0)
        model.lm_head.weight[model.config.eos_token_id] += 2.5 * m / m.dot(m)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def text_one_process(tmp_path_factory) -> tuple[Path, str, Path]:
    """3 text GRPO steps in one process; prompts of 1 to 5 words (ranks pad to the batch's width)."""
    pytest.importorskip("transformers")
    from support.text_folders import text_task_folder

    from lora_runtime.cli import main

    root = tmp_path_factory.mktemp("text")
    rows = [{"prompt": " ".join(f"w{i + j}" for j in range(1 + i % 5)), "answer": f"w{i + 1 + i % 5}"}
            for i in range(32)]
    model = text_task_folder(root, rows)
    _favour_eos(model)
    out = root / "one"
    with isolated():
        assert main(["train", str(_text_config(root, model, out, "none"))]) == 0
    return root, model, out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_text_grpo_on_two_ranks_equals_one_process(tmp_path, text_one_process, mode):
    """Each rank answers 2 of the step's 4 prompts, drawn with the sampling noise from one
    shared stream: the ranks sample the completions one process samples (rewards, accuracy,
    lengths: exact), decode the same number of tokens (the longest completion on any rank),
    and train the same adapter (token-mean over every rank's tokens; float rounding)."""
    root, model, one = text_one_process
    out = tmp_path / mode
    rc, log = torchrun(["-m", "lora_runtime.cli", "train", str(_text_config(root, model, out, mode))])
    assert rc == 0, log[-6000:]
    ranks, single = compared(out), compared(one)
    assert [r["step"] for r in ranks] == [1, 2, 3]
    for a, b in zip(ranks, single):
        assert a["completions"] == b["completions"] == 8  # 4 + 4 over the ranks, not 8 on each
        for key in ("reward_mean", "accuracy", "completion_len", "reward/words", "reward/length"):
            assert a[key] == pytest.approx(b[key], rel=1e-12), (key, a[key], b[key])
        assert a["reward_std"] == pytest.approx(b["reward_std"], rel=1e-6)  # the batch's, not a mean of the ranks'
        for key in ("loss", "pg_loss", "kl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a[key], b[key])
    assert any(r["reward_std"] > 0 for r in single)
    lengths = [r["completion_len"] for r in single]
    assert len({r["reward_mean"] for r in single}) > 1 and min(lengths) < 4, lengths  # EOS ended some early
    theirs, ours = _adapter_tensors(out), _adapter_tensors(one)
    assert sorted(theirs) == sorted(ours)
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-4, atol=1e-6, msg=key)
