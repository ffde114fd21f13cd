"""The worker's per-step eviction plan, handed from the model runner to the attention
metadata builder in the same process: the compression schedule of each batch row (in
``input_batch`` order), or None when no eviction runs this step (dummy/profile runs)."""

from __future__ import annotations

from vllm_kvcompress.eviction.schedule import CompressionSchedule

rows: list[CompressionSchedule | None] | None = None
req_ids: list[str] = []
# eviction_mode "mask" only: {req_id: {layer: visible rows [H, capacity] bool}}
masks: dict[str, dict[int, "torch.Tensor"]] = {}
# headkv only: {req_id: (StreamPageTable, global page ids per stream)} of packed requests
stream_tables: dict[str, tuple] = {}
num_blocks: int | None = None  # blocks in the KV pool (set when the runner allocates it)
