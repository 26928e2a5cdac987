"""Simulation-based inference: the sbibm benchmark tasks and their reference posteriors."""

from flowforge.sbi.reference import PosteriorReference, load_reference
from flowforge.sbi.tasks import TASKS, Task, make_task

__all__ = ["TASKS", "PosteriorReference", "Task", "load_reference", "make_task"]
