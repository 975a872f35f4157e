"""`paf-ray score TASK GT PRED [--json]`: score files in a task's official format (paf_ray/tasks).

The arguments after TASK are the task's own (``Task.add_score_arguments``); the task registry is
read when the command runs, so `paf-ray --help` does not import the tasks.
"""

from __future__ import annotations

import argparse
import json
import sys


def score_command(args) -> int:
    from paf_ray.eval.evaluator import json_safe
    from paf_ray.tasks import TASKS, MetricsInputError

    if args.task in ("-h", "--help"):
        print(f"usage: paf-ray score TASK GT PRED [--json]   (TASK: {', '.join(TASKS.names())}; "
              "paf-ray score TASK --help for its arguments)")
        return 0
    if args.task not in TASKS:
        print(f"paf-ray score: unknown task {args.task!r} (registered: {', '.join(TASKS.names())})", file=sys.stderr)
        return 2
    task = TASKS[args.task]
    parser = argparse.ArgumentParser(prog=f"paf-ray score {task.name}",
                                     description=f"{task.title}: the official metric on files in the official format")
    task.add_score_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    task_args = parser.parse_args(args.rest)
    try:
        result = task.score(task_args)
    except (MetricsInputError, ValueError) as e:
        print(f"paf-ray score {task.name}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(json_safe(task.score_json(result))) if task_args.json else task.score_table(result))
    return 0
