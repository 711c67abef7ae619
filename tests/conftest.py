"""Shared fixtures: a tiny Llama and LoRA adapters really trained on it with peft."""

from __future__ import annotations

import os
import shutil

# Without a GPU, Triton kernels run in its interpreter. The variable must be set before
# anything imports triton (torch._dynamo, pulled in by peft/transformers, does), so it is
# set here, first. nvidia-smi absent is the cheap proxy for "no GPU" before torch loads.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import copy  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from _backends import BACKENDS, make_backend, triton_interpreted, triton_mode_line  # noqa: E402

from robustmerge_kernels.demo.toy import tiny_llama, train_adapter  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)

# Triton's interpreter runs the kernels in Python: in the fast lane (-m "not slow") the
# interpreted Triton tests run for this one input dtype, the others are marked slow.
INTERPRETER_FAST_DTYPE = torch.float32


def pytest_report_header(config):
    """Say which way the Triton kernels run, so a GPU log shows they were compiled."""
    return triton_mode_line()


def pytest_collection_modifyitems(config, items):
    try:
        interpreted = triton_interpreted()
    except ImportError:
        return
    if not interpreted:
        return
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("backend") != "triton" and item.path.name != "test_triton_backend.py":
            continue
        dtype = params.get("dtype")
        if isinstance(dtype, torch.dtype) and dtype != INTERPRETER_FAST_DTYPE:
            item.add_marker(pytest.mark.slow)
        # @pytest.mark.interpreter_slow(unless=predicate on the params): slow under the
        # interpreter, except the parameter combinations the predicate keeps fast.
        mark = item.get_closest_marker("interpreter_slow")
        if mark is not None:
            unless = mark.kwargs.get("unless")
            if unless is None or not unless(params):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The kernel backend under test (see tests/_backends.py), one test per backend (cpu,
    triton, cuda); skips where it cannot run. A test may parametrize ``backend`` itself,
    indirectly (per-backend shape lists); test_errors.py overrides it with its own."""
    return make_backend(request.param, monkeypatch)


@pytest.fixture(scope="session")
def base_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def trained_models(base_model):
    """Three peft models, one per toy task, trained for a few optimizer steps.

    One thread: the model is tiny, and on a busy 2-core machine torch's thread pool
    competing with another process makes training 100x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [train_adapter(base_model, task, steps=8, r=4, lora_alpha=8, lr=2e-2) for task in range(3)]
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def adapter_dirs(trained_models, tmp_path_factory):
    """The trained adapters saved as PEFT folders (adapter_config.json + safetensors)."""
    root = tmp_path_factory.mktemp("adapters")
    folders = []
    for i, model in enumerate(trained_models):
        folder = root / f"task{i}"
        model.save_pretrained(str(folder))
        folders.append(str(folder))
    return folders


@pytest.fixture
def fresh_base(base_model):
    return copy.deepcopy(base_model)


def lora_pair(seed: int, r: int = 4, n: int = 12, m: int = 10, modules=("q", "v"), dtype=torch.float32, alpha=8):
    """A small synthetic adapter as a (state_dict, config) pair with PEFT key names."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in modules:
        prefix = f"base_model.model.layers.0.{name}"
        sd[f"{prefix}.lora_A.weight"] = (torch.rand(r, n, generator=g) * 2 - 1).to(dtype)
        sd[f"{prefix}.lora_B.weight"] = (torch.randn(m, r, generator=g) * 0.1).to(dtype)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(modules)}
    return sd, config


def pytest_configure(config):
    # pyproject.toml may register it too; add it only when absent, so there is no warning either way.
    if not any(str(line).startswith("slow") for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: takes more than a few seconds (deselect with -m 'not slow')")


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory):
    """The merge record's hash memory (adapter_io/record.py) in a folder of this run, not the
    user's ~/.cache: tests must not depend on, or leave behind, hashes of earlier runs."""
    os.environ["ROBUSTMERGE_CACHE_DIR"] = str(tmp_path_factory.mktemp("hash-cache"))
