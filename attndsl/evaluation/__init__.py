"""`attndsl eval` (docs/eval.md): tiny models trained on the CPU over patterns on recall
tasks, scored per distance band against each pattern's analysed reach."""

from attndsl.evaluation.result import EvalResult
from attndsl.evaluation.runner import CONTROL_SOURCE, evaluate
from attndsl.evaluation.tasks import TASKS, Task

__all__ = ["CONTROL_SOURCE", "TASKS", "EvalResult", "Task", "evaluate"]
