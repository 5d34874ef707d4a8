"""DeepSpeed ZeRO path (modeling_nanochat/optim/zero.py) with real DeepSpeed.

In-process checks: DeepSpeed 0.19.8's own Muon tagging rule, our re-routing of smear_gate, the param groups.
Launched checks (tests/zero_worker.py via `accelerate launch`, 2 CPU processes over gloo): ZeRO-2 and ZeRO-3 with
DeepSpeed's Muon, ZeRO-2 with AdamW. They assert from the live DeepSpeed optimizer which parameter is in which
group with which lr/betas/eps/weight decay, that the loss falls, that lr (and Muon momentum) set each step reach
the update, and that the saved checkpoint loads with `from_pretrained` equal to the gathered weights.

Cost: ~15 s per launch; a fresh extension cache first JIT-compiles DeepSpeed's shm comm op (40-80 s, once; kept
in <repo>/.cache/torch_extensions). DeepSpeed torch.compile's its Muon kernel; the runs disable that
(TORCH_COMPILE_DISABLE=1) to save the compile, which changes only fp32 rounding.
"""

import json
import math
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import IN_CI, REPO, tiny_config

try:
    import deepspeed  # the `train` extra; CI installs it, so there it must be present
except ImportError:
    if IN_CI:
        raise
    pytest.skip("deepspeed is not installed (pip install -e '.[train]')", allow_module_level=True)

from modeling_nanochat import NanoChatForCausalLM  # noqa: E402
from modeling_nanochat.optim import zero  # noqa: E402
from modeling_nanochat.optim.muon_adamw import build_param_groups  # noqa: E402

WORKER = REPO / "tests" / "zero_worker.py"
CONFIGS = REPO / "accelerate_configs"
RUNS = {"zero2-muon": ("cpu_zero2.yaml", "muon", 2), "zero3-muon": ("cpu_zero3.yaml", "muon", 3),
        "zero2-adamw": ("cpu_zero2.yaml", "adamw", 2)}
MUON_RUNS = [n for n, (_, opt, _) in RUNS.items() if opt == "muon"]


def lrs():
    from zero_worker import LRS  # the worker's settings, so both sides use the same numbers
    return LRS


def nanochat_expectation(optimizer):
    """name -> expected DeepSpeed group settings, from nanochat's grouping (optim.build_param_groups)."""
    model = NanoChatForCausalLM(tiny_config())
    names = {id(p): n for n, p in model.named_parameters()}
    d = model.config.hidden_size
    expected = {}
    for g in build_param_groups(model, **lrs()):
        for p in g["params"]:
            if g["kind"] == "adamw":
                want = dict(use_muon=False, nanochat_group=g["name"], lr=g["lr"], betas=list(g["betas"]),
                            eps=g["eps"], weight_decay=g["weight_decay"])
            elif optimizer == "muon":
                want = dict(use_muon=True, nanochat_group="matrix", lr=lrs()["matrix_lr"], momentum=0.95,
                            weight_decay=lrs()["weight_decay"])
            else:  # block matrices on AdamW: lr matched to a Muon step's RMS, same per-step decay lr*wd
                lr = lrs()["matrix_lr"] / math.sqrt(d)
                want = dict(use_muon=False, nanochat_group="matrix", lr=lr, betas=[0.8, 0.95], eps=1e-10,
                            weight_decay=lrs()["weight_decay"] * lrs()["matrix_lr"] / lr)
            expected[names[id(p)]] = want
    return expected


# ---------------------------------------------------------------- in process


def test_deepspeed_tags_by_name_and_ignores_preset_flags():
    """deepspeed/__init__.py set_optimizer_flags: Muon iff 2-D and no "embed"/"lm_head" in the name, written over
    any use_muon already on the parameter. So the 2-D smear_gate goes to Muon, whatever we pre-set."""
    model = NanoChatForCausalLM(tiny_config())
    for p in model.parameters():
        p.use_muon = False
    deepspeed.set_optimizer_flags(SimpleNamespace(optimizer_name="muon", optimizer_params={}), model)
    for n, p in model.named_parameters():
        assert p.use_muon == (p.ndim >= 2 and "embed" not in n and "lm_head" not in n), n
    assert model.model.smear_gate.weight.use_muon is True


def test_nanochat_muon_routing_keeps_smear_gate_on_adam():
    model = NanoChatForCausalLM(tiny_config())
    groups = zero.deepspeed_param_groups(model, **lrs())
    in_matrix = {id(p) for g in groups if g["name"] == "matrix" for p in g["params"]}
    original = deepspeed.set_optimizer_flags
    with zero.nanochat_muon_routing():
        deepspeed.set_optimizer_flags(SimpleNamespace(optimizer_name="muon", optimizer_params={}), model)
    assert deepspeed.set_optimizer_flags is original
    for n, p in model.named_parameters():
        assert p.use_muon == (id(p) in in_matrix), n
        assert p.use_muon == n.startswith("model.layers."), n  # nanochat: every block matrix, nothing else
    assert model.model.smear_gate.weight.use_muon is False


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_param_groups_follow_nanochat(optimizer):
    model = NanoChatForCausalLM(tiny_config())
    names = {id(p): n for n, p in model.named_parameters()}
    groups = zero.deepspeed_param_groups(model, optimizer=optimizer, **lrs())
    placed = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(names.values())  # every parameter exactly once
    expected = nanochat_expectation(optimizer)
    for g in groups:
        assert g["initial_lr"] == g["lr"] and g["kind"] == ("muon" if g["name"] == "matrix" and optimizer == "muon"
                                                            else "adamw")
        for p in g["params"]:
            want = expected[names[id(p)]]
            assert g["name"] == want["nanochat_group"]
            assert getattr(p, zero.MUON_FLAG) == want["use_muon"]
            for key in ("lr", "betas", "eps", "weight_decay", "momentum"):
                if key in want:
                    got = list(g[key]) if key == "betas" else g[key]
                    assert got == pytest.approx(want[key]), (g["name"], key)


def test_param_groups_read_layer_shapes_of_partitioned_params():
    """Under zero.Init a parameter is a flat (often empty) partition with its shape in ds_shape."""
    model = NanoChatForCausalLM(tiny_config())
    reference = [(g["name"], [id(p) for p in g["params"]]) for g in zero.deepspeed_param_groups(model, **lrs())]
    for p in model.parameters():
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    partitioned = [(g["name"], [id(p) for p in g["params"]]) for g in zero.deepspeed_param_groups(model, **lrs())]
    assert partitioned == reference


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_set_schedule(optimizer):
    """On groups shaped like DeepSpeed's live ones (use_muon added) and a ZeRO-3-like inner optimizer."""
    groups = zero.deepspeed_param_groups(NanoChatForCausalLM(tiny_config()), optimizer=optimizer, **lrs())
    for g in groups:
        g["use_muon"] = g["kind"] == "muon"
    fixed_wd = {g["name"]: g["weight_decay"] for g in groups if g["name"] != "matrix"}
    inner = SimpleNamespace(muon_beta=0.95)
    zero.set_schedule(SimpleNamespace(param_groups=groups, optimizer=inner), lr_multiplier=0.25, muon_momentum=0.9,
                      muon_weight_decay=0.1)
    for g in groups:
        assert g["lr"] == pytest.approx(0.25 * g["initial_lr"])
        if g["name"] == "matrix":  # nanochat's Muon decay schedule, at the same per-step shrink lr * wd
            assert g["weight_decay"] * g["lr"] == pytest.approx(0.1 * 0.25 * lrs()["matrix_lr"])
            assert g.get("momentum") == (0.9 if optimizer == "muon" else None)
        else:
            assert g["weight_decay"] == fixed_wd[g["name"]] and "momentum" not in g
    assert inner.muon_beta == 0.9


def test_optimizer_block():
    muon = zero.deepspeed_optimizer_block("muon", lr=0.02, weight_decay=0.1)
    assert muon["type"] == "Muon" and muon["params"]["momentum"] == 0.95 and muon["params"]["torch_adam"] is True
    adamw = zero.deepspeed_optimizer_block("adamw", lr=1e-3)
    assert adamw["type"] == "AdamW" and "momentum" not in adamw["params"]
    with pytest.raises(ValueError, match="one of"):
        zero.deepspeed_optimizer_block("sgd")


# ---------------------------------------------------------------- launched (2 processes)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(name, out):
    yaml, optimizer, _ = RUNS[name]
    env = dict(os.environ, DS_ACCELERATOR="cpu", TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / yaml),
           "--main_process_port", str(_free_port()), str(WORKER), "--optimizer", optimizer, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"{name}: accelerate launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    reports = sorted((json.loads(f.read_text()) for f in out.glob("rank*.json")), key=lambda r: r["rank"])
    return SimpleNamespace(name=name, out=out, optimizer=optimizer, stage=RUNS[name][2], reports=reports)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = _launch(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_under_deepspeed(launched, name):
    run = launched(name)
    assert [r["rank"] for r in run.reports] == [0, 1]
    for r in run.reports:
        assert r["world_size"] == 2, "torch.distributed does not see 2 ranks"
        assert r["accelerator_num_processes"] == 2, "Accelerate sees a different world than torch.distributed"
        assert r["stage"] == run.stage
        assert r["gradient_clipping"] == 0.0  # nanochat does not clip; Accelerate's "auto" would have been 1.0
    first = run.reports[0]
    assert first["zero_optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if run.stage == 3 else "DeepSpeedZeroOptimizer")
    assert first["basic_optimizer"] == ("MuonWithAuxAdam" if run.optimizer == "muon" else "AdamW")
    if run.stage == 3:
        assert first["zero_init"], "the ZeRO-3 model was not built partitioned (zero.Init), so that case is untested"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_each_parameter_in_its_nanochat_group(launched, name):
    """Read from the live DeepSpeed optimizer on both ranks: group membership, Muon/Adam side, lr/betas/eps/wd."""
    run = launched(name)
    expected = nanochat_expectation(run.optimizer)
    for r in run.reports:
        members = [m for g in r["groups"] for m in g["members"]]
        assert sorted(members) == sorted(expected)  # every parameter exactly once
        for g in r["groups"]:
            assert g["initial_lr"] == g["lr"] and g["kind"] == ("muon" if g.get("use_muon") else "adamw")
            for member in g["members"]:
                want = expected[member]
                assert g["nanochat_group"] == want["nanochat_group"], member
                assert bool(g.get("use_muon", False)) == want["use_muon"], member
                for key, value in want.items():
                    if key not in ("nanochat_group", "use_muon"):
                        assert g[key] == pytest.approx(value), (member, key)
        smear = next(g for g in r["groups"] if "model.smear_gate.weight" in g["members"])
        assert smear["nanochat_group"] == "smear" and not smear.get("use_muon") and smear["lr"] == 0.2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_loss_falls(launched, name):
    losses = launched(name).reports[0]["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert launched(name).reports[1]["losses"] == losses  # the global mean, the same on both ranks


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_one_optimizer_step_per_accumulated_batch(launched, name):
    """With set_gradient_accumulation_boundary before each backward, DeepSpeed steps once per GAS micro-batches."""
    acc = launched(name).reports[0]["accumulation"]
    assert acc["gas"] > 1 and acc["engine_gas"] == acc["gas"]
    assert acc["engine_global_steps"] == acc["optimizer_steps"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_group_lr_set_each_step_reaches_the_update(launched, name):
    """A step with lr = 0 in every other group: exactly the parameters of the other groups move; then flipped."""
    r = launched(name).reports[0]
    by_name = {g["name"]: g["members"] for g in r["groups"]}
    assert len(r["lr_check"]) == 2
    for check in r["lr_check"]:
        assert check["lr_on"], "no group had lr > 0"
        assert check["moved"] == sorted(m for n in check["lr_on"] for m in by_name[n])


@pytest.mark.slow
@pytest.mark.parametrize("name", MUON_RUNS)
def test_muon_momentum_can_be_scheduled(launched, name):
    """set_schedule(muon_momentum=1.0) freezes the momentum buffer for a step, 0.5 moves it: the value is live
    (ZeRO-1/2 read the group; ZeRO-3 reads a copy taken at init, which set_schedule also sets)."""
    check = launched(name).reports[0]["momentum_check"]
    assert check["beta_1"]["buffers"] >= 1
    assert check["beta_1"]["unchanged"] is True
    assert check["beta_0.5"]["unchanged"] is False
    print(f"{name}: setting only group['momentum'] takes effect: {check['group_key_only_beta_1_unchanged']}")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_deepspeed_checkpoint_restores_optimizer_state(launched, name):
    """engine.save_checkpoint / load_checkpoint (the resume path under ZeRO): the same two steps after loading give
    the same losses as right after saving, so momentum buffers and Adam moments came back with the weights."""
    r = launched(name).reports[0]
    assert r["resumed"] == pytest.approx(r["continued"], rel=1e-6, abs=0)
    assert r["continued"][0] != r["continued"][1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_checkpoint_loads_with_from_pretrained(launched, name):
    run = launched(name)
    loaded = NanoChatForCausalLM.from_pretrained(run.out / "hf")
    gathered = torch.load(run.out / "gathered.pt")
    params = dict(loaded.named_parameters())
    assert sorted(params) == sorted(gathered)
    for n, t in gathered.items():
        assert torch.equal(params[n], t), n
