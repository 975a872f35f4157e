"""The task registry (each task module registers its Task here when imported)."""

from __future__ import annotations

from paf_ray.registry import Registry
from paf_ray.tasks.base import Task

TASKS: Registry[Task] = Registry("task")
