"""bench.json -> bench.md: one table per case, targets next to the measured ratios."""

from __future__ import annotations

# (key in the section, the target as text, test) for the ratios the issue sets targets for
TARGETS = {
    ("step", "time_ratio"): ("<= 0.5", lambda v: v <= 0.5),
    ("step", "mem_ratio"): ("<= 0.6", lambda v: v <= 0.6),
    ("ray_overhead", "ratio"): ("<= 1.05", lambda v: v <= 1.05),
    ("data", "steady_ratio"): (">= 1.0", lambda v: v >= 1.0),
    ("data", "first_batch_ratio"): ("<= 2", lambda v: v <= 2.0),
    ("data", "consumer_ratio"): (">= 1.0", lambda v: v >= 1.0),
    ("stream", "epoch_start_ratio"): ("<= 1.2", lambda v: v <= 1.2),
    ("stream", "backpressure_ratio"): (">= 0.9", lambda v: v >= 0.9),
    ("gpu", "train_img_s"): (">= 45 on one H100/H200", lambda v: v >= 45),
    ("gpu", "adapt_over_finetune_img_s"): (">= 1.5", lambda v: v >= 1.5),
    ("gpu", "adapt_over_finetune_peak"): ("<= 0.6", lambda v: v <= 0.6),
    ("gpu", "box_px"): ("<= 0.01 px", lambda v: v <= 0.01),
}


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _target(section: str, key: str, value) -> str:
    if (section, key) not in TARGETS or value is None:
        return ""
    text, ok = TARGETS[(section, key)]
    return f"{text} ({'met' if ok(value) else 'missed'})"


def _data(d: dict) -> list[str]:
    return [
        f"## 1. Input pipeline ({d['workers']} CPUs each, 1280x720 frames -> {d['input_size'][0]}x"
        f"{d['input_size'][1]}, batch {d['batch']}, {d['images_per_pass']} frames a pass, decode priority "
        f"{d['decode_priority']})",
        "",
        "| | Ray Data | DataLoader | Ray Data / DataLoader |",
        "| --- | --- | --- | --- |",
        f"| time to first batch, a pipeline starts (a new execution; a new DataLoader) | "
        f"{_f(d['ray_data_first_batch_s'], 2)} s | {_f(d['dataloader_new_first_batch_s'], 2)} s | "
        f"**{_f(d['first_batch_ratio'], 2)}** {_target('data', 'first_batch_ratio', d['first_batch_ratio'])} |",
        f"| time to first batch, the DataLoader's epoch start (persistent workers) | | "
        f"{_f(d['dataloader_first_batch_s'], 2)} s | {_f(d['first_batch_vs_persistent'], 2)} |",
        # ratios with a target near 1 get 3 digits: 0.997 must not read as "1.00 >= 1.0 (missed)"
        f"| steady state (a pass after its first fifth), rows/s | {_f(d['ray_data_rows_s'])} | {_f(d['dataloader_rows_s'])} | "
        f"**{_f(d['steady_ratio'], 3)}** {_target('data', 'steady_ratio', d['steady_ratio'])} |",
        f"| delivered to a consumer computing {1000 * d['consumer_step_s']:.0f} ms a batch: a stage of "
        f"{d['consumer_epochs']} epochs, its epochs after the first, rows/s | "
        f"{_f(d['ray_data_consumer_rows_s'])} | {_f(d['dataloader_consumer_rows_s'])} | "
        f"**{_f(d['consumer_ratio'], 3)}** {_target('data', 'consumer_ratio', d['consumer_ratio'])} |",
        f"| the same, the whole stage from its start (the DataLoader's workers started before), rows/s | "
        f"{_f(d['ray_data_consumer_stage_rows_s'])} | {_f(d['dataloader_consumer_stage_rows_s'])} | "
        f"{_f(d['consumer_stage_ratio'], 3)} |",
    ]


def _stream(st: dict) -> list[str]:
    return [
        f"## 1b. The stage stream ({st['images_per_epoch']} frames an epoch, batch {st['batch']}, "
        f"{st['workers']} decode CPUs, a consumer computing {1000 * st['consumer_step_s']:.0f} ms a batch)",
        "",
        "| | value | target |",
        "| --- | --- | --- |",
        f"| epoch 2's first 10 steps / median step | **{_f(st['epoch_start_ratio'], 3)}** | "
        f"{_target('stream', 'epoch_start_ratio', st['epoch_start_ratio'])} |",
        f"| epoch 1's first 10 steps / median step (the pipeline's start) | {_f(st['first_epoch_start_ratio'], 2)} | |",
        f"| rows/s after the first batch (both epochs), store holds the whole epoch "
        f"({st['object_store_mb']['whole']} MB) | {_f(st['whole_store_rows_s'])} | |",
        f"| rows/s after the first batch (both epochs), store holds a quarter "
        f"({st['object_store_mb']['quarter']} MB) | {_f(st['quarter_store_rows_s'])} | |",
        f"| **quarter / whole** | **{_f(st['backpressure_ratio'], 3)}** | "
        f"{_target('stream', 'backpressure_ratio', st['backpressure_ratio'])} |",
        f"| quarter / whole, epoch 2 alone (the whole store decoded part of it during epoch 1) | "
        f"{_f(st['backpressure_ratio_epoch2'], 2)} | |",
        f"| quarter / whole without the executor fixes (`PAF_RAY_DATA_EXECUTOR_FIX=0`) | "
        f"{_f(st['backpressure_ratio_unfixed'], 2)} | |",
        "",
        "Per epoch (1, 2): the consumer's wait for a batch (ms a step); CPU-ms a step of the consumer "
        "and of every other process (decoding, Ray Data's executor, Ray):",
        "",
        "| store | wait ms | consumer CPU-ms | others CPU-ms |",
        "| --- | --- | --- | --- |",
        *(f"| {name} | {' / '.join(_f(w, 1) for w in run['epoch_wait_ms'])} | "
          f"{' / '.join(_f(c['consumer'], 0) for c in run['epoch_cpu_ms'])} | "
          f"{' / '.join(_f(c['others'], 0) for c in run['epoch_cpu_ms'])} |"
          for name, run in st["runs"].items()),
    ]


def _step(st: dict) -> list[str]:
    lines = [
        f"## 2. Step cost ({st['model']}, {st['input_size'][0]}x{st['input_size'][1]}, batch {st['batch']}; "
        f"memory: {st['memory']})",
        "",
        "| case | ms/step | peak MB | trainable params |",
        "| --- | --- | --- | --- |",
    ]
    for case, label in (("adapt", "adapt (bypass adapters, frozen backbone)"),
                        ("finetune", "finetune (after adapt: adapters kept, all trains)"),
                        ("pretrain_finetune", "pretrain-finetune (no adapters, all trains)")):
        lines.append(f"| {label} | {_f(st[case + '_ms'], 0)} | {_f(st[case + '_peak_mb'], 0)} | "
                     f"{st['trainable_params'][case]:,} |")
    lines += [
        f"| **time ratio** adapt / finetune | **{_f(st['time_ratio'], 2)}** {_target('step', 'time_ratio', st['time_ratio'])} | | |",
        f"| **memory ratio** adapt / finetune | **{_f(st['mem_ratio'], 2)}** {_target('step', 'mem_ratio', st['mem_ratio'])} | | |",
        f"| reachable time ratio (finetune without backbone backward and optimizer) | {_f(st['reachable_time_ratio'], 2)} | | |",
        "",
        "Breakdown (ms, median):",
        "",
        "| case | backbone fwd | backbone bwd | adapters+neck+heads fwd | adapters+neck+heads bwd | optimizer |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case, b in st["breakdown"].items():
        lines.append(f"| {case} | {_f(b['backbone_fwd_ms'], 0)} | {_f(b['backbone_bwd_ms'], 0)} | "
                     f"{_f(b['rest_fwd_ms'], 0)} | {_f(b['rest_bwd_ms'], 0)} | {_f(b['optimizer_ms'], 0)} |")
    return lines


def _ray(ro: dict) -> list[str]:
    return [
        f"## 3. Ray Train overhead ({ro['model']}, {ro['input_size'][0]}x{ro['input_size'][1]}, batch {ro['batch']}, "
        f"{ro['steps']} timed steps a run, {ro['threads']['plain']} torch threads each; {ro['rounds']} TorchTrainer "
        f"runs, each between two plain runs)",
        "",
        "| loop | ms/step (median of the runs' medians) |",
        "| --- | --- |",
        f"| plain loop, one process | {_f(ro['plain_ms'], 0)} |",
        f"| TorchTrainer, 1 worker | {_f(ro['ray_ms'], 0)} |",
        f"| **ratio** (median over the TorchTrainer runs of its ms / the mean of the plain runs around it: "
        f"{', '.join(_f(r, 3) for r in ro['ratios'])}) | **{_f(ro['ratio'], 3)}** "
        f"{_target('ray_overhead', 'ratio', ro['ratio'])} |",
        f"| start-up (fit() to the worker's first line) | {_f(ro['startup_s'])} s |",
    ] + _cpu_account(ro)


def _share(sh: dict) -> list[str]:
    lines = [
        f"## 3b. Training beside idle-priority decoding ({sh['model']}, {sh['input_size'][0]}x{sh['input_size'][1]}, "
        f"batch {sh['batch']}, {sh['threads']} torch threads; the decoder makes {sh['decoder_input_size'][0]}x"
        f"{sh['decoder_input_size'][1]} rows at idle priority)",
        "",
        "| OpenMP waiting | step alone, ms | step beside the decoder, ms | decoder rows/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, label in (("openmp_default", "library default"), ("train_worker", "a training worker's")):
        v = sh[name]
        setting = ", ".join(f"{k}={x}" for k, x in v["openmp_wait"].items() if x is not None) or "unset"
        lines.append(f"| {label} ({setting}) | {_f(v['alone_ms'], 0)} | {_f(v['beside_ms'], 0)} | "
                     f"{_f(v['decoder_rows_s'], 2)} |")
    lines += [f"| **training worker / default** | {_f(sh['alone_ratio'], 3)} | {_f(sh['beside_ratio'], 3)} | "
              f"**{_f(sh['decoder_share_ratio'], 2)}** |"]
    return lines


def _cpu_account(ro: dict) -> list[str]:
    """Where the CPU went during the timed steps: the loop's own process and the others."""
    cpu = ro.get("cpu_ms_per_step") or {}
    if not cpu.get("ray"):
        return []
    names = [n for n in dict.fromkeys(list(cpu["ray"])[:6] + list(cpu["plain"])[:3])]
    lines = ["", "CPU ms per timed step, by process (the loop's own is `self`):", "",
             "| process | plain loop | TorchTrainer |", "| --- | --- | --- |"]
    for n in names:
        lines.append(f"| {n} | {_f(cpu['plain'].get(n, 0.0), 0)} | {_f(cpu['ray'].get(n, 0.0), 0)} |")
    others = ro["others_cpu_ms_per_step"]
    lines.append(f"| all but self | {_f(others['plain'], 0)} | {_f(others['ray'], 0)} |")
    return lines


def _lv(lv: dict) -> list[str]:
    return [
        f"## 4. LV-Adapter overhead ({lv['stage']} step, {lv['model']}, {lv['input_size'][0]}x{lv['input_size'][1]}, "
        f"batch {lv['batch']})",
        "",
        "| | ms/step | peak MB |",
        "| --- | --- | --- |",
        f"| without | {_f(lv['without_ms'], 0)} | {_f(lv['without_peak_mb'], 0)} |",
        f"| with LV-Adapter | {_f(lv['with_ms'], 0)} | {_f(lv['with_peak_mb'], 0)} |",
        f"| **ratio** | **{_f(lv['ratio'], 2)}** | |",
    ]


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if v is not None else "n/a (no bf16 peak known for this device)"


def _box_px(box: dict) -> float | None:
    """The largest anchor / target / final-box difference of the box check, over both detectors."""
    values = []
    for kind in ("faster_rcnn", "fcos"):
        r = box.get(kind) or {}
        values += [r.get("anchors_px"), r.get("boxes_px"), *(r.get("targets_px") or {}).values()]
    return None if any(v is None for v in values) or not values else max(values)


def _gpu(g: dict) -> list[str]:
    lines = ["## 5. GPU", ""]
    if not g.get("ran_on"):
        return lines + [g.get("why", "not run")]
    box = g.get("box_check") or {}
    box_px = _box_px(box)
    return lines + [
        f"Ran on {g['ran_on']}" + (f" ({g['gpu_name']})" if g.get("gpu_name") else "") +
        f"; amp {g['amp']}, channels_last {g['channels_last']}; 3-task {g['model']}-FPN at "
        f"{g['input_size'][0]}x{g['input_size'][1]} (1280x720 frames letterboxed), batch {g['batch']}, "
        "each stage in its own process.",
        "",
        "| metric | finetune | adapt | target |",
        "| --- | --- | --- | --- |",
        f"| step | {_f(g['step_ms'], 1)} ms | {_f(g['adapt_step_ms'], 1)} ms | |",
        f"| training images/s per device | {_f(g['train_img_s'])} | {_f(g['adapt_img_s'])} | "
        f"{_target('gpu', 'train_img_s', g['train_img_s'])} (finetune) |",
        f"| peak memory | {_f(g['peak_mb'], 0)} MB | {_f(g['adapt_peak_mb'], 0)} MB | |",
        f"| FLOPs per step (torch.utils.flop_counter, fwd + bwd) | {g['flops_per_step'] / 1e9:.1f} GFLOP | "
        f"{g['adapt_flops_per_step'] / 1e9:.1f} GFLOP | |",
        f"| **MFU** (dense bf16 peak {_f(g['bf16_peak_tflops'])} TFLOP/s) | **{_pct(g['mfu'])}** | {_pct(g['adapt_mfu'])} | |",
        f"| **adapt / finetune images/s** | | **{_f(g['adapt_over_finetune_img_s'], 2)}** | "
        f"{_target('gpu', 'adapt_over_finetune_img_s', g['adapt_over_finetune_img_s'])} |",
        f"| **adapt / finetune peak memory** | | **{_f(g['adapt_over_finetune_peak'], 2)}** | "
        f"{_target('gpu', 'adapt_over_finetune_peak', g['adapt_over_finetune_peak'])} |",
        f"| input pipeline images/s (data case) | {_f(g['pipeline_img_s'])} | | |",
        f"| pipeline headroom (pipeline / finetune images/s) | {_f(g['pipeline_headroom'], 2)} | | |",
        f"| fp32 vs bf16 box check on {box.get('device', 'n/a')} (largest anchor, target or final-box difference, "
        f"Faster R-CNN and FCOS) | {_f(box_px, 4)} px | | "
        f"{_target('gpu', 'box_px', box_px)} |",
    ]


def _compile(c: dict) -> list[str]:
    return [
        f"## 2b. torch.compile of the dense part ({c['stage']} step, {c['model']}, {c['input_size'][0]}x"
        f"{c['input_size'][1]}, batch {c['batch']}; backbone, adapters, FPN and seg heads compiled, detector eager)",
        "",
        "| | ms/step |",
        "| --- | --- |",
        f"| eager | {_f(c['eager_ms'], 0)} |",
        f"| compiled | {_f(c['compiled_ms'], 0)} |",
        f"| **speed-up** eager / compiled | **{_f(c['speedup'], 2)}** |",
        f"| compilation (first step, compiled minus eager) | {_f(c['compile_s'])} s |",
    ]


SECTION_WRITERS = {"data": _data, "stream": _stream, "step": _step, "compile": _compile, "ray_overhead": _ray, "idle_share": _share,
                   "lv_overhead": _lv,
                   "gpu": _gpu}


def bench_markdown(r: dict) -> str:
    m = r["machine"]
    quick = r.get("settings", {}).get("quick")
    lines = [
        "# paf-ray bench" + (" (--quick: tiny sizes, a smoke run, not a measurement)" if quick else ""),
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['cpu_model']}), GPU: {m.get('gpu_name') or 'none'}; "
        f"torch {m['torch']}, ray {m['ray']}, python {m['python']}; device `{m['device']}`; "
        f"load average at start {_f((m.get('load_avg_at_start') or [None])[0], 2)}; {m['date']}; "
        f"total {r.get('wall_s', 0):.0f} s" + ("" if r.get("complete") else " (incomplete)") + ".",
        "",
        "Medians over repeats after warm-up; every ratio compares cases measured in this run.",
    ]
    for name, writer in SECTION_WRITERS.items():
        section = r.get(name)
        if section is None and name not in r.get("cases", SECTION_WRITERS):
            continue  # not asked for (--cases)
        lines.append("")
        if section is None:
            lines.append(f"## {name}: not run (yet)")
        elif "error" in section:
            lines.append(f"## {name}: FAILED")
            lines += ["", "```", section["error"], "```"]
        else:
            lines += writer(section)
    lines.append("")
    return "\n".join(lines)
