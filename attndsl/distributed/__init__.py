"""Context parallelism on torch.distributed, derived from the block tables: the sequence is
sharded over ranks and each rank receives exactly the key blocks its queries attend
(docs/distributed.md). `attndsl cp-plan` evaluates the same layouts without running."""

from attndsl.distributed.dispatch import DISPATCHES
from attndsl.distributed.parallel import ContextParallel

__all__ = ["DISPATCHES", "ContextParallel"]
