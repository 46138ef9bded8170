"""Tensor parallelism on torch.distributed: the shard plan, the process groups, the split
embedding/head, and the driver and worker processes of a tensor-parallel engine."""
from pixtral_fast.parallel.comm import Collectives, TensorParallelError
from pixtral_fast.parallel.plan import ShardPlan

__all__ = ["Collectives", "ShardPlan", "TensorParallelError"]
