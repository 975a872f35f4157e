"""Tasks as plug-ins: one module per task behind the protocol of ``tasks/base.py``.

``TASKS`` holds every registered task: the built-in ones below, and any a config's ``plugins:``
imports. ``DEFAULT_TASKS`` are the tasks a config trains when it names none (the paper's three).
"""

# each registers itself; the order of registration is the order of heads, metrics and tables
from paf_ray.tasks import det  # noqa: F401  isort: skip
from paf_ray.tasks import sem  # noqa: F401  isort: skip
from paf_ray.tasks import drv  # noqa: F401  isort: skip
from paf_ray.tasks import lane  # noqa: F401  isort: skip
from paf_ray.tasks.base import HeadInput, MetricsInputError, Task
from paf_ray.tasks.registry import TASKS

DEFAULT_TASKS = ("det", "sem", "drv")


def ordered(names) -> list[Task]:
    """The tasks of `names`, in registry order (the order heads, metrics and tables list them)."""
    wanted = set(names)
    return [t for t in TASKS if t.name in wanted]


__all__ = ["DEFAULT_TASKS", "HeadInput", "MetricsInputError", "TASKS", "Task", "ordered"]
