"""Every command in README.md's fenced shell blocks (```bash / ```sh / ```console) is run
here, in the README's order, in a fresh folder holding `configs/` (as a clone does), at toy
sizes: each is the README's own command line with `--set` overrides appended that shrink the
model, the task and the step count (`SHRINK`), and `--episodes 2` for `eval`. A command that
is not a `lora-runtime` command must be listed in `ALLOWED` with the test that covers it and
why it is not run here; anything else fails. Every ```python block runs too (`PYTHON`: the
names it expects from the text around it, and the few textual swaps that keep it fast);
one with no entry fails. The checker itself is tested on planted commands and blocks
(`test_the_checker_fails_on_*`): a checker that cannot fail would prove nothing."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml
from support.hf_folders import causal_lm_folder, patched
from support.isolation import isolated
from support.models import make_tiny_llama
from support.tiny_episodic import BUILTIN as EPISODIC_BUILTIN
from support.tiny_runs import BUILTIN as REACH_BUILTIN

from lora_runtime.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SHELL = {"bash", "sh", "shell", "console"}

# Commands the README shows that this test does not run, each with the test that covers it.
ALLOWED = {
    "make demo": "the set-up (tested by every `make test`) and then `lora-runtime demo`, which this test "
                 "runs first at toy sizes; tests/cli/test_demo.py tests the demo's orchestration",
    "make test": "the suite this test belongs to",
    "torchrun --nproc_per_node 2 -m lora_runtime.cli train configs/reach/lora_new.yaml --set runner.distributed=fsdp":
        "needs two processes and a process group: tests/parallel/test_distributed.py trains under torchrun "
        "(fsdp and ddp, stop and resume); here its config and overrides are validated (`check_torchrun`)",
}


def _sets(values: dict[str, object]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


# Per task kind, the toy sizes appended to a README command (later --set values win).
SHRINK = {
    "babyai": _sets({**{f"actor.builtin.{k}": v for k, v in EPISODIC_BUILTIN.items()}, "actor.model.lora_rank": 4,
                     "task.num_envs": 4, "task.max_episode_steps": 16, "task.bc_episodes": 4, "task.eval_episodes": 2,
                     "algorithm.batch_size": 2, "algorithm.group_size": 4, "runner.steps": 1,
                     "runner.progress": "false", "runner.plot": "false"}),
    "reach": _sets({**{f"actor.builtin.{k}": v for k, v in REACH_BUILTIN.items()}, "actor.builtin.pretrain_steps": 10,
                    "actor.model.lora_rank": 4, "task.grid": 2, "task.num_objects": 2, "task.num_colors": 3,
                    "algorithm.batch_size": 4, "algorithm.group_size": 2, "runner.steps": 1,
                    "runner.progress": "false", "runner.plot": "false"}),
    "text": _sets({"actor.builtin.text_dim": 32, "actor.builtin.text_layers": 1, "actor.builtin.text_heads": 2,
                   "actor.builtin.text_mlp_dim": 64, "actor.builtin.pretrain_steps": 2,
                   "actor.builtin.pretrain_batch_size": 8, "actor.model.lora_rank": 4, "task.num_prompts": 40,
                   "task.eval_prompts": 2, "algorithm.batch_size": 2, "algorithm.group_size": 2,
                   "runner.steps": 1, "runner.progress": "false", "runner.plot": "false"}),
}


# ----------------------------------------------------------------------------- the README


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1).strip().lower(), m.group(2))
            for m in re.finditer(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL)]


def shell_commands(text: str) -> list[str]:
    """Every command of the shell blocks: continuation lines joined, `$ ` prompts and
    comments dropped, words normalised by `shlex` (so the allow-list matches on words)."""
    commands = []
    for lang, body in fenced_blocks(text):
        if lang not in SHELL:
            continue
        for line in re.sub(r"\\\n\s*", " ", body).splitlines():
            line = line.strip()
            if lang == "console":
                if not line.startswith("$ "):
                    continue  # program output
                line = line[2:]
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


def unchecked(commands: list[str]) -> list[str]:
    """The commands that are neither run here (`lora-runtime ...`) nor in `ALLOWED`."""
    return [c for c in commands if shlex.split(c)[0] != "lora-runtime" and c not in ALLOWED]


# ----------------------------------------------------------------------------- running them


def task_kind(config: str) -> str:
    with open(config, encoding="utf-8") as f:
        return (yaml.safe_load(f).get("task") or {}).get("kind", "reach")


def with_toy_sizes(argv: list[str]) -> list[str]:
    """`argv` (after `lora-runtime`) with the toy sizes of its config's task appended."""
    command, rest = argv[0], argv[1:]
    positional = [a for i, a in enumerate(rest) if not a.startswith("-") and (i == 0 or not rest[i - 1].startswith("-"))]
    if command == "demo":
        folder = rest[rest.index("--configs") + 1] if "--configs" in rest else (
            os.path.join("configs", rest[rest.index("--task") + 1]) if "--task" in rest else "configs")
        return argv + SHRINK[task_kind(os.path.join(folder, "lora_new.yaml"))]
    if command == "merge" and not positional:
        return argv  # the run's own config.yaml: already toy-sized
    extra = SHRINK[task_kind(positional[0])]
    if command == "eval":
        extra = [*extra, "--episodes", "2"]
    return argv + extra


def run_command(command: str) -> str:
    """Runs one README `lora-runtime` command in-process (what the console script does);
    fails the test with its output unless it exits 0."""
    argv = shlex.split(command)
    assert argv[0] == "lora-runtime", command
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), isolated():
        code = main(with_toy_sizes(argv[1:]))
    assert code == 0, f"README command failed (exit {code}): {command}\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue() + err.getvalue()


def check_torchrun(command: str) -> None:
    """A torchrun command's config validates with its overrides and its task allows it."""
    from lora_runtime.config import load_config
    from lora_runtime.rl.builtin_base import check_task

    argv = shlex.split(command)
    argv = argv[argv.index("lora_runtime.cli") + 1:]
    assert argv[0] == "train", command
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    check_task(load_config(argv[1], sets))


# ----------------------------------------------------------------------------- Python blocks


class Engine:
    """An inference engine's weight-sync doors, as the life-cycle block calls them."""

    def __init__(self):
        self.loaded = {}

    def load_weights(self, weights):
        self.loaded.update(weights)

    def load_lora(self, state):
        self.loaded.update(state)


def lifecycle_names():
    model = patched(make_tiny_llama(layers=1), rank=4)
    ids = torch.randint(0, 128, (2, 6))
    return {"model": model, "ids": ids, "prompts": ids, "generate": lambda actor, p: actor(p).logits.argmax(-1),
            "engine": Engine()}


def check_rewards(names):
    assert names["accuracy"](["2+2="], [" 4"], ["4"]) == [1.0]


def loading_names():
    """The files the README's export commands wrote, and inputs shaped as `export` printed."""
    from lora_runtime.cli.export import example_inputs
    from lora_runtime.config import load_config
    from lora_runtime.ops import library_path
    from lora_runtime.rl.actor_builder import build_actor

    cfg = load_config("runs/lora_new/config.yaml", ["actor.model.lora_path=runs/lora_new/adapter"])
    _, (pixel_values, input_ids) = example_inputs(cfg, build_actor(cfg, log=lambda m: None))
    return {"LIB": library_path(), "pixel_values": pixel_values, "input_ids": input_ids}


# marker in the block -> (names it expects, textual swaps (each must be found), check after)
PYTHON = {
    "build_my_policy()": (lambda: {"build_my_policy": lambda: make_tiny_llama(layers=1)},
                          [("lora_rank=32", "lora_rank=4")], None),
    "compile_actor(model": (lifecycle_names, [('backend="inductor"', 'backend="eager"')], None),  # inductor: minutes
    "def accuracy(": (dict, [], check_rewards),
    "export_torchscript(model": (lambda: {"model": patched(causal_lm_folder_model(), rank=4)}, [], None),
    "torch.ops.load_library(LIB)": (loading_names, [], None),
}


def causal_lm_folder_model():
    from transformers import AutoModelForCausalLM

    causal_lm_folder("hf_lm")
    return AutoModelForCausalLM.from_pretrained("hf_lm")


def python_handler(body: str):
    found = [marker for marker in PYTHON if marker in body]
    assert len(found) == 1, f"README Python block with {len(found)} entries in PYTHON (want 1): {found}\n{body}"
    return PYTHON[found[0]]


def run_python(body: str) -> None:
    names_of, swaps, check = python_handler(body)
    for old, new in swaps:
        assert old in body, f"the swap {old!r} no longer applies to the README block:\n{body}"
        body = body.replace(old, new)
    names = names_of()
    with isolated(), contextlib.redirect_stdout(io.StringIO()):
        exec(compile(body, f"README.md, the Python block with {body.splitlines()[0]!r}", "exec"), names)  # noqa: S102 (the README's own code)
    if check is not None:
        check(names)


# ----------------------------------------------------------------------------- the tests


@pytest.fixture
def clone(tmp_path, monkeypatch):
    """A fresh folder as a clone looks to the README's commands: `configs/` and nothing else."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # transformers' own, when the README traces it
def test_every_readme_command_and_python_block_runs(clone):
    text = README.read_text(encoding="utf-8")
    commands = shell_commands(text)
    assert not unchecked(commands), f"README commands neither run here nor in ALLOWED: {unchecked(commands)}"
    assert "lora-runtime demo" not in commands  # run first, as `make demo` runs it
    run_command("lora-runtime demo")
    assert (clone / "runs" / "eval.json").is_file()
    causal_lm_folder("path/to/model")  # the user's transformers model the README's commands name
    for command in commands:
        if shlex.split(command)[0] == "lora-runtime":
            run_command(command)
        elif command.startswith("torchrun "):
            check_torchrun(command)
    assert (clone / "actor.pt").is_file() and (clone / "actor.pt2").is_file()
    for lang, body in fenced_blocks(text):
        if lang == "python":
            run_python(body)
    assert (clone / "runs" / "my_run" / "adapter" / "adapter_config.json").is_file()


def test_allowed_commands_are_in_the_readme():
    """An entry of ALLOWED that the README no longer shows is stale."""
    commands = shell_commands(README.read_text(encoding="utf-8"))
    assert set(ALLOWED) <= set(commands), sorted(set(ALLOWED) - set(commands))


PLANTED = """
```bash
lora-runtime train configs/lora_new.yaml   # run by the test
make demo
rm -rf runs                                # planted: neither run nor allowed
make bench \\
    QUICK=1                                # planted, on two lines
```

```console
$ pip install lora-runtime
Successfully installed
```
"""


def test_the_checker_fails_on_planted_commands():
    commands = shell_commands(PLANTED)
    assert commands == ["lora-runtime train configs/lora_new.yaml", "make demo", "rm -rf runs", "make bench QUICK=1",
                        "pip install lora-runtime"]
    assert unchecked(commands) == ["rm -rf runs", "make bench QUICK=1", "pip install lora-runtime"]


def test_the_checker_fails_on_a_failing_command_and_an_unknown_python_block(clone, capsys):
    with pytest.raises(AssertionError, match="README command failed"):
        run_command("lora-runtime train configs/reach/lora_new.yaml --set runner.stepz=1")
    with pytest.raises(AssertionError, match="0 entries in PYTHON"):
        run_python("import os\nos.remove('everything')\n")
    with pytest.raises(AssertionError, match="no longer applies"):
        run_python("model = build_my_policy()  # with lora_rank=16\n")


def test_the_cli_synopsis_names_only_real_commands_and_options():
    """The README's CLI reference (a ```text synopsis, not run) lists only subcommands and
    options that `lora-runtime` has, and every subcommand it has."""
    from lora_runtime.cli import build_parser

    text = README.read_text(encoding="utf-8").split("## CLI reference", 1)[1]
    synopsis = next(body for lang, body in fenced_blocks(text) if lang == "text")
    parsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    seen = set()
    for line in synopsis.splitlines():
        words = line.split("#")[0].split()
        if words[:1] != ["lora-runtime"]:
            continue
        command = words[1]
        assert command in parsers, line
        seen.add(command)
        if command == "bench":
            continue  # its own options (BENCHMARKS.md)
        options = {o for a in parsers[command]._actions for o in a.option_strings}
        named = set(re.findall(r"--[a-z][a-z-]*", line.split("#")[0]))
        assert named <= options, (line, sorted(named - options))
    assert seen == set(parsers), sorted(set(parsers) - seen)


def test_the_readmes_own_links_lead_to_its_headings():
    """Every `](#anchor)` link names a heading (GitHub's slugs: lower case, punctuation
    dropped, spaces to hyphens)."""
    text = README.read_text(encoding="utf-8")
    outside_code = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
             for h in re.findall(r"^#{1,6} (.+)$", outside_code, flags=re.MULTILINE)}
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links and links <= slugs, sorted(links - slugs)
