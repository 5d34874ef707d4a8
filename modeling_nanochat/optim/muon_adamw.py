"""nanochat's MuonAdamW optimizer, written for this package from the spec (NANOCHAT_REFERENCE.md §3).

One `torch.optim.Optimizer` holds two kinds of parameter groups:

* ``kind="adamw"`` (embeddings, lm_head, scalars): keys ``lr, betas, eps, weight_decay``.
  Decoupled weight decay, bias-corrected Adam; the math runs in fp32 and is written back in the
  parameter's dtype (nanochat keeps wte / value embeddings in bf16 on GPU).
* ``kind="muon"`` (every matrix of the transformer blocks): keys ``lr, momentum, ns_steps, beta2,
  weight_decay``. All parameters of one group have the same 2-D shape and are updated as one stack:
  Nesterov momentum -> MuonEq row equilibration -> Polar Express orthogonalisation -> Muon+ renorm ->
  NorMuon variance reduction -> cautious weight decay, with lr scaled by ``max(1, rows/cols) ** 0.5``.

Distributed use (torch.distributed initialised, world size > 1)
--------------------------------------------------------------
The optimizer averages gradients itself, ZeRO-2 style, exactly like nanochat: **do not also wrap the
model in DDP** (that would average twice and waste the communication). Each rank runs forward/backward
on its own micro-batches with a plain (unwrapped) model, then calls ``step()`` on every rank (where the gradients
are already averaged, e.g. by DDP inside a transformers Trainer, pass ``distributed=False``: every rank then runs
the single-process path on them; see optim/trainer_mixin.py):

* AdamW params with < 1024 elements: gradient all-reduce (mean), every rank updates the whole tensor.
* larger AdamW params: reduce-scatter (mean) along dim 0, each rank updates and keeps state only for
  its row slice, then all-gather the updated rows. (If dim 0 is not divisible by the world size the
  param falls back to the all-reduce path; the update is elementwise, so the numbers are the same.)
* Muon groups: grads are stacked, zero-padded to a multiple of the world size and reduce-scattered so
  each rank owns whole matrices; owners update them and all ranks all-gather the stack back.

With Accelerate this means: ``accelerator.prepare(optimizer, dataloader, ...)`` but do not ``prepare`` the
model (that wraps it in DDP); move it with ``model.to(accelerator.device)``, scale the loss by
``1 / grad_accum_steps`` per micro-step as nanochat does, and save the model weights yourself (or via
``accelerator.register_for_checkpointing``), since ``save_state`` only saves prepared models.

Saving and resuming
-------------------
On more than one rank the optimizer state is sharded, so rank 0's local state alone is not a checkpoint.
``state_dict()`` is therefore the *full*, world-size-independent state: every sharded tensor is
all-gathered and the Muon stacks are split into ordinary per-parameter entries (torch's usual
``{"state": {index: {...}}, "param_groups": [...]}`` layout, tensors on CPU). ``load_state_dict()``
accepts that form under any world size and keeps only this rank's slices. Both are collectives when
distributed: **call them on every rank** (Accelerate's ``save_state`` / ``load_state`` and ``prepare`` do;
a hand-written loop must call ``state_dict()`` on all ranks and ``torch.save`` it on rank 0 only, and on
resume load the same file on all ranks). ``state_dict_full`` / ``load_state_dict_full`` are the same
methods under explicit names.

Only torch is imported here because this file ships inside the library package.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist
from torch import Tensor

# which parameter is which (embeddings, head, scalars by group, block matrices) is derived from the model in one
# place, checkpoints.architecture, rather than by name patterns kept here
from modeling_nanochat.checkpoints.architecture import BLOCK, EMBEDDING, parameter_role
from modeling_nanochat.utils.distributed import rank_world

# Polar Express coefficients (a, b, c) for 5 iterations (Amsel et al. 2025, arXiv:2505.16932), as used by nanochat.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)

# AdamW params smaller than this are all-reduced and updated redundantly; sharding them is not worth a collective.
SMALL_PARAM_NUMEL = 1024

_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
_MUON_KEYS = ("lr", "momentum", "ns_steps", "beta2", "weight_decay")


def _f32(x: float) -> Tensor:
    """Hyperparameter as a 0-D fp32 CPU tensor.

    nanochat does its scalar arithmetic (1 - lr*wd, beta**step, ...) on fp32 0-D tensors, so doing the
    same reproduces its rounding; as CPU scalars they also mix with CUDA tensors and do not make a
    compiled step recompile when the value changes.
    """
    return torch.tensor(float(x), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Update math (pure tensor functions, torch.compile friendly)


def adamw_update(p: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: Tensor,
                 beta1: Tensor, beta2: Tensor, eps: Tensor, weight_decay: Tensor) -> None:
    """One AdamW step in place. Math in fp32 whatever the storage dtype (bf16 `1 - beta2` would lose everything)."""
    p32, m32, v32, g32 = p.float(), exp_avg.float(), exp_avg_sq.float(), grad.float()
    p32.mul_(1 - lr * weight_decay)  # decoupled decay, before the moment update
    m32.lerp_(g32, 1 - beta1)
    v32.lerp_(g32.square(), 1 - beta2)
    bias1 = 1 - beta1 ** step
    bias2 = 1 - beta2 ** step
    # in place on one temporary: bitwise the same as (v/b2).sqrt() + eps and m / denom, two fewer table-sized
    # allocations (eager AdamW on the embedding tables is memory bound: ~2x faster on a 2-core CPU)
    denom = (v32 / bias2).sqrt_().add_(eps)
    p32.add_(torch.div(m32, denom, out=denom), alpha=-(lr / bias1))
    # copy_ is a no-op when storage is already fp32 (p32 is p then); otherwise it rounds back to bf16
    p.copy_(p32)
    exp_avg.copy_(m32)
    exp_avg_sq.copy_(v32)


def polar_express(X: Tensor, ns_steps: int) -> Tensor:
    """Approximate the orthogonal polar factor of each matrix in the stack X (..., m, n)."""
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-6)  # spectral norm <= 1 so the iteration converges
    tall = X.size(-2) > X.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:ns_steps]:
        # work with the smaller Gram matrix: (n, n) for tall matrices, (m, m) for wide/square ones
        A = X.mT @ X if tall else X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + (X @ B if tall else B @ X)
    return X


def muon_update(params: Tensor, grads: Tensor, momentum_buffer: Tensor, second_moment: Tensor, momentum: Tensor,
                lr: Tensor, weight_decay: Tensor, beta2: Tensor, ns_steps: int, matmul_dtype: torch.dtype) -> None:
    """One Muon step in place for a stack of same-shape matrices (K, m, n). `grads` is used as scratch space.

    `second_moment` is (K, m, 1) when m >= n (statistics per row) and (K, 1, n) otherwise (per column).
    """
    m, n = params.size(-2), params.size(-1)
    red_dim = -1 if m >= n else -2

    # Nesterov momentum, EMA form: buf <- lerp(buf, g, 1-mu); g <- lerp(g, buf, mu)
    mu = momentum.to(grads.dtype)
    momentum_buffer.lerp_(grads, 1 - mu)
    g = grads.lerp_(momentum_buffer, mu)

    X = g.to(matmul_dtype)
    # MuonEq: every row rescaled to the mean row norm (norms in fp32) so the spectrum is better conditioned
    row_target = X.float().norm(dim=(-2, -1), keepdim=True) / (m ** 0.5)
    row_norm = X.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    X = X * (row_target / row_norm).to(X.dtype)
    X = polar_express(X, ns_steps)
    g = X.to(params.dtype)

    # Muon+: snap the Frobenius norm to that of an exactly semi-orthogonal matrix, sqrt(min(m, n))
    frob = g.float().norm(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    g = g * ((min(m, n) ** 0.5) / frob).to(g.dtype)

    # NorMuon: per-row (or per-column) second moment, then rescale so the Frobenius norm is unchanged
    v_mean = g.float().square().mean(dim=red_dim, keepdim=True)
    red_size = g.size(red_dim)
    norm_before = (v_mean.sum(dim=(-2, -1), keepdim=True) * red_size).sqrt()
    second_moment.lerp_(v_mean.to(second_moment.dtype), 1 - beta2.to(g.dtype))
    scale = second_moment.clamp_min(1e-10).rsqrt()
    norm_after = ((v_mean * red_size) * scale.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    g = g * (scale * (norm_before / norm_after.clamp_min(1e-10))).to(g.dtype)

    # Cautious weight decay: decay only where the update and the weight agree in sign
    lr = lr.to(g.dtype)
    wd = weight_decay.to(g.dtype)
    agree = (g * params) >= 0
    params.sub_(lr * g + lr * wd * params * agree)


_compiled = {}


def _maybe_compiled(fn, use_compile: bool):
    """torch.compile the update functions lazily and once. Worth it on GPU; on CPU it costs ~20-60 s of compiling
    (cold inductor cache) and then makes the optimizer step ~25% faster (d4: AdamW ~2x, Muon ~1.1x), ~10% of the
    whole training step (bench/pretrain_throughput.py), so it pays off on long runs."""
    if not use_compile:
        return fn
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled[fn]


# ---------------------------------------------------------------------------------------------------------------------
# Communication helpers


class _Pending:
    """An async collective, plus the division that turns a SUM into a mean when the backend has no AVG."""

    def __init__(self, work=None, result: Tensor | None = None, divisor: int = 1):
        self.work, self.result, self.divisor = work, result, divisor
        self.stacked = None  # Muon: the padded stack that was reduce-scattered, reused as the all_gather output

    def wait(self) -> Tensor | None:
        if self.work is not None:
            self.work.wait()
            self.work = None
            if self.divisor != 1:
                self.result.div_(self.divisor)
        return self.result


def _mean_op(world_size: int) -> tuple:
    # gloo only gained ReduceOp.AVG in torch 2.8 (pytorch#149781), and implements it as SUM followed by a division.
    # Doing SUM + div_ ourselves on gloo therefore gives identical numbers there and also works on older torch.
    if dist.get_backend() == "gloo":
        return dist.ReduceOp.SUM, world_size
    return dist.ReduceOp.AVG, 1


def _all_reduce_mean(t: Tensor, world_size: int) -> _Pending:
    op, div = _mean_op(world_size)
    return _Pending(dist.all_reduce(t, op=op, async_op=True), t, div)


def _reduce_scatter_mean(out: Tensor, inp: Tensor, world_size: int) -> _Pending:
    op, div = _mean_op(world_size)
    # torch 2.13 renamed reduce_scatter_tensor to reduce_scatter_single (the old name warns)
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return _Pending(fn(out, inp, op=op, async_op=True), out, div)


def _all_gather(out: Tensor, inp: Tensor, async_op: bool = True):
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, inp, async_op=async_op)


def _adamw_is_sharded(p: Tensor, world_size: int) -> bool:
    return world_size > 1 and p.numel() >= SMALL_PARAM_NUMEL and p.shape[0] % world_size == 0


def _muon_chunk(num_params: int, world_size: int) -> int:
    """Matrices per rank: ceil(K / world_size); the last ranks may own fewer (or none)."""
    return -(-num_params // world_size)


def _muon_matmul_dtype(param_dtype: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    # bf16 only when asked (nanochat: COMPUTE_DTYPE bf16) or when the weights themselves are bf16. fp16 is never used
    # for the iteration: its exponent range is too small, nanochat keeps fp32 there.
    if requested == torch.bfloat16 or (requested is None and param_dtype == torch.bfloat16):
        return torch.bfloat16
    return torch.float32 if param_dtype in (torch.float16, torch.bfloat16) else param_dtype


# ---------------------------------------------------------------------------------------------------------------------
# The optimizer


class MuonAdamW(torch.optim.Optimizer):
    """nanochat's combined Muon + AdamW optimizer (see the module docstring for groups, distribution and saving).

    Args:
        param_groups: list of dicts with ``params`` and ``kind`` ("adamw" or "muon") plus that kind's keys.
            Extra keys (``initial_lr``, ``name``, ...) are kept untouched, e.g. for LR schedules.
        muon_compute_dtype: dtype of the Polar Express matmuls. ``torch.bfloat16`` reproduces nanochat on
            GPUs with bf16 (fp32 master weights, bf16 iteration); ``None`` uses bf16 only for bf16 weights.
        compile: run the per-group update functions through ``torch.compile`` (worth it on GPU only).
        distributed: None (default): communicate when torch.distributed is initialised with more than one rank;
            False: never communicate, every rank updates every parameter from its own ``.grad`` (for gradients that
            are already averaged, e.g. by DDP inside a transformers Trainer); True: like None, but raise if no
            process group is initialised (catches a run that silently started as one process).
    """

    def __init__(self, param_groups: list[dict], *, muon_compute_dtype: torch.dtype | None = None,
                 compile: bool = False, distributed: bool | None = None):
        self.muon_compute_dtype = muon_compute_dtype
        self.use_compile = compile
        self.distributed = distributed
        super().__init__(param_groups, defaults={})

    def _world(self) -> tuple[int, int]:
        """(rank, world size) as this optimizer sees it: (0, 1) when it must not communicate."""
        if self.distributed is False:
            return 0, 1
        if self.distributed and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("MuonAdamW(distributed=True) needs an initialised torch.distributed process group")
        return rank_world()

    def add_param_group(self, param_group: dict) -> None:
        kind = param_group.get("kind")
        if kind not in ("adamw", "muon"):
            raise ValueError(f"param group kind must be 'adamw' or 'muon', got {kind!r}")
        missing = [k for k in (_ADAMW_KEYS if kind == "adamw" else _MUON_KEYS) if k not in param_group]
        if missing:
            raise ValueError(f"{kind} param group is missing {missing}")
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        if kind == "muon":
            shapes = {tuple(p.shape) for p in params}
            if not params:
                raise ValueError("a muon group needs at least one parameter")
            if len(shapes) > 1 or any(p.ndim != 2 for p in params):
                raise ValueError(f"a muon group needs 2-D params of one shape (they are stacked), got {sorted(shapes)}")
        super().add_param_group(param_group)

    # -- step ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world_size = self._world()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    # every rank must join every collective, so a missing grad cannot simply be skipped
                    raise RuntimeError(f"MuonAdamW: a parameter of shape {tuple(p.shape)} in a {group['kind']} group "
                                       "has no gradient; leave frozen/unused parameters out of the optimizer")
        # three phases so communication overlaps compute: launch every reduction, then per group wait + update +
        # launch the gather, then wait for the gathers and write back
        reductions = [self._launch_reduce(group, world_size) for group in self.param_groups]
        gathers = []
        for group, red in zip(self.param_groups, reductions):
            if group["kind"] == "adamw":
                gathers += self._adamw_group_step(group, red, rank, world_size)
            else:
                gathers += self._muon_group_step(group, red, rank, world_size)
        for work, finish in gathers:
            if work is not None:
                work.wait()
            if finish is not None:
                finish()
        return loss

    def _launch_reduce(self, group: dict, world_size: int):
        if group["kind"] == "adamw":
            out = []
            for p in group["params"]:
                if world_size == 1:
                    out.append(_Pending(result=p.grad))
                elif _adamw_is_sharded(p, world_size):
                    rows = p.shape[0] // world_size
                    out.append(_reduce_scatter_mean(torch.empty_like(p.grad[:rows]), p.grad, world_size))
                else:
                    out.append(_all_reduce_mean(p.grad, world_size))
            return out
        params = group["params"]
        if world_size == 1:
            return _Pending(result=torch.stack([p.grad for p in params]))
        chunk = _muon_chunk(len(params), world_size)
        p0 = params[0]
        stacked = torch.zeros(chunk * world_size, *p0.shape, dtype=p0.dtype, device=p0.device)  # zero padding
        torch.stack([p.grad for p in params], out=stacked[: len(params)])
        pending = _reduce_scatter_mean(torch.empty_like(stacked[:chunk]), stacked, world_size)
        pending.stacked = stacked
        return pending

    def _adamw_group_step(self, group: dict, reductions: list, rank: int, world_size: int) -> list:
        gathers = []
        beta1, beta2 = group["betas"]
        hyper = dict(lr=_f32(group["lr"]), beta1=_f32(beta1), beta2=_f32(beta2), eps=_f32(group["eps"]),
                     weight_decay=_f32(group["weight_decay"]))
        update = _maybe_compiled(adamw_update, self.use_compile)
        for p, red in zip(group["params"], reductions):
            grad = red.wait()
            sharded = _adamw_is_sharded(p, world_size)
            rows = p.shape[0] // world_size
            p_local = p[rank * rows:(rank + 1) * rows] if sharded else p
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p_local)
                state["exp_avg_sq"] = torch.zeros_like(p_local)
            state["step"] += 1
            update(p_local, grad, state["exp_avg"], state["exp_avg_sq"], _f32(state["step"]), **hyper)
            if sharded:
                # p_local is a view of p, so gathering into p needs a separate input buffer
                gathers.append((_all_gather(p, p_local.clone()), None))
        return gathers

    def _muon_group_step(self, group: dict, red: _Pending, rank: int, world_size: int) -> list:
        params = group["params"]
        p0 = params[0]
        m, n = p0.shape
        chunk = _muon_chunk(len(params), world_size)
        first = rank * chunk
        owned = params[first:first + chunk]  # may be empty on the last ranks
        grads = red.wait()
        state = self.state[p0]  # group state lives on the first param, stacked for the matrices this rank owns
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(chunk, m, n, dtype=p0.dtype, device=p0.device)
            moment_shape = (chunk, m, 1) if m >= n else (chunk, 1, n)
            state["second_momentum_buffer"] = torch.zeros(moment_shape, dtype=p0.dtype, device=p0.device)
        k = len(owned)
        stack = None
        if k:
            stack = torch.stack(owned)
            update = _maybe_compiled(muon_update, self.use_compile)
            update(stack, grads[:k], state["momentum_buffer"][:k], state["second_momentum_buffer"][:k],
                   momentum=_f32(group["momentum"]), lr=_f32(group["lr"] * max(1.0, m / n) ** 0.5),
                   weight_decay=_f32(group["weight_decay"]), beta2=_f32(group["beta2"]),
                   ns_steps=int(group["ns_steps"]),
                   matmul_dtype=_muon_matmul_dtype(p0.dtype, self.muon_compute_dtype))
        if world_size == 1:
            torch._foreach_copy_(params, list(stack.unbind(0)))
            return []
        mine = torch.zeros(chunk, m, n, dtype=p0.dtype, device=p0.device)
        if k:
            mine[:k].copy_(stack)
        full = red.stacked

        def copy_back():
            torch._foreach_copy_(params, list(full[: len(params)].unbind(0)))

        return [(_all_gather(full, mine), copy_back)]

    # -- world-size independent state ----------------------------------------------------------------------------

    def _param_index(self) -> list[tuple[dict, list[int]]]:
        out, i = [], 0
        for group in self.param_groups:
            out.append((group, list(range(i, i + len(group["params"])))))
            i += len(group["params"])
        return out

    @torch.no_grad()
    def state_dict_full(self) -> dict:
        """Full optimizer state in torch's layout, the same under any world size; tensors on CPU.

        A collective when distributed: call it on every rank (every rank gets the full dict).
        """
        rank, world_size = self._world()
        state, groups = {}, []
        for group, indices in self._param_index():
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
            params = group["params"]
            if group["kind"] == "adamw":
                for i, p in zip(indices, params):
                    st = self.state.get(p)
                    if not st:
                        continue
                    entry = {"step": st["step"]}
                    for key in ("exp_avg", "exp_avg_sq"):
                        t = st[key]
                        if _adamw_is_sharded(p, world_size):
                            full = torch.empty(p.shape, dtype=t.dtype, device=t.device)
                            _all_gather(full, t.contiguous(), async_op=False)
                            t = full
                        entry[key] = t.detach().to("cpu", copy=True)
                    state[i] = entry
                continue
            st = self.state.get(params[0])
            if not st or "momentum_buffer" not in st:
                continue
            bufs = {}
            for key in ("momentum_buffer", "second_momentum_buffer"):
                t = st[key]
                if world_size > 1:
                    full = torch.empty((t.shape[0] * world_size, *t.shape[1:]), dtype=t.dtype, device=t.device)
                    _all_gather(full, t.contiguous(), async_op=False)
                    t = full
                bufs[key] = t[: len(params)].to("cpu", copy=True)
            for j, i in enumerate(indices):
                state[i] = {key: bufs[key][j].clone() for key in bufs}
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict_full(self, state_dict: dict) -> None:
        """Load a `state_dict_full()` result saved under any world size; each rank keeps only its own shards."""
        rank, world_size = self._world()
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"saved state has {len(saved_groups)} param groups, optimizer has {len(self.param_groups)}")
        saved_state = {int(k): v for k, v in state_dict["state"].items()}
        for (group, indices), saved in zip(self._param_index(), saved_groups):
            if saved["kind"] != group["kind"] or len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group mismatch: saved {saved['kind']} with {len(saved['params'])} params, "
                                 f"optimizer {group['kind']} with {len(group['params'])}")
            params = group["params"]
            entries = [saved_state.get(int(i)) for i in saved["params"]]
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
            for p in params:
                self.state.pop(p, None)
            if group["kind"] == "adamw":
                for p, entry in zip(params, entries):
                    if entry is None:
                        continue
                    st = {"step": int(entry["step"])}
                    rows = p.shape[0] // world_size
                    for key in ("exp_avg", "exp_avg_sq"):
                        t = entry[key]
                        if tuple(t.shape) != tuple(p.shape):
                            raise ValueError(f"saved {key} has shape {tuple(t.shape)}, param {tuple(p.shape)}")
                        if _adamw_is_sharded(p, world_size):
                            t = t[rank * rows:(rank + 1) * rows]
                        st[key] = t.to(device=p.device, dtype=p.dtype, copy=True)
                    self.state[p] = st
                continue
            present = [e is not None for e in entries]
            if not any(present):
                continue
            if not all(present):
                raise ValueError("saved muon group state covers only some of its params")
            p0 = params[0]
            chunk = _muon_chunk(len(params), world_size)
            owned = entries[rank * chunk: rank * chunk + chunk]
            st = {}
            for key in ("momentum_buffer", "second_momentum_buffer"):
                like = owned[0][key] if owned else entries[0][key]
                buf = torch.zeros((chunk, *like.shape), dtype=p0.dtype, device=p0.device)
                for j, e in enumerate(owned):
                    buf[j].copy_(e[key])
                st[key] = buf
            if tuple(st["momentum_buffer"].shape[1:]) != tuple(p0.shape):
                raise ValueError(f"saved muon state has shape {tuple(st['momentum_buffer'].shape[1:])}, "
                                 f"params {tuple(p0.shape)}")
            self.state[p0] = st

    # torch's own names are the world-size-independent ones, so Accelerate's prepare/save_state/load_state work.
    def state_dict(self) -> dict:  # noqa: D102 (see state_dict_full)
        return self.state_dict_full()

    def load_state_dict(self, state_dict: dict) -> None:  # noqa: D102 (see load_state_dict_full)
        self.load_state_dict_full(state_dict)


# ---------------------------------------------------------------------------------------------------------------------
# nanochat's parameter grouping (GPT.setup_optimizer) for this package's parameter names

# wrappers that prefix parameter names: torch.compile, DDP / Accelerate
_WRAPPER_PREFIX = re.compile(r"^(?:_orig_mod\.|module\.)+")


def build_param_groups(model: torch.nn.Module, *, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                       matrix_lr: float = 0.02, scalar_lr: float = 0.5, weight_decay: float = 0.0,
                       model_dim: int | None = None) -> list[dict]:
    """nanochat's `setup_optimizer` grouping, by this package's parameter names. Returns MuonAdamW param groups.

    Defaults are nanochat's function defaults (what its RL script uses); base_train passes 0.008 / 0.3 / 0.02 / 0.5
    times sqrt(batch/2**19) and a scaled Muon weight decay. AdamW LRs of lm_head / wte / value embeddings are further
    scaled by (model_dim / 768) ** -0.5. Every block parameter (``layers.{i}.*``) goes to Muon, grouped by shape
    (groups sorted by shape). Each group also gets ``initial_lr`` (for the LR schedule) and a ``name``.
    Parameters with ``requires_grad=False`` are left out; any other parameter that fits no group raises.
    """
    named = [(_WRAPPER_PREFIX.sub("", n), p) for n, p in model.named_parameters() if p.requires_grad]
    if model_dim is None:
        emb = [p for n, p in named if parameter_role(n) == EMBEDDING]
        if not emb:
            raise ValueError("model_dim not given and no embed_tokens.weight to read it from")
        model_dim = emb[0].shape[1]
    dmodel_scale = (model_dim / 768) ** -0.5  # AdamW LRs were tuned at d=768

    settings = {  # name: (lr, betas, weight_decay), all with eps=1e-10 as in nanochat
        "lm_head": (unembedding_lr * dmodel_scale, (0.8, 0.96), 0.01),
        "embedding": (embedding_lr * dmodel_scale, (0.8, 0.995), 0.001),
        "value_embeds": (embedding_lr * dmodel_scale * 0.5, (0.8, 0.995), 0.01),
        "resid": (scalar_lr * 0.01, (0.8, 0.95), 0.05),
        "x0": (scalar_lr, (0.96, 0.95), 0.0),  # higher beta1 for x0
        "smear": (0.2, (0.8, 0.95), 0.0),  # fixed LR in nanochat, not scaled
    }
    # the AdamW group of a parameter is its role (architecture.parameter_role); block parameters go to Muon
    adamw = {name: [] for name in settings}
    matrices, unplaced = [], []
    for n, p in named:
        role = parameter_role(n)
        if role in adamw:
            adamw[role].append(p)
        elif role == BLOCK and p.ndim == 2:
            matrices.append(p)
        else:
            unplaced.append(f"{n} {tuple(p.shape)}")
    if unplaced:
        raise ValueError("build_param_groups cannot place these parameters (block params must be 2-D matrices; "
                         "others must be one of the nanochat embedding/lm_head/scalar names): " + ", ".join(unplaced))

    groups = []
    for name, (lr, betas, wd) in settings.items():
        if adamw[name]:  # a model variant without e.g. value embeddings simply has no such group
            groups.append(dict(kind="adamw", name=name, params=adamw[name], lr=lr, initial_lr=lr, betas=betas,
                               eps=1e-10, weight_decay=wd))
    for shape in sorted({tuple(p.shape) for p in matrices}):
        groups.append(dict(kind="muon", name=f"muon_{shape[0]}x{shape[1]}",
                           params=[p for p in matrices if tuple(p.shape) == shape], lr=matrix_lr, initial_lr=matrix_lr,
                           momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
    return groups
