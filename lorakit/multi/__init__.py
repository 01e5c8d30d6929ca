"""Many adapters on one base: a RAM cache with hot switching (cache) and weighted combination (combine)."""

from lorakit.multi.cache import AdapterCache, CacheError, prepare_slot
from lorakit.multi.combine import COMBINATION_TYPES, CombinationError

__all__ = ["COMBINATION_TYPES", "AdapterCache", "CacheError", "CombinationError", "prepare_slot"]
