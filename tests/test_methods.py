"""Baseline methods (robustmerge_kernels.methods) against PEFT's add_weighted_adapter, the
oracle, on adapters really trained on the tiny Llama, plus exactness and property tests."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import lora_pair
from peft import PeftModel
from peft.tuners.lora import LoraLayer

import robustmerge_kernels as rk
from robustmerge_kernels.adapter_io.keys import canonical_name
from robustmerge_kernels.cli import main
from robustmerge_kernels.demo.toy import train_adapter
from robustmerge_kernels.errors import AdapterError
from robustmerge_kernels.methods import MethodOptions, dare, merge_module
from robustmerge_kernels.methods.select import keep_masks, thresholds

WEIGHTS = [0.7, -0.4, 1.3, 0.5]


@pytest.fixture(scope="module")
def four_dirs(base_model, adapter_dirs, tmp_path_factory):
    """The three session adapters plus one with another lora_alpha (scaling 1.0 vs 2.0)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        extra = train_adapter(base_model, 1, steps=6, r=4, lora_alpha=4, lr=2e-2, seed=5)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("alpha4") / "task_alpha4"
    extra.save_pretrained(str(folder))
    return [*adapter_dirs, str(folder)]


def peft_merge(base_model, dirs, weights, combination_type, **kwargs):
    """PEFT's add_weighted_adapter result: {module: (A, B, scaling)} and the LoraLayer names in order."""
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), dirs[0], adapter_name="a0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(dirs))]
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination_type, **kwargs)
    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "merged" in layer.lora_A:
            out[name] = (layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach(),
                         layer.scaling["merged"])  # fmt: skip
    return out


def _ours(merged, module):
    return merged[f"{module}.lora_A.weight"], merged[f"{module}.lora_B.weight"]


def _tie_free(tensors, density):
    for x in tensors:
        k = int(density * x.numel())
        assert x.abs().flatten().unique().numel() == x.numel() or k in (0, x.numel()), "inputs have ties"


def _inputs(dirs):
    from safetensors.torch import load_file

    return [load_file(f"{d}/adapter_model.safetensors") for d in dirs]


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("linear", {}),
        ("ties", {"density": 0.3}),
        ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
        ("magnitude_prune", {"density": 0.4}),
        ("cat", {}),
    ],
)
def test_factor_methods_match_peft(base_model, four_dirs, method, kwargs):
    ours = rk.merge(four_dirs, method=method, weights=WEIGHTS, **kwargs)
    if "density" in kwargs:
        _tie_free([v for sd in _inputs(four_dirs) for v in sd.values()], kwargs["density"])
    peft = peft_merge(base_model, four_dirs, WEIGHTS, method, **kwargs)
    assert len(peft) == len(ours) // 2 == 14
    for module, (a, b, scaling) in peft.items():
        oa, ob = _ours(ours, module)
        assert scaling == 1.0 and ours.config["lora_alpha"] == ours.config["r"] == a.shape[0]
        torch.testing.assert_close(oa, a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ob, b, rtol=1e-6, atol=1e-7)


def _hash_bernoulli(monkeypatch, masks):
    """Make PEFT's torch.bernoulli return our hashed DARE masks, in PEFT's call order."""
    queue = list(masks)

    def fake(p, *args, **kwargs):
        mask = queue.pop(0)
        assert mask.shape == p.shape
        return mask.to(p.dtype)

    monkeypatch.setattr(torch, "bernoulli", fake)
    return queue


def _peft_order_masks(base_model, dirs, density, seed, svd):
    """Our masks in the order PEFT prunes: per LoraLayer, (A then B, or the delta), per adapter."""
    model = PeftModel.from_pretrained(copy.deepcopy(base_model), dirs[0])
    masks = []
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            canon = canonical_name(name)
            parts = [("delta", (b.shape[0], a.shape[1]))] if svd else [("lora_A", a.shape), ("lora_B", b.shape)]
            for part, shape in parts:
                for t in range(len(dirs)):
                    masks.append(dare.keep_mask(shape, density, seed, f"{canon}.{part}:{t}"))
    return masks


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_matches_peft_with_our_mask(base_model, four_dirs, monkeypatch, method):
    """PEFT draws its mask from torch's RNG (no bit parity possible); with our hashed mask
    substituted for torch.bernoulli, PEFT's formula gives our result."""
    density, seed = 0.6, 11
    ours = rk.merge(four_dirs, method=method, weights=WEIGHTS, density=density, seed=seed)
    masks = _peft_order_masks(base_model, four_dirs, density, seed, method.endswith("_svd"))
    queue = _hash_bernoulli(monkeypatch, masks)
    peft = peft_merge(base_model, four_dirs, WEIGHTS, method, density=density)
    monkeypatch.undo()
    assert not queue  # every mask was consumed: same number and order of prunings
    for module, (a, b, _scaling) in peft.items():
        oa, ob = _ours(ours, module)
        if method.endswith("_svd"):
            torch.testing.assert_close(ob @ oa, b @ a, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(oa, a, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(ob, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "method, kwargs",
    [
        ("svd", {}),
        ("svd", {"svd_rank": 2}),
        ("svd", {"svd_rank": 7}),
        ("ties_svd", {"density": 0.3}),
        ("magnitude_prune_svd", {"density": 0.5}),
        ("ties_svd", {"density": 0.4, "majority_sign_method": "frequency", "svd_rank": 3}),
    ],
)
def test_svd_family_matches_peft(base_model, four_dirs, method, kwargs):
    """Singular vectors are defined up to sign, so the products B* A* are compared."""
    ours = rk.merge(four_dirs, method=method, weights=WEIGHTS, **kwargs)
    peft = peft_merge(base_model, four_dirs, WEIGHTS, method, **kwargs)
    rank = kwargs.get("svd_rank", 4)
    assert ours.config["r"] == ours.config["lora_alpha"] == rank
    for module, (a, b, scaling) in peft.items():
        oa, ob = _ours(ours, module)
        assert oa.shape == a.shape and ob.shape == b.shape and scaling == 1.0
        ref = b.double() @ a.double()
        err = (ob.double() @ oa.double() - ref).abs().max()
        assert err <= 1e-5 * ref.abs().max() + 1e-9, (module, float(err))


def test_svd_clamp_bounds_the_factors(four_dirs):
    merged = rk.merge(four_dirs, method="svd", weights=WEIGHTS, svd_clamp=0.9)
    plain = rk.merge(four_dirs, method="svd", weights=WEIGHTS)
    key = next(iter(merged))
    module = key.rsplit(".lora_", 1)[0]
    a, b = _ours(plain, module)
    hi = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.9)
    ca, cb = _ours(merged, module)
    torch.testing.assert_close(ca, a.clamp(-hi, hi))
    torch.testing.assert_close(cb, b.clamp(-hi, hi))


def _random_adapters(T, r, m, n, dtype=torch.float32, alphas=None):
    out = []
    for t in range(T):
        sd, cfg = lora_pair(100 + t, r=r, n=n, m=m, modules=("q",), dtype=dtype, alpha=(alphas or [8] * T)[t])
        out.append((sd, cfg))
    return out


@pytest.mark.parametrize("shape", [(48, 80, 4, 5), (96, 40, 8, 3), (30, 30, 6, 6)])
def test_svd_equals_dense_float64_svd_and_cat_is_exact(shape):
    m, n, r, T = shape
    alphas = [8, 4, 16, 8, 2, 8][:T]
    ads = _random_adapters(T, r, m, n, alphas=alphas)
    w = [0.5 + 0.3 * t * (-1) ** t for t in range(T)]
    key = "base_model.model.layers.0.q"
    dense = sum(
        w[t] * (alphas[t] / r) * sd[f"{key}.lora_B.weight"].double() @ sd[f"{key}.lora_A.weight"].double()
        for t, (sd, _) in enumerate(ads)
    )
    cat = rk.merge(ads, method="cat", weights=w)
    assert cat.config["r"] == r * T and cat.config["lora_alpha"] == r * T
    torch.testing.assert_close(cat[f"{key}.lora_B.weight"].double() @ cat[f"{key}.lora_A.weight"].double(), dense)
    for rank in (r, 2 * r, min(r * T + 3, m, n)):  # beyond min(m, n) is refused (only zero padding)
        out = rk.merge(ads, method="svd", weights=w, svd_rank=rank)
        u, s, vh = torch.linalg.svd(dense)
        k = min(rank, s.numel())
        want = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        got = out[f"{key}.lora_B.weight"].double() @ out[f"{key}.lora_A.weight"].double()
        assert out[f"{key}.lora_A.weight"].shape == (rank, n)
        assert (got - want).abs().max() <= 1e-6 * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["svd", "cat", "ties", "dare_ties", "magnitude_prune_svd", "pcb"])
def test_half_precision_inputs_are_computed_in_float32(dtype, method):
    ads = _random_adapters(3, 4, 24, 20, dtype=dtype)
    up = [({k: v.float() for k, v in sd.items()}, cfg) for sd, cfg in ads]
    out = rk.merge(ads, method=method, density=0.5, dtype=dtype)  # half output, chosen
    ref = rk.merge(up, method=method, density=0.5)
    default = rk.merge(ads, method=method, density=0.5)  # float32 output by default
    for key, value in out.items():
        assert value.dtype == dtype and default[key].dtype == torch.float32
        torch.testing.assert_close(value, ref[key].to(dtype), rtol=0, atol=0)
        torch.testing.assert_close(default[key], ref[key], rtol=0, atol=0)


def test_written_adapters_load_in_peft_with_scaling_one(base_model, four_dirs, tmp_path):
    for method in ("cat", "svd", "ties"):
        out = tmp_path / method
        merged = rk.merge(four_dirs, method=method, weights=WEIGHTS, out=str(out))
        model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(out))
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer):
                assert layer.scaling["default"] == 1.0
                a, b = _ours(merged, name)
                torch.testing.assert_close(layer.get_delta_weight("default"), b @ a)
        assert merged.report.method == method and list(merged.report.hyperparameters["weights"]) == WEIGHTS


def test_rslora_inputs_peft_scales_twice(base_model, tmp_path):
    """PEFT keeps use_rslora=True and sets lora_alpha = r on the merged adapter, so it applies
    sqrt(r) on top of factors that already carry the scaling. Ours writes scaling 1."""
    dirs = []
    for task in range(2):
        model = train_adapter(base_model, task, steps=2, r=4, lora_alpha=8, lr=2e-2, use_rslora=True)
        model.save_pretrained(str(tmp_path / f"rs{task}"))
        dirs.append(str(tmp_path / f"rs{task}"))
    ours = rk.merge(dirs, method="svd", weights=[1.0, 1.0])
    peft = peft_merge(base_model, dirs, [1.0, 1.0], "svd")
    assert ours.config["use_rslora"] is False and ours.config["lora_alpha"] == ours.config["r"] == 4
    for module, (a, b, scaling) in peft.items():
        assert scaling == pytest.approx(math.sqrt(4))  # PEFT's double scaling
        oa, ob = _ours(ours, module)
        torch.testing.assert_close(ob @ oa, b @ a, rtol=1e-4, atol=1e-6)  # same factors, right scaling


def test_linear_has_cross_terms_cat_is_exact(four_dirs):
    """PEFT's linear merges A and B separately; the exact weighted sum of deltas is cat."""
    sds = _inputs(four_dirs)
    lin = rk.merge(four_dirs, method="linear", weights=WEIGHTS)
    cat = rk.merge(four_dirs, method="cat", weights=WEIGHTS)
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    scal = [2.0, 2.0, 2.0, 1.0]
    exact = sum(
        w * s * sd[f"{module}.lora_B.weight"] @ sd[f"{module}.lora_A.weight"] for w, s, sd in zip(WEIGHTS, scal, sds)
    )
    a, b = _ours(cat, module)
    torch.testing.assert_close(b @ a, exact, rtol=1e-5, atol=1e-6)
    a, b = _ours(lin, module)
    assert not torch.allclose(b @ a, exact, atol=1e-6)


# --- exact selection ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_kernel_thresholds_equal_kthvalue(dtype):
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(37, 53, generator=g).to(dtype),
        (torch.randint(-3, 4, (64, 9), generator=g)).to(dtype),  # many ties and zeros
        torch.zeros(5, 5, dtype=dtype),
        torch.full((3, 7), -2.5, dtype=dtype),
        torch.tensor([[1e-40, -1e-42, torch.finfo(dtype).max, -0.0, 6e-8]], dtype=torch.float64).to(
            dtype
        ),  # tiny, huge
    ]
    for k in (1, 2, 7, 15):
        ks = [min(k, x.numel()) for x in xs]
        fast = thresholds(xs, ks)
        slow = thresholds(xs, ks, use_kernel=False)
        for x, kk, f, s in zip(xs, ks, fast, slow):
            assert f.dtype == x.dtype and torch.equal(f, s), (x, kk)
            assert torch.equal(f, x.abs().flatten().kthvalue(kk).values)


def test_keep_masks_keep_ties_and_match_topk_on_tie_free_data():
    x = torch.tensor([[3.0, -1.0, 2.0, 2.0], [-2.0, 0.5, 0.0, 1.0]])
    (mask,) = keep_masks([x], 0.25)  # keep int(0.25 * 8) = 2: 3 and the three tied 2s
    assert mask.sum() == 4 and torch.equal(mask, x.abs() >= 2)
    y = torch.randn(50, 30)
    (mask,) = keep_masks([y], 0.3)
    idx = y.abs().flatten().topk(int(0.3 * y.numel())).indices
    want = torch.zeros(y.numel(), dtype=torch.bool)
    want[idx] = True
    assert torch.equal(mask.flatten(), want)
    assert keep_masks([y], 0.0)[0].sum() == 0 and keep_masks([y], 1.0)[0].all()


def test_nonfinite_inputs_are_refused():
    ads = _random_adapters(2, 4, 8, 8)
    ads[1][0]["base_model.model.layers.0.q.lora_A.weight"][0, 0] = float("nan")
    for method in ("ties", "svd"):
        with pytest.raises(AdapterError, match="NaN"):
            rk.merge(ads, method=method)


# --- DARE hash ----------------------------------------------------------------------------


def test_dare_hash_is_deterministic_and_drops_at_the_rate():
    a = dare.keep_mask((1000, 1000), 0.3, seed=7, name="layers.0.q.lora_A:0")
    b = dare.keep_mask((1000, 1000), 0.3, seed=7, name="layers.0.q.lora_A:0")
    assert torch.equal(a, b)
    assert abs(a.float().mean().item() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / 1e6)
    for other in (dare.keep_mask((1000, 1000), 0.3, seed=8, name="layers.0.q.lora_A:0"),
                  dare.keep_mask((1000, 1000), 0.3, seed=7, name="layers.0.q.lora_A:1")):  # fmt: skip
        agree = (a == other).float().mean().item()
        assert abs(agree - (0.3**2 + 0.7**2)) < 0.005  # independent masks
    # Chunking and shape do not change the value of an element: it is a function of its index.
    flat = dare.keep_mask((dare.CHUNK + 123,), 0.5, 3, "x")
    assert torch.equal(flat[-100:], dare.hash_u53(dare.tensor_key(3, "x"), dare.CHUNK + 23, 100) < 2**52)
    # The vectorised hash equals the scalar splitmix64 reference.
    key = dare.tensor_key(5, "t")
    want = [dare.splitmix64(key + i) >> 11 for i in range(20)]
    assert dare.hash_u53(key, 0, 20).tolist() == want


def test_dare_runs_are_reproducible_and_seeded():
    ads = _random_adapters(3, 4, 16, 12)
    one = rk.merge(ads, method="dare_ties", seed=1, density=0.5)
    again = rk.merge(ads, method="dare_ties", seed=1, density=0.5)
    other = rk.merge(ads, method="dare_ties", seed=2, density=0.5)
    key = next(iter(one))
    assert torch.equal(one[key], again[key]) and not torch.equal(one[key], other[key])


# --- PCB ----------------------------------------------------------------------------------


def test_pcb_of_identical_tasks_keeps_the_top_ratio_of_that_task():
    from robustmerge_kernels.methods import pcb_merge

    x = torch.randn(40, 25, generator=torch.Generator().manual_seed(3))
    out = pcb_merge(torch.stack([x, x, x]), pcb_ratio=0.2)
    kept = out != 0
    assert 0.1 * x.numel() <= kept.sum() <= 0.25 * x.numel()
    # c = sign(x) * |x| clipped at the values of sorted positions int(d * 1e-4) and int(d * (1 - 1e-4) - 1)
    v = x.abs().flatten().sort().values
    c = torch.sign(x) * x.abs().clamp(v[int(x.numel() * 1e-4)], v[int(x.numel() * (1 - 1e-4) - 1)])
    torch.testing.assert_close(out[kept], c[kept])
    assert out.abs().max() < x.abs().max()  # the largest magnitude was clipped


def test_pcb_module_output_is_finite_and_shaped():
    ads = _random_adapters(4, 4, 16, 12)
    out = rk.merge(ads, method="pcb", pcb_ratio=0.3)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out.report.hyperparameters["pcb_ratio"] == 0.3 and out.report.method == "pcb"


# --- API and CLI --------------------------------------------------------------------------


def test_bad_options_are_refused():
    ads = _random_adapters(2, 4, 8, 8)
    with pytest.raises(AdapterError, match="weights has 3 entries"):
        rk.merge(ads, method="linear", weights=[1, 2, 3])
    with pytest.raises(AdapterError, match="majority_sign_method"):
        rk.merge(ads, method="ties", majority_sign_method="max")
    with pytest.raises(AdapterError, match="density"):
        rk.merge(ads, method="dare_linear", density=0.0)
    with pytest.raises(AdapterError, match="svd_rank"):
        rk.merge(ads, method="svd", svd_rank=0)
    with pytest.raises(AdapterError, match="unknown merge method"):
        rk.merge(ads, method="nope")


def test_partial_modules_get_rank_patterns_for_cat(base_model, tmp_path):
    a = lora_pair(1, modules=("q", "v"))
    b = lora_pair(2, modules=("q",))
    out = rk.merge([a, b], method="cat")
    assert out["base_model.model.layers.0.q.lora_A.weight"].shape[0] == 8
    assert out["base_model.model.layers.0.v.lora_A.weight"].shape[0] == 4
    assert out.config["r"] in (4, 8) and out.config["rank_pattern"] == out.config["alpha_pattern"]
    assert len(out.config["rank_pattern"]) == 1


def test_cli_merge_with_a_baseline(adapter_dirs, tmp_path, capsys):
    out = tmp_path / "svd"
    args = ["merge", *adapter_dirs, "-o", str(out), "--method", "svd", "--svd-rank", "2", "--weights", "0.5", "1", "1"]
    assert main(args) == 0
    assert "with svd" in capsys.readouterr().out
    ref = rk.merge(adapter_dirs, method="svd", svd_rank=2, weights=[0.5, 1.0, 1.0])
    from safetensors.torch import load_file

    written = load_file(str(out / "adapter_model.safetensors"))
    assert written.keys() == ref.keys() and all(torch.equal(written[k], ref[k]) for k in ref)


def test_merge_module_functional_api():
    a = [torch.randn(4, 10) for _ in range(3)]
    b = [torch.randn(6, 4) for _ in range(3)]
    A, B = merge_module("cat", a, b, [2.0] * 3, [1.0] * 3, MethodOptions(), 12)
    torch.testing.assert_close(B @ A, sum(2.0 * y @ x for x, y in zip(a, b)))


@pytest.mark.parametrize("method", ["ties", "magnitude_prune", "dare_linear"])
def test_single_adapter_still_prunes_where_peft_switches_to_linear(base_model, adapter_dirs, method):
    """PEFT's add_weighted_adapter turns every combination_type into "linear" for one
    adapter (peft/tuners/lora/model.py); ours keeps the method: ties/magnitude_prune prune
    to the density, dare drops and rescales. Kept on purpose (a one-adapter merge is how a
    pruned adapter is made), stated in README."""
    one = adapter_dirs[:1]
    peft = peft_merge(base_model, one, [0.7], method, density=0.3)
    linear = rk.merge(one, method="linear", weights=[0.7])
    ours = rk.merge(one, method=method, weights=[0.7], density=0.3)
    num = den = 0.0
    for module, (a, b, _scaling) in peft.items():
        la, lb = _ours(linear, module)
        torch.testing.assert_close(la, a, rtol=1e-6, atol=1e-7)  # PEFT's result is linear's
        torch.testing.assert_close(lb, b, rtol=1e-6, atol=1e-7)
        oa, ob = _ours(ours, module)
        if method == "dare_linear":  # dropped entries zero, kept ones rescaled by 1/density
            for x, lx in ((oa, la), (ob, lb)):
                kept = x != 0
                assert 0 < kept.float().mean() < 0.6
                torch.testing.assert_close(x[kept], lx[kept] / 0.3, rtol=1e-6, atol=0)
        else:  # the top 30% of each factor by magnitude, the rest zero
            for x, lx in ((oa, la), (ob, lb)):
                keep = lx.abs() >= lx.abs().flatten().topk(int(0.3 * lx.numel())).values[-1]
                torch.testing.assert_close(x, lx * keep, rtol=1e-6, atol=0)
        num += float((ob @ oa - b @ a).norm() ** 2)
        den += float((b @ a).norm() ** 2)
    assert math.sqrt(num / den) > 0.3  # far from PEFT's (linear) result
