"""`benchmarks.stream_plan --device meta` for both sides of ab.sh: before a764563 the builder planned
budget decodes on the device only for CUDA pools, so a meta pool took the host path there. This
routes a meta pool's budget-only batches to `budget_decodes` on either side (what the new code
does by itself), so both sides time the device plan's host part."""
import sys

import torch

from benchmarks import stream_plan
from vllm_kvcompress.eviction.threshold import ThresholdSchedule
from vllm_kvcompress.vllm import stream_layout

host_plan = stream_layout.packed_decodes


def packed_decodes(g, decodes, device="cpu", block_table=None):
    if torch.device(device).type == "meta" and block_table is not None and \
            not any(isinstance(d.schedule, ThresholdSchedule) for d in decodes):
        return stream_layout.budget_decodes(g, decodes, block_table)
    return host_plan(g, decodes, device, block_table)


stream_layout.packed_decodes = packed_decodes
stream_plan.main(sys.argv[1:])
