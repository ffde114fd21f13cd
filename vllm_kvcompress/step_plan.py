"""The worker's per-step eviction plan, handed from the model runner to the attention
metadata builder in the same process: the compression schedule of each batch row (in
``input_batch`` order), or None when no eviction runs this step (dummy/profile runs)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm_kvcompress.eviction.schedule import CompressionSchedule

if TYPE_CHECKING:
    import torch

rows: list[CompressionSchedule | None] | None = None
req_ids: list[str] = []
# eviction_mode "mask" only: {req_id: {layer: visible rows [H, capacity] bool}}
masks: dict[str, dict[int, "torch.Tensor"]] = {}
# headkv/kvzap: {req_id: (StreamPageTable, global page ids per stream)} of packed requests
stream_tables: dict[str, tuple] = {}
# kvzap: {layer: predicted scores [tokens, KV heads]} of the step (set by the pre-hooks),
# one score per pool row (moved with the rows), and in threshold mode the survivors
# [layers, KV heads] of each packed request and the pages each needs for its next step
# (collected for the scheduler after the step).
token_scores: dict[int, "torch.Tensor"] = {}
score_store: "torch.Tensor | None" = None
kept: dict[str, "torch.Tensor"] = {}
pages_reports: dict[str, int] = {}
# DMS single-neuron checkpoints: zero the decision channel of every GQA group's first
# query head after RoPE too, as the official code does.
zero_query_channel = False
predictor_seconds = 0.0  # time spent in the predictors (the hooks), for the overhead benchmark
num_blocks: int | None = None  # blocks in the KV pool (set when the runner allocates it)
