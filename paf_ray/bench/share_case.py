"""Training beside idle-priority decoding: how much of the cores a training step leaves free.

On a machine without spare cores the pipeline decodes at idle CPU priority (``data.decode_priority``),
so it runs only where training leaves a core idle. A training step on two torch threads waits
hundreds of times (OpenMP barriers, one thread's tail of work); how a waiting thread waits decides
whether the core is idle: libgomp lets it spin 300,000 times first, and a spinning thread is
running. This case times the same step alone and then beside a process that decodes rows with the
pipeline's row function, at the pipeline's idle priority, as fast as it is let; the step's process
runs with OpenMP's default waiting or with a training worker's (``train.step.TRAIN_PROCESS_ENV``).
The decoder's rows/s is the share of the cores a training worker leaves to the input pipeline.
The step side is ``step_case.steps_beside_decoder``; this module is the decoder process.
"""

from __future__ import annotations


def decode_until_stopped(records: list[dict], data_cfg, stop, rows) -> None:
    """The decoder process: the pipeline's row function on `records` in turn, each on the
    pipeline's idle-priority thread, until `stop` is set; `rows` counts the rows made."""
    from paf_ray.data.pipeline import load_row, run_at_idle_priority

    i = 0
    while not stop.is_set():
        run_at_idle_priority(load_row, records[i % len(records)], data_cfg, True)
        i += 1
        with rows.get_lock():
            rows.value += 1
