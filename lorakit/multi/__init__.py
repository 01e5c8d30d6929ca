"""Many adapters on one base: a RAM cache with hot switching (cache), weighted combination (combine) and parallel
training of several adapters over one base pass (parallel)."""

from lorakit.multi.cache import AdapterCache, CacheError, prepare_slot
from lorakit.multi.combine import COMBINATION_TYPES, CombinationError
from lorakit.multi.parallel import JobStep, ParallelJob, ParallelTrainer, train_parallel

__all__ = [
    "COMBINATION_TYPES",
    "AdapterCache",
    "CacheError",
    "CombinationError",
    "JobStep",
    "ParallelJob",
    "ParallelTrainer",
    "prepare_slot",
    "train_parallel",
]
