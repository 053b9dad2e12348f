"""Running a pruning job: `prune(cfg)` (run/prune.py), the job object (job.py), the loop (loop.py),
checkpoints (checkpoint.py), data parallelism (dist.py) and the outputs (rundir.py, report.py)."""
from .loop import Hooks, RunInterrupted, TrainingDiverged
from .prune import prune

__all__ = ["prune", "Hooks", "RunInterrupted", "TrainingDiverged"]
