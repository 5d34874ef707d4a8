"""Pretraining under DeepSpeed ZeRO: nanochat's parameter groups on DeepSpeed's own Muon (or AdamW).

Why not nanochat's MuonAdamW here: ZeRO hands the optimizer flat 1-D partitions, and MuonAdamW needs whole
matrices (and shards its own state). DeepSpeed's built-in ``"Muon"`` does the orthogonalisation inside ZeRO while
the gradients still have their shapes, so it is the optimizer to use under ZeRO. It is a different algorithm
(Keller Jordan's quintic Newton-Schulz; no Polar Express, MuonEq, NorMuon or cautious weight decay), so this path
trades exact optimizer parity for memory scaling. Use MuonAdamW under plain DDP/MULTI_GPU when parity matters.

What deepspeed 0.19.8 does (read from its source; see tests/optim/test_zero.py for the checks):

* ``deepspeed.initialize`` tags every parameter ``use_muon = (2-D and no "embed"/"lm_head" in its name)``,
  overwriting any attribute already there (``deepspeed/__init__.py`` ``set_optimizer_flags``). Our embeddings
  (``embed_tokens``, ``value_embeds``) and ``lm_head`` stay off Muon by name, but the 2-D ``smear_gate`` (1 x 24),
  which nanochat trains with AdamW at a fixed lr of 0.2, would land on Muon. Names are the checkpoint format and
  cannot change, so `nanochat_muon_routing` wraps that tagging function while ``prepare`` runs and re-applies
  the routing of `build_param_groups` (``nanochat_use_muon`` on each parameter). `check_routing` verifies it
  on the live optimizer afterwards, so a DeepSpeed that tags elsewhere fails loudly instead of silently.
* Each incoming param group is split into a Muon half (keys lr, momentum, weight_decay, ns_method) and an Adam
  half (lr, betas, eps, weight_decay); a group's own values win over the config's (``engine.py``
  ``_muon_param_groups``). Other keys (``initial_lr``, ``kind``) are dropped and the name becomes
  ``"<name>-muon-params"`` / ``"<name>-adam-params"``; `configure_deepspeed` puts ``kind``, ``initial_lr`` and
  ``nanochat_group`` back on the live groups.
* lr and weight decay are read from the live groups at every step (Muon: ``muon_optimizer.py`` step; Adam: the
  auxiliary torch AdamW shares the same group dicts). Muon momentum is read from the live group under ZeRO-1/2
  (``stage_1_and_2.py`` ``get_flat_partition``) but under ZeRO-3 from ``muon_beta``, fixed at init for all Muon
  groups (``stage3.py`` ``_create_fp16_partitions_with_defragmentation``); `set_schedule` sets both.
* ZeRO-3 + Muon refuses ``reduce_scatter`` (``stage3.py``: "Muon and reduce scatter cannot be used together");
  `configure_deepspeed` turns it off.

Using it from a training loop (every call on every rank):

1. On CPU create ``Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])`` (else DeepSpeed asserts
   on the batch size and Accelerate counts 1 process).
2. ``engine, opt = prepare_deepspeed(accelerator, model, plan, optimizer="muon" | "adamw", **lrs)``.
3. Per optimizer step: `set_schedule` FIRST (ZeRO reads the Muon momentum while it reduces gradients in the last
   backward; lr and weight decay are read in ``step()``), then for micro-batch ``i`` of ``gas``:
   ``engine.set_gradient_accumulation_boundary(i == gas - 1)``, ``engine.backward(loss)`` with the unscaled loss
   (DeepSpeed divides by ``gas``), and one ``engine.step()`` after the last. Without the boundary calls DeepSpeed
   counts micro-steps in ``step()`` and a single ``step()`` per ``gas`` backwards breaks accumulation.
4. Saving: `save_hf_checkpoint_zero` (a normal HF model dir) and ``engine.save_checkpoint(dir)`` for the sharded
   optimizer state; resume with ``engine.load_checkpoint(dir)``.

deepspeed is an optional dependency (the ``train`` extra), so it is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from modeling_nanochat.optim.muon_adamw import build_param_groups
from modeling_nanochat.optim.schedules import apply_schedule
from modeling_nanochat.utils.distributed import world_size

MUON_FLAG = "nanochat_use_muon"  # our routing, set on each parameter by deepspeed_param_groups
OPTIMIZERS = ("muon", "adamw")
_DS_TYPE = {"muon": "Muon", "adamw": "AdamW"}
# nanochat's AdamW betas for groups it does not tune specially; used for block matrices on the AdamW path
_MATRIX_ADAMW_BETAS = (0.8, 0.95)


def _check_optimizer(optimizer: str) -> str:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} under DeepSpeed, got {optimizer!r}")
    return optimizer


def deepspeed_param_groups(model: torch.nn.Module, *, optimizer: str = "muon", unembedding_lr: float,
                           embedding_lr: float, matrix_lr: float, scalar_lr: float, weight_decay: float,
                           matrix_adamw_lr: float | None = None, model_dim: int | None = None) -> list[dict]:
    """Param groups for ``accelerate.utils.DummyOptim(params=groups)`` under a DeepSpeed Muon/AdamW config.

    The AdamW groups are nanochat's six (`build_param_groups`: lm_head, embedding, value_embeds, resid, x0, smear)
    with their lr / betas / eps / weight decay. With ``optimizer="muon"`` every block matrix goes into one group
    ``"matrix"`` (lr ``matrix_lr``, momentum 0.95, weight decay ``weight_decay``): nanochat groups them by shape
    only to stack them, and DeepSpeed applies the same ``sqrt(max(1, rows/cols))`` lr scale per matrix.

    With ``optimizer="adamw"`` the block matrices go to AdamW too, at ``matrix_adamw_lr``; the default
    ``matrix_lr / sqrt(model_dim)`` matches the per-element size of a Muon step (an orthogonal d x d update has
    entries of RMS 1/sqrt(d)), and the weight decay is rescaled so the per-step shrink ``lr * wd`` is Muon's.

    Every group keeps ``name``, ``kind`` ("muon"/"adamw") and ``initial_lr`` for the LR schedule; the matrix group
    also ``weight_decay_scale`` (1, or ``matrix_lr / matrix_adamw_lr``) by which `set_schedule` multiplies nanochat's
    scheduled Muon weight decay. Every parameter gets ``nanochat_use_muon`` for `nanochat_muon_routing`.
    """
    _check_optimizer(optimizer)
    named = dict(model.named_parameters())
    # Group on stand-ins with each parameter's layer shape: under ZeRO-3's zero.Init a parameter is a flat,
    # possibly empty partition and its real shape is `ds_shape`; build_param_groups decides by shape.
    stand_ins = {n: torch.empty(_layer_shape(p), device="meta", requires_grad=p.requires_grad)
                 for n, p in named.items()}
    by_id = {id(t): named[n] for n, t in stand_ins.items()}
    if model_dim is None:
        model_dim = next((t.shape[1] for n, t in stand_ins.items() if n.endswith("embed_tokens.weight")), None)
    groups = build_param_groups(_NamedParams(stand_ins), unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                                matrix_lr=matrix_lr, scalar_lr=scalar_lr, weight_decay=weight_decay,
                                model_dim=model_dim)
    for g in groups:
        g["params"] = [by_id[id(t)] for t in g["params"]]
    out = [dict(g) for g in groups if g["kind"] == "adamw"]
    matrices = [p for g in groups if g["kind"] == "muon" for p in g["params"]]
    if optimizer == "muon":
        out.append(dict(name="matrix", kind="muon", params=matrices, lr=matrix_lr, initial_lr=matrix_lr,
                        momentum=0.95, weight_decay=weight_decay, weight_decay_scale=1.0))
    else:
        if matrix_adamw_lr is None:
            matrix_adamw_lr = matrix_lr / math.sqrt(model_dim)
        scale = matrix_lr / matrix_adamw_lr
        out.append(dict(name="matrix", kind="adamw", params=matrices, lr=matrix_adamw_lr, initial_lr=matrix_adamw_lr,
                        betas=_MATRIX_ADAMW_BETAS, eps=1e-10, weight_decay=weight_decay * scale,
                        weight_decay_scale=scale))
    out = [g for g in out if g["params"]]
    for g in out:
        for p in g["params"]:
            setattr(p, MUON_FLAG, g["kind"] == "muon")
    return out


class _NamedParams:
    """Just enough of a module for build_param_groups: ``named_parameters()`` over given tensors."""

    def __init__(self, named: dict):
        self._named = named

    def named_parameters(self):
        return iter(self._named.items())


def _layer_shape(p: torch.Tensor) -> tuple:
    ds_shape = getattr(p, "ds_shape", None)  # set by zero.Init; p.shape is then the flat partition's
    return tuple(p.shape if ds_shape is None else ds_shape)


def deepspeed_optimizer_block(optimizer: str = "muon", *, lr: float = 0.02, weight_decay: float = 0.0,
                              momentum: float = 0.95, betas: tuple[float, float] = (0.8, 0.95), eps: float = 1e-10,
                              ns_method: str = "gram", torch_adam: bool = True) -> dict:
    """The DeepSpeed config ``"optimizer"`` block. Its values are only defaults: every group of
    `deepspeed_param_groups` sets its own lr / betas / eps / weight decay (and momentum for Muon).

    ``torch_adam=True`` runs the Adam side as ``torch.optim.AdamW`` (the update nanochat's AdamW matches) instead of
    DeepSpeed's FusedAdam / CPU Adam, which JIT-compile C++/CUDA ops on first use (needs nvcc on a GPU box).
    ``ns_method``: DeepSpeed's Newton-Schulz, "gram" (fp16 on GPU, faster on rectangular matrices) or
    "standard" (bf16); fp32 where the device has neither (CPU).
    """
    params = dict(lr=lr, weight_decay=weight_decay, betas=list(betas), eps=eps, torch_adam=torch_adam)
    if _check_optimizer(optimizer) == "muon":
        params.update(momentum=momentum, ns_method=ns_method)
    return {"type": _DS_TYPE[optimizer], "params": params}


@contextlib.contextmanager
def nanochat_muon_routing():
    """While active, DeepSpeed's Muon tagging is followed by ours: a parameter carrying ``nanochat_use_muon``
    keeps that routing. ``deepspeed.initialize`` looks ``set_optimizer_flags`` up in its module at call time, so
    replacing the module attribute is enough; it is restored on exit."""
    import deepspeed

    original = deepspeed.set_optimizer_flags

    def set_flags(config_class, model):
        original(config_class, model)
        if getattr(config_class, "optimizer_name", None) == "muon":
            for p in model.parameters():
                if hasattr(p, MUON_FLAG):
                    p.use_muon = getattr(p, MUON_FLAG)

    deepspeed.set_optimizer_flags = set_flags
    try:
        yield
    finally:
        deepspeed.set_optimizer_flags = original


def _zero_stage(accelerator) -> int:
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def configure_deepspeed(accelerator, model: torch.nn.Module, groups: list[dict], optimizer: str = "muon", *,
                        micro_batch_size: int, gradient_accumulation_steps: int = 1, dataloader=None,
                        **block_kwargs):
    """``accelerator.prepare`` for a DeepSpeed run: writes the optimizer block into the DeepSpeed config, sets the
    batch geometry, prepares ``model`` with ``DummyOptim(params=groups)`` under `nanochat_muon_routing`, restores
    ``kind`` / ``initial_lr`` / ``nanochat_group`` on the live groups and checks the Muon routing.

    Returns ``(engine, optimizer)``, or ``(engine, optimizer, dataloader)`` when a dataloader is given. Call it on
    every rank. ``block_kwargs`` go to `deepspeed_optimizer_block` (e.g. ``ns_method``, ``torch_adam``).
    """
    from accelerate.utils import DistributedType, DummyOptim

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError("configure_deepspeed needs an Accelerator under DeepSpeed: launch with a ZeRO config, e.g. "
                         "`accelerate launch --config_file accelerate_configs/zero2_8gpu.yaml ...`")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    block = deepspeed_optimizer_block(optimizer, **block_kwargs)
    if "optimizer" in config and config["optimizer"].get("type", "").lower() != block["type"].lower():
        raise ValueError(f"the DeepSpeed config already has an optimizer of type {config['optimizer'].get('type')!r}"
                         f" but optimizer={optimizer!r} was asked; remove the block from the DeepSpeed config file")
    config["optimizer"] = block
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["train_batch_size"] = micro_batch_size * gradient_accumulation_steps * world_size()
    accelerator.gradient_accumulation_steps = gradient_accumulation_steps
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = 0.0  # nanochat does not clip; Accelerate would fill "auto" with 1.0
    if _zero_stage(accelerator) == 3:
        zero = config.setdefault("zero_optimization", {})
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save_hf_checkpoint_zero needs the gather
        if optimizer == "muon":
            zero["reduce_scatter"] = False  # stage3.py: "Muon and reduce scatter cannot be used together"

    dummy = DummyOptim(params=groups, lr=block["params"]["lr"], weight_decay=block["params"]["weight_decay"])
    with nanochat_muon_routing():
        prepared = accelerator.prepare(model, dummy, *([dataloader] if dataloader is not None else []))
    engine, opt = prepared[0], prepared[1]
    _restore_group_keys(opt, groups)
    check_routing(opt, engine)
    return tuple(prepared)


def _ds_group_prefix(group: dict) -> str:
    name = group.get("name", "")
    for suffix in ("-muon-params", "-adam-params"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _restore_group_keys(prepared_optimizer, groups: list[dict]) -> None:
    ours = {g["name"]: g for g in groups}
    for g in optimizer_param_groups(prepared_optimizer):
        src = ours.get(_ds_group_prefix(g))
        if src is None:
            raise RuntimeError(f"DeepSpeed built a param group {g.get('name')!r} that matches none of ours "
                               f"({sorted(ours)}); did the DeepSpeed version change how it names groups?")
        g["nanochat_group"] = src["name"]
        g["kind"] = "muon" if g.get("use_muon", False) else "adamw"
        g["initial_lr"] = src["initial_lr"]
        if "weight_decay_scale" in src:
            g["weight_decay_scale"] = src["weight_decay_scale"]


def optimizer_param_groups(prepared_optimizer) -> list[dict]:
    """The live param groups DeepSpeed steps with (the same dicts through every wrapper): setting ``lr`` /
    ``weight_decay`` here changes the next update. For Muon momentum use `set_schedule` (ZeRO-3 keeps a copy)."""
    return prepared_optimizer.param_groups


def _zero_optimizer(prepared_optimizer):
    """The optimizer the engine steps: DeepSpeed's ZeRO wrapper, or the basic optimizer at stage 0."""
    return getattr(prepared_optimizer, "optimizer", prepared_optimizer)


def set_schedule(prepared_optimizer, *, lr_multiplier: float, muon_momentum: float | None = None,
                 muon_weight_decay: float | None = None) -> None:
    """nanochat's per-step schedule on the live DeepSpeed groups: ``lr = initial_lr * lr_multiplier`` for every
    group; Muon groups get ``muon_momentum``; the block-matrix group (Muon, or AdamW with ``optimizer="adamw"``)
    gets ``muon_weight_decay * weight_decay_scale``. The other AdamW weight decays stay fixed, as in nanochat.
    Call it at the start of each optimizer step, before the micro-batches: ZeRO reads the Muon momentum while
    it reduces gradients in the last backward (lr and weight decay only in ``step()``)."""
    apply_schedule(optimizer_param_groups(prepared_optimizer), lr_multiplier=lr_multiplier,
                   muon_momentum=muon_momentum, muon_weight_decay=muon_weight_decay)
    zero = _zero_optimizer(prepared_optimizer)
    if muon_momentum is not None and getattr(zero, "muon_beta", None) is not None:
        zero.muon_beta = muon_momentum  # ZeRO-3 reads this single value, not the groups


def group_members(prepared_optimizer) -> list[list[torch.nn.Parameter]]:
    """The model parameters behind each live param group (under ZeRO the groups hold flat partitions)."""
    zero = _zero_optimizer(prepared_optimizer)
    n = len(optimizer_param_groups(prepared_optimizer))
    if hasattr(zero, "bit16_groups"):  # ZeRO-1/2: one flat group per param group, same order
        members = [list(g) for g in zero.bit16_groups]
    elif hasattr(zero, "fp16_groups") and hasattr(zero, "sub_group_to_group_id"):  # ZeRO-3: sub-groups
        members = [[] for _ in range(n)]
        for sub, params in enumerate(zero.fp16_groups):
            members[zero.sub_group_to_group_id[sub]].extend(params)
    else:  # stage 0: the groups hold the parameters themselves
        members = [list(g["params"]) for g in optimizer_param_groups(prepared_optimizer)]
    if len(members) != n:
        raise RuntimeError(f"found {len(members)} parameter lists for {n} param groups; unknown DeepSpeed layout")
    return members


def check_routing(prepared_optimizer, model: torch.nn.Module | None = None) -> None:
    """Raise if a parameter sits in a Muon group against its ``nanochat_use_muon`` routing (or vice versa)."""
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
    wrong = []
    for g, params in zip(optimizer_param_groups(prepared_optimizer), group_members(prepared_optimizer)):
        in_muon = bool(g.get("use_muon", False))
        for p in params:
            want = getattr(p, MUON_FLAG, in_muon)
            if want != in_muon or bool(getattr(p, "use_muon", in_muon)) != in_muon:
                wrong.append(f"{names.get(id(p), tuple(p.shape))} in {g.get('name')!r}")
    if wrong:
        raise RuntimeError("DeepSpeed put these parameters on the wrong side of Muon/Adam: " + ", ".join(wrong)
                           + ". Prepare through configure_deepspeed (or inside nanochat_muon_routing()).")


def save_hf_checkpoint_zero(accelerator, model, out_dir, *, safe_serialization: bool = True) -> None:
    """Save a normal Hugging Face model directory from a DeepSpeed engine (ZeRO-1/2/3). Call on every rank: under
    ZeRO-3 the full weights are gathered collectively (``stage3_gather_16bit_weights_on_model_save``, which
    `configure_deepspeed` turns on); only rank 0 writes. Weights come in the model's dtype (bf16 under bf16 mixed
    precision); the fp32 masters stay in DeepSpeed's own checkpoint (``engine.save_checkpoint``)."""
    state_dict = accelerator.get_state_dict(model)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        accelerator.unwrap_model(model).save_pretrained(out_dir, state_dict=state_dict,
                                                        safe_serialization=safe_serialization)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def prepare_deepspeed(accelerator, model: torch.nn.Module, plan, *, optimizer: str = "muon", **lrs):
    """`deepspeed_param_groups` + `configure_deepspeed` with the batch geometry of a `scaling.TrainingPlan`
    (``device_batch_size``, ``grad_accum_steps``). ``lrs``: unembedding_lr, embedding_lr, matrix_lr, scalar_lr,
    weight_decay (and optionally matrix_adamw_lr). Returns ``(engine, optimizer)``."""
    groups = deepspeed_param_groups(model, optimizer=optimizer, **lrs)
    return configure_deepspeed(accelerator, model, groups, optimizer, micro_batch_size=plan.device_batch_size,
                               gradient_accumulation_steps=plan.grad_accum_steps)
