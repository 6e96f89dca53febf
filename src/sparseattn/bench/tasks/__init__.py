"""The offline long-context task suite: generated from a seed, exact token lengths, own text."""

from . import aggregation, documents, niah  # noqa: F401  (registration side effects)
from .base import TASKS, Task, TaskSample, build_task, list_tasks, register_task

__all__ = ["TASKS", "Task", "TaskSample", "build_task", "list_tasks", "register_task"]
