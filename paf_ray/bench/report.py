"""bench.json -> bench.md: a table per case, targets beside the ratios they are set for."""

from __future__ import annotations

TARGETS = {  # (section, key) -> (the target as text, test)
    ("step", "time_ratio"): ("<= 0.5", lambda v: v <= 0.5),
    ("step", "mem_ratio"): ("<= 0.6", lambda v: v <= 0.6),
    ("ray_overhead", "ratio"): ("<= 1.05", lambda v: v <= 1.05),
    ("data", "steady_ratio"): (">= 1.0", lambda v: v >= 1.0),
    ("data", "first_batch_ratio"): ("<= 2", lambda v: v <= 2.0),
    ("data", "consumer_ratio"): (">= 1.0", lambda v: v >= 1.0),
    ("gpu", "train_img_s"): (">= 45 on one H100/H200", lambda v: v >= 45),
    ("gpu", "adapt_over_finetune_img_s"): (">= 1.5", lambda v: v >= 1.5),
    ("gpu", "adapt_over_finetune_peak"): ("<= 0.6", lambda v: v <= 0.6),
}


def _f(v, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _target(section: str, key: str, v) -> str:
    if (section, key) not in TARGETS or v is None:
        return ""
    text, ok = TARGETS[(section, key)]
    return f"{text} ({'met' if ok(v) else 'missed'})"


def _bold(d: dict, section: str, key: str, digits: int = 2) -> str:
    """The ratio in bold, with its target and whether it was met."""
    return f"**{_f(d[key], digits)}** {_target(section, key, d[key])}".rstrip()


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _about(d: dict) -> str:
    return f"{d['model']}, {d['input_size'][0]}x{d['input_size'][1]}, batch {d['batch']}"


def _data(d: dict) -> list[str]:
    # ratios with a target near 1 get 3 digits: 0.997 must not read as "1.00 >= 1.0 (missed)"
    return [f"## data: the input pipeline ({d['workers']} CPUs each, 1280x720 frames -> {d['input_size'][0]}x"
            f"{d['input_size'][1]}, batch {d['batch']}, {d['images_per_pass']} frames a pass, decode priority "
            f"{d['decode_priority']})"] + _table(["", "Ray Data", "DataLoader", "Ray Data / DataLoader"], [
        ["time to first batch, a pipeline starts (a new execution; a new DataLoader)",
         f"{_f(d['ray_data_first_batch_s'], 2)} s", f"{_f(d['dataloader_new_first_batch_s'], 2)} s",
         _bold(d, "data", "first_batch_ratio")],
        ["time to first batch, the DataLoader's epoch start (persistent workers)", "",
         f"{_f(d['dataloader_first_batch_s'], 2)} s", _f(d["first_batch_vs_persistent"], 2)],
        ["steady state (a pass after its first fifth), rows/s", _f(d["ray_data_rows_s"]), _f(d["dataloader_rows_s"]),
         _bold(d, "data", "steady_ratio", 3)],
        [f"delivered to a consumer computing {1000 * d['consumer_step_s']:.0f} ms a batch: a stage of "
         f"{d['consumer_epochs']} epochs, its epochs after the first, rows/s", _f(d["ray_data_consumer_rows_s"]),
         _f(d["dataloader_consumer_rows_s"]), _bold(d, "data", "consumer_ratio", 3)],
        ["the same, the whole stage from its start (the DataLoader's workers started before), rows/s",
         _f(d["ray_data_consumer_stage_rows_s"]), _f(d["dataloader_consumer_stage_rows_s"]),
         _f(d["consumer_stage_ratio"], 3)]])


def _step(st: dict) -> list[str]:
    labels = {"adapt": "adapt (bypass adapters, frozen backbone)", "finetune": "finetune (after adapt: all trains)",
              "pretrain_finetune": "pretrain-finetune (no adapters, all trains)"}
    rows = [[label, _f(st[f"{k}_ms"], 0), _f(st[f"{k}_peak_mb"], 0), f"{st['trainable_params'][k]:,}"]
            for k, label in labels.items()]
    rows += [["**time ratio** adapt / finetune", _bold(st, "step", "time_ratio"), "", ""],
             ["**memory ratio** adapt / finetune", _bold(st, "step", "mem_ratio"), "", ""],
             ["reachable time ratio (finetune without backbone backward and optimizer)",
              _f(st["reachable_time_ratio"], 2), "", ""]]
    parts = ("backbone_fwd_ms", "backbone_bwd_ms", "rest_fwd_ms", "rest_bwd_ms", "optimizer_ms")
    return ([f"## step: adapt vs finetune ({_about(st)}; memory: {st['memory']})"]
            + _table(["case", "ms/step", "peak MB", "trainable params"], rows) + ["", "Breakdown (ms, median):"]
            + _table(["case", "backbone fwd", "backbone bwd", "adapters+neck+heads fwd", "adapters+neck+heads bwd",
                      "optimizer"], [[k] + [_f(b[p], 0) for p in parts] for k, b in st["breakdown"].items()]))


def _compile(c: dict) -> list[str]:
    return [f"## compile: torch.compile of the dense part ({c['stage']} step, {_about(c)}; backbone, adapters, "
            "FPN and seg heads compiled, detector eager)"] + _table(["", "ms/step"], [
        ["eager", _f(c["eager_ms"], 0)], ["compiled", _f(c["compiled_ms"], 0)],
        ["**speed-up** eager / compiled", _bold(c, "compile", "speedup")],
        ["compilation (first step, compiled minus eager)", f"{_f(c['compile_s'])} s"]])


def _ray(ro: dict) -> list[str]:
    lines = [f"## ray_overhead: Ray Train ({_about(ro)}, {ro['steps']} timed steps a run, {ro['threads']['plain']} "
             f"torch threads each; {ro['rounds']} TorchTrainer runs, each between two plain runs)"] + _table(
        ["loop", "ms/step (median of the runs' medians)"], [
            ["plain loop, one process", _f(ro["plain_ms"], 0)], ["TorchTrainer, 1 worker", _f(ro["ray_ms"], 0)],
            [f"**ratio** (median over the TorchTrainer runs of its ms / the mean of the plain runs around it: "
             f"{', '.join(_f(r, 3) for r in ro['ratios'])})", _bold(ro, "ray_overhead", "ratio", 3)],
            ["start-up (fit() to the worker's first line)", f"{_f(ro['startup_s'])} s"]])
    cpu, others = ro["cpu_ms_per_step"], ro["others_cpu_ms_per_step"]
    names = list(dict.fromkeys(list(cpu["ray"])[:6] + list(cpu["plain"])[:3]))
    return lines + ["", "CPU ms per timed step, by process (the loop's own is `self`):"] + _table(
        ["process", "plain loop", "TorchTrainer"],
        [[n, _f(cpu["plain"].get(n, 0.0), 0), _f(cpu["ray"].get(n, 0.0), 0)] for n in names]
        + [["all but self", _f(others["plain"], 0), _f(others["ray"], 0)]])


def _lv(lv: dict) -> list[str]:
    return [f"## lv_overhead: the LV-Adapter ({lv['stage']} step, {_about(lv)})"] + _table(
        ["", "ms/step", "peak MB", "trainable params", "/ without"],
        [[label, _f(lv[f"{k}_ms"], 0), _f(lv[f"{k}_peak_mb"], 0), f"{lv['trainable_params'][k]:,}", ratio]
         for k, label, ratio in (("without", "without", ""), ("with", "with the LV-Adapter", _bold(lv, "lv", "ratio")),
                                 ("prompts_frozen", "with it, prompts frozen (no text tower)",
                                  _f(lv["frozen_ratio"], 2)))]) + [
        "", f"Text tower {_f(lv['text_tower_ms'], 0)} ms a step (with - prompts frozen), vision side "
            f"{_f(lv['vision_side_ms'], 0)} ms (prompts frozen - without)."]


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if v is not None else "n/a (no bf16 peak known for this device)"


def _gpu(g: dict) -> list[str]:
    if not g.get("ran_on"):
        return ["## gpu", "", g.get("why", "not run")]
    return ["## gpu", "", f"Ran on {g['ran_on']}" + (f" ({g['gpu_name']})" if g.get("gpu_name") else "") +
            f"; amp {g['amp']}, channels_last {g['channels_last']}; 3-task {_about(g)} (1280x720 frames letterboxed), "
            "each stage in its own process."] + _table(["metric", "finetune", "adapt", "target"], [
        ["step", f"{_f(g['step_ms'])} ms", f"{_f(g['adapt_step_ms'])} ms", ""],
        ["training images/s per device", _f(g["train_img_s"]), _f(g["adapt_img_s"]),
         _target("gpu", "train_img_s", g["train_img_s"]) + " (finetune)"],
        ["peak memory", f"{_f(g['peak_mb'], 0)} MB", f"{_f(g['adapt_peak_mb'], 0)} MB", ""],
        ["FLOPs per step (torch.utils.flop_counter, fwd + bwd)", f"{g['flops_per_step'] / 1e9:.1f} GFLOP",
         f"{g['adapt_flops_per_step'] / 1e9:.1f} GFLOP", ""],
        [f"**MFU** (dense bf16 peak {_f(g['bf16_peak_tflops'])} TFLOP/s)", f"**{_pct(g['mfu'])}**",
         _pct(g["adapt_mfu"]), ""],
        ["**adapt / finetune images/s**", "", _bold(g, "gpu", "adapt_over_finetune_img_s"), ""],
        ["**adapt / finetune peak memory**", "", _bold(g, "gpu", "adapt_over_finetune_peak"), ""],
        ["input pipeline images/s (the data case)", _f(g["pipeline_img_s"]), "", ""],
        ["pipeline headroom (pipeline / finetune images/s)", _f(g["pipeline_headroom"], 2), "", ""]])


WRITERS = {"data": _data, "step": _step, "compile": _compile, "ray_overhead": _ray, "lv_overhead": _lv, "gpu": _gpu}


def bench_markdown(r: dict) -> str:
    m, quick = r["machine"], r["settings"]["quick"]
    lines = [
        "# paf-ray bench" + (" (--quick: tiny sizes, a smoke run, not a measurement)" if quick else ""), "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), GPU: {m['gpu_name'] or 'none'}; torch {m['torch']}, "
        f"ray {m['ray']}, python {m['python']}; device `{m['device']}`; load average at start "
        f"{_f(m['load_avg_at_start'][0], 2)}; {m['date']}; total {r.get('wall_s', 0):.0f} s"
        + ("" if r["complete"] else " (incomplete)") + ".",
        "", "Medians over repeats after warm-up; every ratio compares cases measured in this run.",
    ]
    for name in r["cases"]:
        section = r.get(name)
        lines.append("")
        if section is None:
            lines.append(f"## {name}: not run (yet)")
        elif "error" in section:
            lines += [f"## {name}: FAILED", "", "```", section["error"], "```"]
        else:
            lines += WRITERS[name](section)
    return "\n".join(lines + [""])
