"""Method ``dms`` (Łańcucki et al., NeurIPS 2025): a retrofitted model's own learned
eviction decisions (adapters on the residual stream, or the single-neuron query channel;
:mod:`.hooks`), applied as a *delayed* :class:`~vllm_kvcompress.eviction.threshold.ThresholdRule`
on the keep score ``-z`` with threshold 0: a marked token stays visible for ``window``
more tokens, then its rows are freed."""

from __future__ import annotations

from dataclasses import dataclass

from vllm_kvcompress.eviction.threshold import ThresholdRule
from vllm_kvcompress.methods.base import (BudgetSettings, KVCompressConfigError, LearnedScores, Method, PagedSettings,
                                          check_path, key_name, setting)
from vllm_kvcompress.methods.dms.decisions import without_decision_channel


@dataclass(frozen=True)
class DMSSettings(PagedSettings):
    dms_adapters: str | None = setting(
        None, "DMS: decision adapters, a safetensors file from `python -m vllm_kvcompress.offline.dms_train` or an "
              "official Model-Optimizer DMS checkpoint folder (adapter variant). Required for `dms`.")
    dms_window: int | None = setting(
        None, "DMS: a marked token stays visible for this many more tokens before its rows are freed (default: the "
              "window the checkpoint was trained with; a multiple of `page_tokens`).")

    def validate(self) -> None:
        super().validate()
        check_path("dms_adapters", self.dms_adapters, "dms",
                   "a file from `python -m vllm_kvcompress.offline.dms_train --model MODEL --out DIR` or an official "
                   "DMS checkpoint folder")
        if self.dms_window is not None:
            self.check_window("dms_window")


class DMS(Method):
    name = "dms"
    Settings = DMSSettings
    summary = "evicts by a retrofitted model's own learned decisions, delayed by a window"
    evicts = True
    learned = True
    own_window = "dms_window"

    def __init__(self, settings: DMSSettings):
        super().__init__(settings)
        self._window: int | None = None

    @property
    def compiled_scores(self) -> bool:
        """Adapter checkpoints score through the buffered custom op (compiled graphs keep it);
        single-neuron ones change the query inside the attention, which only eager hooks do."""
        from vllm_kvcompress.methods.dms.checkpoint import DMSCheckpointError, checkpoint_single_neuron

        try:
            return not checkpoint_single_neuron(self.settings.dms_adapters)
        except DMSCheckpointError:  # a bad folder: check_model names the key and the reason
            return True

    @classmethod
    def foreign_key(cls, key, owners, evicting):
        if key in BudgetSettings.BUDGET_KEYS:
            return (f"method 'dms' takes no budget ({key_name('compression_ratio')}/{key_name('max_kv_tokens')}): "
                    "the model's learned decisions set what is kept; pick a checkpoint trained for the ratio you want")
        return super().foreign_key(key, owners, evicting)

    @property
    def window(self) -> int:
        """The configured window, else the checkpoint's; whole pages either way."""
        if self._window is None:
            self._window = self._resolve_window()
        return self._window

    def _resolve_window(self) -> int:
        from vllm_kvcompress.methods.dms.checkpoint import DMSCheckpointError, checkpoint_window

        s = self.settings
        if s.dms_window is not None:
            return s.dms_window
        try:
            window = checkpoint_window(s.dms_adapters)
        except DMSCheckpointError as exc:
            raise KVCompressConfigError(f"{key_name('dms_adapters')}: {exc}") from None
        if window % s.page_tokens:
            raise KVCompressConfigError(
                f"{s.dms_adapters} was trained with window {window}, not a multiple of "
                f"{key_name('page_tokens')}={s.page_tokens}; set page_tokens to a divisor of it")
        return window

    def load(self, shape):
        from vllm_kvcompress.methods.dms.checkpoint import load_decisions

        return load_decisions(self.settings.dms_adapters, shape.num_layers, shape.hidden_size, shape.num_kv_heads,
                              shape.rms_norm_eps)

    def check_model(self, shape, hf_config, block_size, tp_size) -> None:
        from vllm_kvcompress.methods.dms.checkpoint import DMSCheckpointError

        try:
            decisions = self.load(shape)
        except DMSCheckpointError as exc:
            raise KVCompressConfigError(f"{key_name('dms_adapters')}: {exc}") from None
        if decisions.single_neuron and decisions.per_layer and tp_size > 1:
            raise KVCompressConfigError(
                f"{key_name('dms_adapters')}: {self.settings.dms_adapters} decides every head from query head 0's "
                "channel (single-neuron, dms_alpha_per=layer), which only rank 0 holds under tensor parallelism; use "
                "tensor_parallel_size=1")
        self.window  # noqa: B018  (resolves and checks the window now, at start-up)

    def rule(self):
        return ThresholdRule(0.0, self.window, delayed=True)  # keep score -z: evicted iff z > 0

    def schedule(self, prompt_len, budget, streams):
        return self.rule().schedule(prompt_len, streams.count, self.settings.page_tokens, streams.block_size)

    def install(self, model, shape, heads, tp_size, device, record, max_tokens=None):
        from vllm_kvcompress.methods.dms import hooks

        decisions = self.load(shape)
        decisions.adapters = [a.to(device) for a in decisions.adapters]
        decisions.heads = heads
        if max_tokens is not None:  # the engine, compiled or eager: scores into persistent buffers
            handles, buffers, install = hooks.install_buffered(model, decisions, max_tokens, record)
            return LearnedScores(handles, score_buffers=buffers, scores_install=install)
        # The single-neuron hook sees this rank's query heads only.
        handles = hooks.install(model, decisions, record, shape.num_layers, shape.num_attention_heads // tp_size,
                                len(heads))
        if not decisions.single_neuron:
            return LearnedScores(handles)
        num_kv_heads = len(heads)
        return LearnedScores(handles, lambda query: without_decision_channel(query, num_kv_heads))
