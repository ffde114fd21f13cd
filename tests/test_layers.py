"""The package's layers, from the imports in the code (lazy ones included): each layer
imports only itself and the layers below it, so serving never imports the offline tools
or the harness, and the kernels know nothing of the plugin. The order, bottom first:

    kernels, errors  <  eviction  <  methods  <  config, presets  <  vllm (serving glue)  <  offline  <  harness
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LAYERS = ["kernels", "eviction", "methods", "config", "vllm", "offline", "harness"]


def layer_of(module: str) -> int | None:
    """Rank of a ``vllm_kvcompress`` module (None: not the plugin's)."""
    parts = module.split(".")
    if parts[0] != "vllm_kvcompress":
        return None
    if len(parts) == 1 or parts[1] in ("errors", "kernels"):  # the package's constants, the error type
        return 0
    if parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    if parts[1] == "presets":  # settings that stand for settings: the config layer
        return LAYERS.index("config")
    return 0 if len(parts) == 2 and not (ROOT / "vllm_kvcompress" / parts[1]).exists() and \
        not (ROOT / "vllm_kvcompress" / f"{parts[1]}.py").exists() else None


def sources():
    for path in sorted((ROOT / "vllm_kvcompress").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        yield module.removesuffix(".__init__"), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "vllm_kvcompress.kernels." + path.stem, path


def imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_every_module_has_a_layer():
    for module, path in sources():
        assert layer_of(module) is not None, f"{path}: in no layer of {LAYERS}"


@pytest.mark.parametrize("module,path", list(sources()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_no_upward_import(module, path):
    own = layer_of(module)
    for line, name in imports(path):
        target = layer_of(name)
        assert target is None or target <= own, (
            f"{path.relative_to(ROOT)}:{line} imports {name} ({LAYERS[target]}) from layer {LAYERS[own]}")


def test_a_wrong_import_is_caught(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from vllm_kvcompress.offline.calibrate import main\n")
    (line, name), = imports(bad)
    assert layer_of(name) > layer_of("vllm_kvcompress.vllm.backend") and line == 2
