"""The host-side shortcuts of merge() on state dicts (benchmarks/merge_host_cost.py) must
give exactly what the per-tensor code gives: the same plans, the same errors, the same
results, and nothing remembered from an earlier merge but what key strings alone decide."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import lora_pair

import robustmerge_kernels as rk
from robustmerge_kernels import plan as plan_mod
from robustmerge_kernels.adapter_io import keys as keys_mod
from robustmerge_kernels.adapter_io.sources import _from_state_dict, _refuse_first, open_adapter
from robustmerge_kernels.errors import AdapterError
from robustmerge_kernels.params import RobustMergeParams
from robustmerge_kernels.pipeline import RobustMergeRun
from robustmerge_kernels.plan import build_plan


def _pairs(T=3, **kw):
    return [lora_pair(seed, **kw) for seed in range(T)]


def _plan(adapters, dtype=None):
    return build_plan([open_adapter(a, i) for i, a in enumerate(adapters)], dtype)


def _per_adapter_plan(adapters, monkeypatch, dtype=None):
    """The plan with the shortcut off: every module checked once per adapter."""
    with monkeypatch.context() as m:
        m.setattr(plan_mod, "_classes", lambda *args: None)
        return _plan(adapters, dtype)


def _error(fn):
    with pytest.raises(AdapterError) as info:
        fn()
    return str(info.value)


def _with_config(adapters, **changes):
    return [(sd, {**cfg, **changes}) for sd, cfg in adapters]


def test_memoised_key_results_cannot_be_changed_by_a_caller():
    parsed = keys_mod.parse_factor("base_model.model.x.lora_A.default.weight")
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.module = "other"  # would poison every later plan that parses this key
    assert keys_mod.parse_factor("base_model.model.x.lora_A.default.weight").module == "base_model.model.x"


def _uniform_cases():
    pairs = _pairs()
    patterned = _with_config(pairs, rank_pattern={"v": 4}, alpha_pattern={"q": 2.0})
    alphas = [(sd, {**cfg, "lora_alpha": 4 * (t + 1)}) for t, (sd, cfg) in enumerate(pairs)]
    return {
        "constant-config": (pairs, None),
        "patterns": (patterned, None),
        "alphas-differ": (alphas, None),
        "rslora": (_with_config(pairs, use_rslora=True), None),
        "no-config": ([sd for sd, _ in pairs], None),
        "fp16-default-dtype": (_pairs(dtype=torch.float16), None),
        "bf16-to-fp16": (_pairs(dtype=torch.bfloat16), torch.float16),
        "llava-hf-layout-with-projector": (_llava_pairs(), None),
        "llava-two-layouts": (_llava_pairs()[:2] + [_original_layout(_llava_pairs()[2])], None),
        "partial-module": (pairs[:2] + [lora_pair(2, modules=("q",))], None),
        "two-dtypes": (pairs[:2] + [lora_pair(2, dtype=torch.bfloat16)], None),
        "float64-first": ([lora_pair(0, dtype=torch.float64)] + pairs[1:], None),  # its dtype is the output's
        "embedding-then-linear-spelling": ([_embedding_spelling(pairs[0])] + pairs[1:], None),
        "two-classes-with-patterns": (patterned[:1] + [lora_pair(7, modules=("v", "q"))] + patterned[2:], None),
        "more-classes-than-the-shortcut-takes": (_distinct_key_lists(plan_mod.MAX_CLASSES + 1), None),
    }


def _original_layout(adapter):
    """The same adapter as original LLaVA names it (another key list)."""
    sd, cfg = adapter
    rename = {"model.language_model.": "model.", "model.multi_modal_projector.linear_1.": "model.mm_projector.0."}
    out = {}
    for key, value in sd.items():
        for old, new in rename.items():
            key = key.replace("base_model.model." + old, "base_model.model." + new)
        out[key] = value
    return out, cfg


def _embedding_spelling(adapter):
    """The adapter with its factors saved as PEFT saves an embedding's (the first spelling names the output)."""
    sd, cfg = adapter
    return {k.replace(".lora_A.weight", ".lora_embedding_A").replace(".lora_B.weight", ".lora_embedding_B"): v
            for k, v in sd.items()}, cfg  # fmt: skip


def _distinct_key_lists(T):
    out = []
    for sd, cfg in _pairs(T):
        out.append(({**sd, f"base_model.model.extra_{len(out)}.weight": torch.ones(2)}, cfg))
    return out


def _llava_pairs(T=3):
    out = []
    for t in range(T):
        g = torch.Generator().manual_seed(t)
        sd = {
            "base_model.model.model.language_model.layers.0.q_proj.lora_A.weight": torch.randn(4, 8, generator=g),
            "base_model.model.model.language_model.layers.0.q_proj.lora_B.weight": torch.randn(6, 4, generator=g),
            "base_model.model.model.multi_modal_projector.linear_1.weight": torch.randn(5, 3, generator=g),
        }
        out.append((sd, {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))
    return out


@pytest.mark.parametrize("case", sorted(_uniform_cases()))
def test_shortcut_plan_equals_the_per_adapter_plan(case, monkeypatch):
    adapters, dtype = _uniform_cases()[case]
    fast = _plan(adapters, dtype)
    slow = _per_adapter_plan(adapters, monkeypatch, dtype)
    assert fast.modules == slow.modules  # frozen dataclasses: every field, b_scale floats exactly
    assert fast.means == slow.means and fast.layout == slow.layout and fast.out_config == slow.out_config


def _break(adapters, key_suffix, value):
    """Every adapter's tensor ending in key_suffix replaced (they stay uniform)."""
    out = []
    for sd, cfg in adapters:
        sd = dict(sd)
        key = next(k for k in sd if k.endswith(key_suffix))
        sd[key] = value
        out.append((sd, cfg))
    return out


def _failing_uniform_cases():
    pairs = _pairs()
    huge = [(sd, {**cfg, "lora_alpha": 1e300 if t == 0 else 1e-300}) for t, (sd, cfg) in enumerate(pairs)]
    return {
        "1-d factor": _break(pairs, "v.lora_A.weight", torch.ones(12)),
        "integer dtype": _break(pairs, "v.lora_B.weight", torch.ones(10, 4, dtype=torch.int64)),
        "empty factor": (
            _break(_break(pairs, "q.lora_A.weight", torch.ones(0, 12)), "q.lora_B.weight", torch.ones(10, 0))
        ),
        "empty lora_A": _break(pairs, "q.lora_A.weight", torch.ones(4, 0)),
        "empty lora_B": _break(pairs, "q.lora_B.weight", torch.ones(0, 4)),
        "rank mismatch inside": _break(pairs, "q.lora_B.weight", torch.ones(10, 3)),
        "config r differs": _with_config(pairs, r=8),
        "pattern r differs": _with_config(pairs, rank_pattern={"v": 2}),
        "scaling ratio underflows": huge,
        "rank differs between classes": pairs[:2] + [lora_pair(2, r=2)],
        "base shape differs between classes": [lora_pair(2, n=5)] + pairs[1:],
        "one class breaks": pairs[:1] + _break(pairs[1:], "v.lora_A.weight", torch.ones(4, 12, dtype=torch.int8)),
    }


@pytest.mark.parametrize("case", sorted(_failing_uniform_cases()))
def test_shortcut_plan_raises_the_per_adapter_error(case, monkeypatch):
    adapters = _failing_uniform_cases()[case]
    expected = _error(lambda: _per_adapter_plan(adapters, monkeypatch))
    assert _error(lambda: _plan(adapters)) == expected
    assert "adapter #" in expected  # named, as every plan error is
    assert _classes_taken(adapters)


def _classes_taken(adapters):
    """The case is one the shortcut sees (not left to the per-adapter plan from the start)."""
    sources = [open_adapter(a, i) for i, a in enumerate(adapters)]
    return plan_mod._classes(sources, [plan_mod._collect(s) for s in sources]) is not None


def test_adapter_classes_are_their_keys_shapes_and_dtypes():
    def classes(adapters):
        sources = [open_adapter(a, i) for i, a in enumerate(adapters)]
        return plan_mod._classes(sources, [plan_mod._collect(s) for s in sources])

    assert classes(_pairs(4)) == [0, 0, 0, 0]
    assert classes([lora_pair(0), lora_pair(1, r=2), lora_pair(2), lora_pair(3, dtype=torch.float16)]) == [0, 1, 0, 2]
    assert classes([lora_pair(0), lora_pair(1, modules=("v", "q"))]) == [0, 1]  # another key order
    assert classes(_distinct_key_lists(plan_mod.MAX_CLASSES + 1)) is None


def test_a_key_list_reused_with_other_shapes_and_dtypes_is_planned_anew():
    first = _plan(_pairs(r=4))  # remembers this key list
    again = _plan(_pairs(r=2, n=7, dtype=torch.bfloat16))  # the same key strings
    assert (again.modules[0].rank, again.modules[0].in_features) == (2, 7)
    assert first.modules[0].rank == 4
    assert again.modules[0].out_dtype == torch.float32  # from the bf16 inputs, not the earlier fp32 ones
    assert again.modules[0].nbytes_in == 3 * (2 * 7 + 10 * 2) * 2
    bad = _break(_pairs(r=2), "q.lora_A.weight", torch.ones(2, 12, dtype=torch.int32))
    assert "dtype torch.int32 is not a floating-point type" in _error(lambda: _plan(bad))
    mixed = _pairs(r=4)
    mixed[2] = lora_pair(2, r=2)
    assert "rank differs" in _error(lambda: _plan(mixed))


def test_a_key_list_error_names_each_adapter_that_has_it():
    sd, cfg = lora_pair(0)
    sd["base_model.model.layers.0.q.lora_magnitude_vector"] = torch.ones(10)
    for index in (0, 1):  # the second failure is not served from the first one's
        adapters = [lora_pair(5), (sd, cfg)] if index else [(sd, cfg), lora_pair(5)]
        assert _error(lambda adapters=adapters: _plan(adapters)).startswith(f"adapter #{index}, tensor ")


def test_a_state_dict_changed_between_merges_gives_the_new_result():
    adapters = _pairs()
    before = rk.merge(adapters, backend="reference")
    sd0, sd1 = adapters[0][0], adapters[1][0]
    key = next(iter(sd0))
    sd0[key].mul_(-3.0)  # in place: same tensor object, same address
    sd1[key] = torch.randn(sd1[key].shape, generator=torch.Generator().manual_seed(9))  # a new tensor
    adapters[2][1]["lora_alpha"] = 2  # another scaling
    after = rk.merge(adapters, backend="reference")
    fresh = rk.merge(copy.deepcopy(adapters), backend="reference")
    assert after.keys() == fresh.keys()
    assert all(torch.equal(after[k], fresh[k]) for k in fresh)
    assert not all(torch.equal(after[k], before[k]) for k in before)


def test_state_dict_tensors_are_taken_as_given_unless_autograd_or_a_subclass_holds_them():
    plain = torch.randn(4, 12)
    grad = torch.randn(10, 4, requires_grad=True)
    param = torch.nn.Parameter(torch.randn(4, 12), requires_grad=False)
    source = _from_state_dict({"p": plain}, None, "#0")
    assert source.get("p") is plain  # detach() would only have made an alias of it
    detached = _from_state_dict({"p": plain, "g": grad}, None, "#0")
    assert not detached.get("g").requires_grad and detached.get("g").data_ptr() == grad.data_ptr()
    assert type(_from_state_dict({"w": param}, None, "#0").get("w")) is torch.Tensor
    assert source.shape("p") == (4, 12) and type(source.shape("p")) is tuple
    assert source.device == torch.device("cpu")


def test_merge_neither_changes_nor_aliases_its_inputs():
    adapters = _pairs()
    copies = copy.deepcopy(adapters)
    merged = rk.merge(adapters, backend="reference")
    for (sd, _), (orig, _) in zip(adapters, copies):
        assert all(torch.equal(sd[k], orig[k]) for k in orig)
    inputs = {x.untyped_storage().data_ptr() for sd, _ in adapters for x in sd.values()}
    assert not inputs & {x.untyped_storage().data_ptr() for x in merged.values()}


BAD_DICTS = ("key not a string", "not a tensor", "sparse", "meta", "nested", "quantized", "first of two problems")


def _bad_dicts():
    sparse = torch.eye(3).to_sparse()
    meta = torch.empty(2, 2, device="meta")
    ok = torch.ones(2, 2)
    return {
        "key not a string": {"a": ok, 3: ok},
        "not a tensor": {"a": ok, "b": [1.0]},
        "sparse": {"a": ok, "b": sparse},
        "meta": {"a": ok, "b": meta},
        "nested": {"a": ok, "b": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])},
        "quantized": {"a": ok, "b": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)},
        "first of two problems": {"a": ok, "m": meta, "s": sparse},
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # nested / quantized tensor construction warns
@pytest.mark.parametrize("case", BAD_DICTS)
def test_state_dict_errors_are_those_of_the_per_tensor_checks(case):
    sd = _bad_dicts()[case]
    expected = _error(lambda: _refuse_first(list(sd), list(sd.values()), "#1"))
    assert _error(lambda: _from_state_dict(sd, None, "#1")) == expected
    assert expected.startswith("adapter #1")


def test_resident_inputs_are_what_load_returns(monkeypatch):
    sources = [open_adapter(a, i) for i, a in enumerate(_pairs())]
    plan = build_plan(sources)
    run = RobustMergeRun(plan, sources, RobustMergeParams(), "reference", torch.device("cpu"))
    assert run._resident() is not None
    direct = run._load_group(plan.modules, scan=False)
    monkeypatch.setattr(RobustMergeRun, "_resident", lambda self: None)
    loaded = run._load_group(plan.modules, scan=False)
    for d, g in zip(direct, loaded):
        assert d.plan is g.plan
        assert all(x is y for x, y in zip(d.a + d.b, g.a + g.b))
