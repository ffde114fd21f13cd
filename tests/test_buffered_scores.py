"""The learned methods' scores through one custom op into persistent buffers
(methods/buffered_scores.py): compiled graphs keep the op, and what it scores with is the
active install's, not a number baked into the graph."""

import torch

from vllm_kvcompress.methods import buffered_scores


class _Layer(torch.nn.Module):
    def forward(self, positions, hidden_states, residual):
        return hidden_states * 2, (hidden_states if residual is None else hidden_states + residual)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Layer(), _Layer()])

    def forward(self, hidden):
        residual = None
        for layer in self.layers:
            hidden, residual = layer(None, hidden, residual=residual)
        return hidden + residual


def _stream(args, kwargs):  # DMS's input: the residual stream entering the layer
    hidden, residual = args[1], kwargs.get("residual")
    return hidden if residual is None else hidden + residual


def _install(model, weights):
    return buffered_scores.install({i: layer for i, layer in enumerate(model.layers)},
                                   lambda layer: lambda x: x.float() @ weights[layer], 2, torch.device("cpu"),
                                   _stream, 16, lambda *_: None)


def _expected(x, weights):
    first = x @ weights[0]
    second = (2 * x + x) @ weights[1]  # hidden 2x plus the residual x
    return first, second


def test_compiled_graph_keeps_the_op_and_scores_with_the_active_install():
    torch.manual_seed(0)
    model = _Model()
    ours, theirs = [torch.randn(8, 2) for _ in range(2)], [torch.randn(8, 2) for _ in range(2)]
    _, buffers, number = _install(model, ours)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (5, 7):  # one graph for both sizes: the scores follow the step
        x = torch.randn(tokens, 8)
        compiled(x)
        for buffer, want in zip(buffers, _expected(x, ours)):
            torch.testing.assert_close(buffer[:tokens], want)
    # A second engine in the process installs its own scorers; each step activates its own.
    other = _Model()
    _, other_buffers, other_number = _install(other, theirs)
    assert other_number != number
    x = torch.randn(6, 8)
    buffered_scores.activate(number)
    compiled(x)  # the graph traced under the first install scores with whichever is active
    for buffer, want in zip(buffers, _expected(x, ours)):
        torch.testing.assert_close(buffer[:6], want)
    buffered_scores.activate(other_number)
    other(x)
    for buffer, want in zip(other_buffers, _expected(x, theirs)):
        torch.testing.assert_close(buffer[:6], want)
    # Nothing of the install is baked into the compiled graph (vLLM may load a graph saved by
    # another process, where the numbers differ): it scores with the active install.
    compiled(x)
    for buffer, want in zip(buffers, _expected(x, theirs)):
        torch.testing.assert_close(buffer[:6], want)
