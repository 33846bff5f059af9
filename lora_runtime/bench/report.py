"""Tables and target checks of the benchmark results (plain text, no tensors)."""

from __future__ import annotations

__all__ = ["check_targets", "format_global", "format_model", "format_op_table", "format_targets"]


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def format_op_table(rows: list[dict]) -> str:
    """The op-level table: one row per (dtype, N, in, out, r)."""
    head = (f"{'dtype':8} {'N':>5} {'in x out':>11} {'r':>3} | {'base ms':>8} {'lora/base':>9} "
            f"{'peft/base':>9} {'lora/peft':>9} {'limit':>6} | {'base ms':>8} {'lora/base':>9} "
            f"{'peft/base':>9} {'lora/peft':>9} {'limit':>6}")
    title = (f"{'':39}| {'forward (no grad)':^55} | {'forward + backward (dx, dA, dB)':^55}")
    lines = [title, head, "-" * len(head)]
    for r in rows:
        m = r["median_s"]
        lines.append(
            f"{r['dtype']:8} {r['tokens']:>5} {str(r['in']) + 'x' + str(r['out']):>11} {r['r']:>3} | "
            f"{_fmt_ms(m['base_fwd']):>8} {r['fwd_lora_over_base']:>9.3f} "
            f"{r['fwd_peft_over_base']:>9.3f} {r['fwd_lora_over_peft']:>9.3f} "
            f"{r['fwd_flop_limit']:>6.3f} | {_fmt_ms(m['base_train']):>8} "
            f"{r['train_lora_over_base']:>9.3f} {r['train_peft_over_base']:>9.3f} "
            f"{r['train_lora_over_peft']:>9.3f} {r['train_flop_limit']:>6.3f}"
        )
    return "\n".join(lines)


def format_model(result: dict) -> str:
    """The model-level table of one model: train steps, rollouts, peak memory."""
    lines = [f"model {result['model']}: {result['description']}"]
    limits = result.get("flop_limit")
    if limits:
        lines.append(f"  FLOP limit from {limits['patched_layers']} patched layers: "
                     f"forward {limits['forward']:.3f}, train {limits['train']:.3f}")
    train, memory = result.get("train", {}), result.get("memory", {})
    if train:
        base = train.get("base", {}).get("median_s")
        peft = train.get("peft_eager", {}).get("median_s")
        full_mem = memory.get("full", {}).get("peak_over_baseline_mb")
        lines.append(f"  {'train step':16} {'ms':>9} {'/ base':>7} {'/ peft':>7} {'reps':>5} | "
                     f"{'peak MiB':>9} {'over base.':>10} {'/ full':>7}")
        for name, t in train.items():
            mem = memory.get(name, {})
            over = mem.get("peak_over_baseline_mb")
            lines.append(
                f"  {name:16} {_fmt_ms(t['median_s']):>9} "
                f"{t['median_s'] / base if base else float('nan'):>7.3f} "
                f"{t['median_s'] / peft if peft else float('nan'):>7.3f} {t['repeats']:>5} | "
                f"{mem.get('peak_mb', float('nan')):>9.0f} "
                f"{over if over is not None else float('nan'):>10.0f} "
                f"{over / full_mem if over is not None and full_mem else float('nan'):>7.3f}"
            )
        for name, mem in memory.items():
            if "error" in mem:
                lines.append(f"  memory {name}: {mem['error']}")
    rollout = result.get("rollout", {})
    if rollout:
        base = rollout.get("base", {}).get("median_s")
        lines.append(f"  {'rollout forward':16} {'ms':>9} {'/ base':>7} {'reps':>5}")
        for name, t in rollout.items():
            lines.append(f"  {name:16} {_fmt_ms(t['median_s']):>9} "
                         f"{t['median_s'] / base if base else float('nan'):>7.3f} {t['repeats']:>5}")
    for batch, section in result.get("decode", {}).items():
        base = section.get("base", {}).get("median_s")
        row = ", ".join(f"{k} {_fmt_ms(t['median_s'])} ms ({t['median_s'] / base:.3f})"
                        for k, t in section.items() if base)
        lines.append(f"  decode (generate, KV cache, batch {batch}, 32 new tokens; / base): {row}")
    if result.get("merge_enter_exit"):
        lines.append(f"  entering + leaving merged(...) once: "
                     f"{_fmt_ms(result['merge_enter_exit']['median_s'])} ms")
    for key, note in result.get("notes", {}).items():
        lines.append(f"  note {key}: {note}")
    return "\n".join(lines)


def _median(section: dict, name: str) -> float | None:
    return section.get(name, {}).get("median_s")


def _check(name: str, value: float | None, limit: float | None, what: str) -> dict:
    met = None if value is None or limit is None else value <= limit
    return {"target": name, "value": value, "limit": limit, "met": met, "what": what}


def check_targets(result: dict) -> list[dict]:
    """The issue's targets on one model's result; `met` is None where a figure is missing."""
    train, rollout, memory = result.get("train", {}), result.get("rollout", {}), result.get("memory", {})
    limits = result.get("flop_limit", {})

    def ratio(section: dict, a: str, b: str) -> float | None:
        x, y = _median(section, a), _median(section, b)
        return x / y if x and y else None

    def mem(a: str) -> float | None:
        return memory.get(a, {}).get("peak_over_baseline_mb")

    def mem_ratio(a: str, b: str) -> float | None:
        x, y = mem(a), mem(b)
        return x / y if x is not None and y else None

    tl = limits.get("train")
    decode = result.get("decode", {}).get("8", {})
    forward_s = _median(rollout, "base")
    merge_s = result.get("merge_enter_exit", {}).get("median_s")
    # The built-in actor has no `generate`: its decode is its rollout forward.
    dec = decode or rollout
    out = [
        _check("train: lora_eager / base", ratio(train, "lora_eager", "base"),
               tl + 0.02 if tl else None, "<= train FLOP limit + 0.02"),
        _check("train: lora_eager / peft_eager", ratio(train, "lora_eager", "peft_eager"), 0.85,
               "<= 0.85"),
        _check("train: lora_compiled / peft_compiled", ratio(train, "lora_compiled", "peft_compiled"),
               0.90, "<= 0.90"),
        _check("train: lora_compiled / base_compiled", ratio(train, "lora_compiled", "base_compiled"),
               tl + 0.05 if tl else None, "<= train FLOP limit + 0.05"),
        _check(f"{'decode b8' if decode else 'rollout'}: lora_unmerged / base",
               ratio(dec, "lora_unmerged", "base"), 1.15, "<= 1.15"),
        _check(f"{'decode b8' if decode else 'rollout'}: lora_unmerged / peft",
               ratio(dec, "lora_unmerged", "peft_unmerged"), 0.85, "<= 0.85"),
        _check(f"{'decode b8' if decode else 'rollout'}: lora_merged / base",
               ratio(dec, "lora_merged", "base"), 1.03, "<= 1.03"),
        _check("merged(): enter+leave / one forward", merge_s / forward_s if merge_s and forward_s else None,
               1.0, "<= 1 forward of the bench batch"),
        _check("memory: lora_eager / full", mem_ratio("lora_eager", "full"), 0.6, "<= 0.6"),
        _check("memory: lora_eager / peft_eager", mem_ratio("lora_eager", "peft_eager"), 1.0, "<= 1"),
        _check("memory: lora_compiled / peft_compiled", mem_ratio("lora_compiled", "peft_compiled"),
               1.0, "<= 1"),
    ]
    return out


def format_targets(model: str, targets: list[dict]) -> str:
    lines = [f"targets ({model}):"]
    for t in targets:
        state = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        limit = "-" if t["limit"] is None else f"{t['limit']:.3f}"
        lines.append(f"  {t['target']:40} {value:>7} (limit {limit:>5}, {t['what']}): {state}")
    return "\n".join(lines)


def format_global(result: dict) -> str:
    """The per-call layer cost and the op-grid targets, with their checks."""
    lines, checks = ["per-call cost of one 512x512 layer, r=32, no grad (/ nn.Linear):"], []
    for n, section in result.get("layer_calls", {}).items():
        lin = section["linear"]["median_s"]
        lines.append(f"  N={n:>3}: nn.Linear {lin * 1e6:.1f} us, ours "
                     f"{section['lora']['median_s'] / lin:.3f}, PEFT {section['peft']['median_s'] / lin:.3f}")
        checks.append(_check(f"layer call N={n}: lora / nn.Linear",
                             section["lora"]["median_s"] / lin, 1.3, "<= 1.3"))
    rows = (result.get("op") or {}).get("rows", [])
    for kind in ("fwd", "train"):
        big = [r[f"{kind}_lora_over_peft"] for r in rows if r["tokens"] >= 512]
        small = [r[f"{kind}_lora_over_peft"] for r in rows if r["tokens"] <= 16]
        if big:
            checks.append(_check(f"op grid {kind}, N>=512: worst lora / peft", max(big), 1.0, "<= 1"))
        if small:
            checks.append(_check(f"op grid {kind}, N<=16: worst lora / peft", max(small), 1.05, "<= 1.05"))
    result["global_targets"] = checks
    return "\n".join(lines) + "\n\n" + format_targets("layer and op grid", checks)
