"""Tests for modeling_nanochat.optim.muon_adamw (nanochat's MuonAdamW and its parameter grouping).

The golden numbers come from nanochat's own optimizer (see tests/fixtures/README.md, "nanochat_optim/");
everything else is checked against torch itself or against the single-process optimizer.
"""

import io
import math
import re
import socket
import time

import pytest
from conftest import FIXTURES
import torch
import torch.multiprocessing as mp
from torch import nn

from modeling_nanochat.optim.muon_adamw import MuonAdamW, build_param_groups

GOLDEN = FIXTURES / "nanochat_optim" / "golden.pt"
GOLDEN_TOL = 1e-6  # max abs difference allowed against nanochat's fp32 results


# ---------------------------------------------------------------------------------------------------------------------
# helpers

_NANOCHAT_BLOCK_LEAVES = {
    "attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj", "attn.ve_gate": "self_attn.ve_gate", "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def nanochat_to_ours(name: str) -> str:
    """nanochat state_dict key -> this package's parameter name."""
    m = re.fullmatch(r"transformer\.h\.(\d+)\.(\w+\.\w+)\.weight", name)
    if m:
        return f"model.layers.{m[1]}.{_NANOCHAT_BLOCK_LEAVES[m[2]]}.weight"
    if name == "transformer.wte.weight":
        return "model.embed_tokens.weight"
    if name == "lm_head.weight":
        return name
    return "model." + name


def module_with(params: dict) -> nn.Module:
    """A module tree whose named_parameters() are exactly `params` (name -> tensor), in that order."""
    root = nn.Module()
    for name, value in params.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, nn.Parameter(value))
    return root


def fake_nanochat(n_layer: int, d: int, n_head: int, n_kv: int, vocab: int, device="meta") -> nn.Module:
    """Our model's parameter names and nanochat's shapes (§1.8), on the meta device so d20 costs nothing."""
    hd = d // n_head
    e = lambda *s: torch.empty(*s, device=device)  # noqa: E731
    has_ve = lambda i: i % 2 == (n_layer - 1) % 2  # noqa: E731  (nanochat: alternating, last layer included)
    params = {"model.embed_tokens.weight": e(vocab, d)}
    for i in range(n_layer):
        pre = f"model.layers.{i}."
        params[pre + "self_attn.q_proj.weight"] = e(n_head * hd, d)
        params[pre + "self_attn.k_proj.weight"] = e(n_kv * hd, d)
        params[pre + "self_attn.v_proj.weight"] = e(n_kv * hd, d)
        params[pre + "self_attn.o_proj.weight"] = e(d, d)
        if has_ve(i):
            params[pre + "self_attn.ve_gate.weight"] = e(n_kv, 12)
        params[pre + "mlp.fc1.weight"] = e(4 * d, d)
        params[pre + "mlp.fc2.weight"] = e(d, 4 * d)
    for i in range(n_layer):
        if has_ve(i):
            params[f"model.value_embeds.{i}.weight"] = e(vocab, n_kv * hd)
    params.update({"model.resid_lambdas": e(n_layer), "model.x0_lambdas": e(n_layer),
                   "model.smear_gate.weight": e(1, 24), "model.smear_lambda": e(1), "model.backout_lambda": e(1),
                   "lm_head.weight": e(vocab, d)})
    return module_with(params)


def names_by_group(model: nn.Module, groups: list) -> list:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in groups]


def max_abs_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------------------------
# 1. golden parity with nanochat's own MuonAdamW


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


def test_param_groups_match_nanochat_setup_optimizer(golden):
    model = module_with({nanochat_to_ours(n): t.clone() for n, t in golden["initial"].items()})
    groups = build_param_groups(model, model_dim=golden["model_dim"], **golden["setup_optimizer_kwargs"])
    ours = names_by_group(model, groups)
    assert len(groups) == len(golden["groups"])
    for g, names, ref in zip(groups, ours, golden["groups"]):
        assert g["kind"] == ref["kind"]
        assert names == [nanochat_to_ours(n) for n in ref["names"]] or sorted(names) == sorted(
            nanochat_to_ours(n) for n in ref["names"])
        assert g["initial_lr"] == pytest.approx(ref["initial_lr"], rel=1e-12)
        if g["kind"] == "adamw":
            assert tuple(g["betas"]) == tuple(ref["betas"]) and g["eps"] == ref["eps"]
            assert g["weight_decay"] == ref["weight_decay"]
        else:
            assert (g["ns_steps"], g["beta2"]) == (ref["ns_steps"], ref["beta2"])
            assert g["weight_decay"] == golden["setup_optimizer_kwargs"]["weight_decay"]


def run_golden_steps(golden, dtypes=None, **opt_kwargs) -> list:
    """Replay the fixture's 3 steps with our optimizer; returns the params after each step (nanochat names).
    `dtypes` (nanochat name -> dtype) stores params and grads in that dtype, as nanochat's bf16 mode does."""
    dtypes = dtypes or {}
    cast = lambda n, t: t.to(dtypes.get(n, t.dtype))  # noqa: E731
    model = module_with({nanochat_to_ours(n): cast(n, t).clone() for n, t in golden["initial"].items()})
    opt = MuonAdamW(build_param_groups(model, model_dim=golden["model_dim"], **golden["setup_optimizer_kwargs"]),
                    **opt_kwargs)
    params = dict(model.named_parameters())
    snapshots = []
    for step, sched in enumerate(golden["schedule"]):
        for n, g in golden["grads"][step].items():
            params[nanochat_to_ours(n)].grad = cast(n, g).clone()
        for group in opt.param_groups:  # what base_train's schedules do before each step
            group["lr"] = group["initial_lr"] * sched["lrm"]
            if group["kind"] == "muon":
                group["momentum"], group["weight_decay"] = sched["momentum"], sched["muon_wd"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        snapshots.append({n: params[nanochat_to_ours(n)].detach().clone() for n in golden["initial"]})
    return snapshots


@pytest.mark.parametrize("reference", ["after", "after_eager"])
def test_golden_parity_with_nanochat(golden, reference):
    """3 steps on a 1-layer nanochat-shaped parameter set (Muon (4,12) wide, (64,64) x4, (64,256) wide,
    (256,64) tall; six AdamW groups incl. >=1024-element tables) with nanochat's LRs and a changing schedule.
    `after` is nanochat's torch.compile'd step, `after_eager` the same functions run eagerly."""
    worst = 0.0
    for step, ours in enumerate(run_golden_steps(golden)):
        worst = max(worst, max_abs_diff(ours, golden[reference][step]))
        # the params must actually move, or a do-nothing optimizer could pass
        assert max_abs_diff(ours, golden["initial"]) > 1e-3
    print(f"max |ours - nanochat[{reference}]| over 3 steps = {worst:.3g}")
    assert worst <= GOLDEN_TOL


def _bf16_reference_key():
    """bf16 matmuls round differently where the CPU has native bf16 dot products (AVX512-BF16) than where they are
    emulated in fp32 (AVX2): nanochat's own bf16 run differs by 5.8e-4 between the two, so the fixture holds one
    reference per kind, each made by nanochat's code on such a CPU (AMX-tile CPUs: a third; tests/fixtures/README.md)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "after_bf16_step3_amx"
    return "after_bf16_step3_avx512_bf16" if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() \
        else "after_bf16_step3"


def test_golden_parity_bf16_mode(golden):
    """nanochat with NANOCHAT_DTYPE=bfloat16: wte / value embeds stored in bf16 (AdamW math in fp32), Muon's
    Polar Express in bf16 on fp32 masters. Our equivalent is muon_compute_dtype=torch.bfloat16."""
    dtypes = {n: getattr(torch, d.split(".")[-1]) for n, d in golden["bf16_dtypes"].items()}
    assert dtypes["transformer.wte.weight"] == torch.bfloat16
    ref = golden[_bf16_reference_key()]
    ours = run_golden_steps(golden, dtypes, muon_compute_dtype=torch.bfloat16)[-1]
    fp32_matmuls = run_golden_steps(golden, dtypes)[-1]
    assert all(ours[n].dtype == ref[n].dtype for n in ref)
    err = max_abs_diff({n: t.float() for n, t in ours.items()}, {n: t.float() for n, t in ref.items()})
    err_fp32 = max_abs_diff({n: t.float() for n, t in fp32_matmuls.items()}, {n: t.float() for n, t in ref.items()})
    print(f"bf16 mode: max |ours - nanochat| = {err:.3g} (fp32 matmuls instead would give {err_fp32:.3g})")
    # bf16 matmul kernels may round differently on another CPU, so no 1e-6 here; but the bf16 path must be
    # far closer to nanochat's than an fp32 iteration is
    assert err <= 1e-4 and err <= 0.1 * err_fp32


# ---------------------------------------------------------------------------------------------------------------------
# 2. AdamW kind == torch.optim.AdamW


@pytest.mark.parametrize("betas,eps,wd", [((0.8, 0.95), 1e-10, 0.05), ((0.9, 0.999), 1e-8, 0.0), ((0.96, 0.95), 1e-10, 0.3)])
def test_adamw_kind_matches_torch_adamw(betas, eps, wd):
    gen = torch.Generator().manual_seed(7)
    shapes = [(37,), (1,), (48, 24), (5, 3, 4)]
    init = [torch.randn(s, generator=gen) for s in shapes]
    ours = [nn.Parameter(t.clone()) for t in init]
    ref = [nn.Parameter(t.clone()) for t in init]
    opt = MuonAdamW([dict(kind="adamw", params=ours, lr=0.03, betas=betas, eps=eps, weight_decay=wd)])
    ref_opt = torch.optim.AdamW(ref, lr=0.03, betas=betas, eps=eps, weight_decay=wd)
    for _ in range(6):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen) * 0.1
            b.grad = a.grad.clone()
        opt.step()
        ref_opt.step()
    for a, b, t in zip(ours, ref, init):
        assert (a - t).abs().max() > 1e-3
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# 3. distributed (2 gloo processes) == single process on averaged grads; full state round-trips across world sizes

WORLD = 2
STEPS = 4  # 3 steps, save/restore, then one more


def dist_model() -> nn.Module:
    """AdamW: sharded (64x32), dim0 not divisible by 2 (33x40: all-reduce fallback), small ones;
    Muon: tall K=3 (padded to 4), wide K=1 (rank 1 owns nothing), square K=4."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"emb": (64, 32), "odd": (33, 40), "vec": (24,), "one": (1,),
              "t0": (48, 16), "t1": (48, 16), "t2": (48, 16), "w0": (16, 40),
              "s0": (32, 32), "s1": (32, 32), "s2": (32, 32), "s3": (32, 32)}
    return module_with({n: torch.randn(s, generator=gen) * 0.2 for n, s in shapes.items()})


def dist_groups(model: nn.Module) -> list:
    p = dict(model.named_parameters())
    muon = dict(kind="muon", lr=0.02, momentum=0.9, ns_steps=5, beta2=0.9, weight_decay=0.2)
    return [dict(kind="adamw", params=[p["emb"], p["vec"]], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.01),
            dict(kind="adamw", params=[p["odd"], p["one"]], lr=0.2, betas=(0.96, 0.95), eps=1e-10, weight_decay=0.0),
            dict(params=[p["t0"], p["t1"], p["t2"]], **muon),
            dict(params=[p["w0"]], **muon),
            dict(params=[p["s0"], p["s1"], p["s2"], p["s3"]], **muon)]


def rank_grads(model: nn.Module, step: int, rank: int) -> dict:
    gen = torch.Generator().manual_seed(1000 + 10 * step + rank)
    return {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters()}


def set_grads(model: nn.Module, grads: dict) -> None:
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()


def params_of(model: nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _dist_worker(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        assert dist.get_world_size() == WORLD
        model = dist_model()
        opt = MuonAdamW(dist_groups(model))
        for step in range(3):
            set_grads(model, rank_grads(model, step, rank))
            opt.step()
        out = {"params3": params_of(model)}
        # the sharded path really ran: this rank holds half of emb's AdamW state and 2 of the 3 tall matrices
        emb = dict(model.named_parameters())["emb"]
        out["emb_state_rows"] = opt.state[emb]["exp_avg"].shape[0]
        out["full_state"] = opt.state_dict_full()
        set_grads(model, rank_grads(model, 3, rank))
        opt.step()
        out["params4"] = params_of(model)
        # 1 -> 2: resume from a state saved by a single process
        ref = torch.load(f"{tmp}/ref3.pt", weights_only=True)
        model2 = dist_model()
        with torch.no_grad():
            for n, p in model2.named_parameters():
                p.copy_(ref["params3"][n])
        opt2 = MuonAdamW(dist_groups(model2))
        opt2.load_state_dict(ref["full_state"])
        set_grads(model2, rank_grads(model2, 3, rank))
        opt2.step()
        out["params4_from_1"] = params_of(model2)
        torch.save(out, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(tmp: str, timeout: float = 120.0) -> None:
    ctx = mp.start_processes(_dist_worker, args=(_free_port(), tmp), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):  # raises if a worker failed
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"distributed workers did not finish in {timeout:.0f} s")


@pytest.mark.slow
def test_distributed_matches_single_process_and_state_roundtrips(tmp_path):
    # single-process reference fed the averaged grads
    model = dist_model()
    opt = MuonAdamW(dist_groups(model))
    avg = lambda step: {n: (rank_grads(model, step, 0)[n] + rank_grads(model, step, 1)[n]) / WORLD  # noqa: E731
                        for n, _ in model.named_parameters()}
    for step in range(3):
        set_grads(model, avg(step))
        opt.step()
    ref3 = {"params3": params_of(model), "full_state": opt.state_dict_full()}
    torch.save(ref3, tmp_path / "ref3.pt")
    set_grads(model, avg(3))
    opt.step()
    ref4 = params_of(model)

    _run_workers(str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    tol = 1e-6
    print("distributed: max diff vs single process",
          max(max_abs_diff(o[k], r) for o in ranks for k, r in (("params3", ref3["params3"]), ("params4", ref4),
                                                              ("params4_from_1", ref4))))
    for out in ranks:
        assert out["emb_state_rows"] == 64 // WORLD
        assert max_abs_diff(out["params3"], ref3["params3"]) <= tol
        assert max_abs_diff(out["params4"], ref4) <= tol
        assert max_abs_diff(out["params4_from_1"], ref4) <= tol  # 1 -> 2
    assert max_abs_diff(ranks[0]["params3"], ranks[1]["params3"]) == 0  # replicas agree exactly

    # the gathered full state equals the single-process state, entry by entry
    full2, full1 = ranks[0]["full_state"], ref3["full_state"]
    assert sorted(full2["state"]) == sorted(full1["state"]) == list(range(12))
    for i, entry in full1["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert value.shape == full2["state"][i][key].shape
                assert (value - full2["state"][i][key]).abs().max() <= tol
            else:
                assert value == full2["state"][i][key]

    # 2 -> 1: a single process resumes from the state gathered on 2 ranks
    model1 = dist_model()
    with torch.no_grad():
        for n, p in model1.named_parameters():
            p.copy_(ranks[0]["params3"][n])
    opt1 = MuonAdamW(dist_groups(model1))
    buf = io.BytesIO()
    torch.save(full2, buf)
    buf.seek(0)
    opt1.load_state_dict(torch.load(buf, weights_only=True))
    set_grads(model1, avg(3))
    opt1.step()
    assert max_abs_diff(params_of(model1), ref4) <= tol


# ---------------------------------------------------------------------------------------------------------------------
# 4. build_param_groups


@pytest.mark.parametrize("depth,d,heads,batch_lr_scale,muon_wd,expected", [
    # NANOCHAT_REFERENCE.md §2.6 worked values (V=32768), LRs as printed there
    (12, 768, 6, 1.0, 0.28, dict(lm_head=0.008, embedding=0.3, value_embeds=0.15, resid=0.005, x0=0.5, smear=0.2,
                                 muon=0.02)),
    (20, 1280, 10, math.sqrt(2), 0.10019, dict(lm_head=0.008764, embedding=0.328634, value_embeds=0.164317,
                                               resid=0.007071, x0=0.707107, smear=0.2, muon=0.028284)),
])
def test_build_param_groups_nanochat_values(depth, d, heads, batch_lr_scale, muon_wd, expected):
    model = fake_nanochat(depth, d, heads, heads, 32768)
    s = batch_lr_scale
    groups = build_param_groups(model, unembedding_lr=0.008 * s, embedding_lr=0.3 * s, matrix_lr=0.02 * s,
                                scalar_lr=0.5 * s, weight_decay=muon_wd, model_dim=d)
    names = names_by_group(model, groups)
    by_name = {g["name"]: (g, n) for g, n in zip(groups, names)}
    n_ve = depth // 2

    adamw_expect = {
        "lm_head": (["lm_head.weight"], (0.8, 0.96), 0.01),
        "embedding": (["model.embed_tokens.weight"], (0.8, 0.995), 0.001),
        "value_embeds": ([f"model.value_embeds.{i}.weight" for i in range(1, depth, 2)], (0.8, 0.995), 0.01),
        "resid": (["model.resid_lambdas"], (0.8, 0.95), 0.05),
        "x0": (["model.x0_lambdas"], (0.96, 0.95), 0.0),
        "smear": (["model.smear_gate.weight", "model.smear_lambda", "model.backout_lambda"], (0.8, 0.95), 0.0),
    }
    assert [g["name"] for g in groups[:6]] == list(adamw_expect)
    for key, (want_names, betas, wd) in adamw_expect.items():
        g, got = by_name[key]
        assert g["kind"] == "adamw" and sorted(got) == sorted(want_names)  # order inside a group is free
        assert g["lr"] == pytest.approx(expected[key], rel=1e-4) and g["initial_lr"] == g["lr"]
        assert tuple(g["betas"]) == betas and g["weight_decay"] == wd and g["eps"] == 1e-10

    muon = groups[6:]
    assert [tuple(g["params"][0].shape) for g in muon] == [(heads, 12), (d, d), (d, 4 * d), (4 * d, d)]  # sorted
    assert [len(g["params"]) for g in muon] == [n_ve, 4 * depth, depth, depth]
    for g, got in zip(muon, names[6:]):
        assert g["kind"] == "muon" and all(n.startswith("model.layers.") for n in got)
        assert g["lr"] == pytest.approx(expected["muon"], rel=1e-4)
        assert (g["momentum"], g["ns_steps"], g["beta2"], g["weight_decay"]) == (0.95, 5, 0.9, muon_wd)
    # every parameter placed exactly once
    placed = [n for group in names for n in group]
    assert sorted(placed) == sorted(n for n, _ in model.named_parameters())


def test_build_param_groups_rejects_unknown_and_handles_wrappers():
    model = fake_nanochat(2, 64, 4, 4, 128)
    getattr(model.model.layers, "0").register_parameter("input_norm_weight", nn.Parameter(torch.empty(64, device="meta")))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.input_norm_weight"):
        build_param_groups(model, model_dim=64)

    model = fake_nanochat(2, 64, 4, 4, 128)
    model.model.register_parameter("mystery", nn.Parameter(torch.empty(3, 3, device="meta")))
    with pytest.raises(ValueError, match=r"model\.mystery"):
        build_param_groups(model, model_dim=64)

    # DDP-style "module." prefix is stripped; model_dim is read from the embedding; frozen params are left out
    model = fake_nanochat(2, 64, 4, 4, 128)
    model.model.smear_lambda.requires_grad_(False)
    wrapper = nn.Module()
    wrapper.module = model
    groups = build_param_groups(wrapper)
    assert groups[0]["lr"] == pytest.approx(0.004 * (64 / 768) ** -0.5)
    smear = next(g for g in groups if g["name"] == "smear")
    assert len(smear["params"]) == 2
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters())) - 1


# ---------------------------------------------------------------------------------------------------------------------
# smaller checks


def test_invalid_groups_and_missing_grad_raise():
    a, b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4, 8))
    muon = dict(kind="muon", lr=0.02, momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=0.0)
    with pytest.raises(ValueError, match="one shape"):
        MuonAdamW([dict(params=[a, b], **muon)])
    with pytest.raises(ValueError, match="missing"):
        MuonAdamW([dict(kind="adamw", params=[a], lr=0.1)])
    with pytest.raises(ValueError, match="kind"):
        MuonAdamW([dict(kind="sgd", params=[a], lr=0.1)])
    opt = MuonAdamW([dict(params=[a], **muon)])
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()


def test_single_process_state_dict_roundtrip():
    model = dist_model()
    opt = MuonAdamW(dist_groups(model))
    for step in range(2):
        set_grads(model, rank_grads(model, step, 0))
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    clone = dist_model()
    clone.load_state_dict(model.state_dict())
    opt2 = MuonAdamW(dist_groups(clone))
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for m, o in ((model, opt), (clone, opt2)):
        set_grads(m, rank_grads(m, 2, 0))
        o.step()
    assert max_abs_diff(params_of(model), params_of(clone)) == 0


def test_build_param_groups_on_the_real_model():
    """The real NanoChatForCausalLM's parameter names land in nanochat's groups (reference §3.1, d12)."""
    from modeling_nanochat import NanoChatConfig, NanoChatForCausalLM
    with torch.device("meta"):
        model = NanoChatForCausalLM(NanoChatConfig(depth=12))
    groups = build_param_groups(model, unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5)
    placed = sum(len(g["params"]) for g in groups)
    assert placed == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert [len(by_name[n]["params"]) for n in ("lm_head", "embedding", "value_embeds", "resid", "x0", "smear")] == \
        [1, 1, 6, 1, 1, 3]
    muon = [tuple(g["params"][0].shape) for g in groups if g["kind"] == "muon"]
    assert muon == [(6, 12), (768, 768), (768, 3072), (3072, 768)]
    assert [len(g["params"]) for g in groups if g["kind"] == "muon"] == [6, 48, 12, 12]


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT during Trainer.train (trainer_mixin.SaveOnSignal; end to end: tests/faults/test_trainer_signals.py)


def test_save_on_signal_only_flags_then_stops_at_the_step_end_and_restores_handlers():
    import os
    import signal

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from modeling_nanochat.optim.trainer_mixin import SaveOnSignal, TrainingInterrupted, report_interrupted

    before = {s: signal.getsignal(s) for s in SaveOnSignal.SIGNALS}
    args, state, control = TrainingArguments(output_dir="unused", use_cpu=True), TrainerState(), TrainerControl()
    with SaveOnSignal() as stop:
        state.global_step = 3
        stop.on_step_end(args, state, control)
        assert not (control.should_save or control.should_training_stop)  # no signal: nothing changes
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only records it
        assert stop.signum == signal.SIGTERM and stop.stop_signum is None
        os.kill(os.getpid(), signal.SIGTERM)  # a forwarded repeat is ignored
        state.global_step, control.should_evaluate = 4, True
        stop.on_step_end(args, state, control)
        assert control.should_save and control.should_training_stop and not control.should_evaluate
        assert (stop.stop_signum, stop.step) == (signal.SIGTERM, 4)
        os.kill(os.getpid(), signal.SIGINT)  # once saving, even a Ctrl-C does not cut it short
    assert {s: signal.getsignal(s) for s in SaveOnSignal.SIGNALS} == before

    with SaveOnSignal() as stop:  # a second Ctrl-C before the step ends: stop at once
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in SaveOnSignal.SIGNALS} == before

    e = TrainingInterrupted(signal.SIGTERM, 4, "out/checkpoint-4", is_main=False)
    assert str(e) == ("interrupted by SIGTERM at step 4: saved out/checkpoint-4; "
                      "resume with --resume_from_checkpoint out/checkpoint-4")
    assert report_interrupted(e) == 143
