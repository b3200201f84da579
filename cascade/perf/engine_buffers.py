"""Device buffers that DeepSpeed ZeRO-2 allocates beside the model, at the sizes cascade sets
(`stages/engines.py::ZERO_BUCKETS`), read from DeepSpeed 0.19's stage_1_and_2.py:
- the reduce bucket(s): `reduce_bucket_size` elements in the gradient dtype (bf16 here), two of them
  when `overlap_comm` is on;
- under optimizer offload, `temp_grad_buffer_for_gpu_offload`: as many elements as the largest
  parameter, in the module's dtype.
The allgather bucket needs no buffer of its own on one process (nothing to gather), so it is not
counted; with DeepSpeed's defaults (no bucket keys: 5e8 elements) the reduce bucket alone is 1 GB."""
from __future__ import annotations

from stages.engines import ZERO_BUCKETS


def zero_offload_bytes(params, buckets: dict = ZERO_BUCKETS, grad_bytes: int = 2, module_bytes: int = 2) -> int:
    """Bytes of ZeRO-2's reduce bucket(s) plus the offload's largest-parameter gradient buffer."""
    n_buckets = 2 if buckets.get("zero_optimization.overlap_comm") else 1
    reduce = int(buckets["zero_optimization.reduce_bucket_size"]) * grad_bytes * n_buckets
    return reduce + max(p.numel() for p in params) * module_bytes
