"""What travels from the worker to the scheduler besides vLLM's own output."""

from __future__ import annotations

import dataclasses

from vllm.v1.outputs import ModelRunnerOutput


@dataclasses.dataclass
class KVCompressRunnerOutput(ModelRunnerOutput):
    """vLLM's runner output plus the stream pages each ring-layout request needs for its
    next step (data-dependent survivors: the scheduler cannot compute them)."""

    pages_next: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, output: ModelRunnerOutput, pages_next: dict[str, int]) -> "KVCompressRunnerOutput":
        fields = {f.name: getattr(output, f.name) for f in dataclasses.fields(ModelRunnerOutput)}
        return cls(**fields, pages_next=pages_next)
