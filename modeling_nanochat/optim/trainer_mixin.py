"""nanochat's MuonAdamW inside transformers/TRL Trainers, through the Trainer's own hooks (no fork of either).

    class MyTrainer(MuonAdamWTrainerMixin, SFTTrainer):     # the mixin goes first
        ...
    trainer = MyTrainer(..., muon_setup=MuonAdamWSetup(param_groups=..., lr_schedule=sft_lr_schedule(),
                                                        muon_momentum=sft_muon_momentum))  # optim/schedules.py

What the mixin changes, and why:

* ``create_optimizer`` builds a ``MuonAdamW`` over ``muon_setup.param_groups(model)`` (default: nanochat's
  ``setup_optimizer`` grouping with its function-default LRs). Trainer's ``optim``, ``learning_rate`` and
  ``weight_decay`` flags are not used: every group carries its own LR and decay, as in nanochat.
* Gradients are averaged once. Under more than one process Trainer wraps the model in DDP, which averages the
  gradients during backward; by default MuonAdamW is then built with ``distributed=False`` and runs its single-rank
  path on every rank (same averaged gradients, same update, replicated optimizer state). With
  ``shard_optimizer=True`` it is nanochat's layout instead: DDP's all-reduce is replaced by a no-op communication
  hook and MuonAdamW reduce-scatters the gradients itself, keeps only its shard of the state (ZeRO-2 style) and
  all-gathers the updated weights. Same math either way; sharding saves optimizer memory and each rank's share of
  the Muon compute, DDP overlaps its all-reduce with the backward pass. (Both communicating would average twice:
  the same numbers, twice the traffic.)
* ``create_scheduler`` returns ``NanoChatSchedule``: ``lr = initial_lr * lr_schedule(step, num_steps)`` for every
  group and, if given, the Muon momentum ``muon_momentum(step)``. Trainer steps it after every optimizer step, so
  optimizer step ``s`` (0-based) runs with the values for ``s``, as nanochat's loops do.
* Saving is safe on every path: if the optimizer does communicate (a user-built ``MuonAdamW`` with the default
  ``distributed=None`` under several processes), ``state_dict()`` is a collective, and Trainer would call it on
  rank 0 only and hang; ``_save_optimizer_and_scheduler`` then gathers on every rank and writes on rank 0.
* DeepSpeed and FSDP are refused with a clear message: both flatten or shard the parameters, while Muon needs each
  weight matrix whole (use the DDP accelerate configs; ZeRO has its own Muon, see modeling_nanochat/optim/zero.py).
* SIGTERM / SIGINT during ``train()`` (``SaveOnSignal``, on by default, ``save_on_signal=False`` turns it off): the
  handler only notes the signal; at the end of the current optimizer step every rank agrees to stop (one tiny
  all-reduce per step under several processes), the Trainer saves its normal ``checkpoint-<step>`` (weights,
  optimizer, scheduler, RNG, trainer_state.json: ``resume_from_checkpoint`` continues exactly) and ``train()`` raises
  ``TrainingInterrupted``; entry points print it (``report_interrupted``) and exit with 128 + signum. A repeated
  signal while the checkpoint is written is ignored (a second Ctrl-C *before* the step ends stops at once).
* ``train(resume_from_checkpoint=...)`` first checks that checkpoint (``checkpoints.training_state.
  check_trainer_checkpoint``): the Trainer writes checkpoints in place, so a run killed while saving leaves a partial
  one, from which the Trainer would resume with a fresh optimizer when the optimizer file is missing. The user gets
  one error naming the missing or broken file and the earlier checkpoint to resume from.

Also here: ``load_optimizer_state`` (warm-start from a pretraining checkpoint's optimizer state when it fits).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from modeling_nanochat.optim.muon_adamw import MuonAdamW, build_param_groups
from modeling_nanochat.optim.schedules import NanoChatSchedule, constant_schedule
from modeling_nanochat.utils.distributed import rank_world
from modeling_nanochat.utils.run_files import MetricsLog

# ---------------------------------------------------------------------------------------------------------------------
# Parameter groups and the optimizer


def nanochat_param_groups(model: torch.nn.Module, *, unembedding_lr: float = 0.004, embedding_lr: float = 0.2,
                          matrix_lr: float = 0.02, scalar_lr: float = 0.5, weight_decay: float = 0.0,
                          init_lr_frac: float = 1.0) -> list[dict]:
    """nanochat's ``setup_optimizer`` groups (``optim.build_param_groups``) for a plain, DDP- or PEFT-wrapped model,
    then every ``lr`` and ``initial_lr`` times ``init_lr_frac`` (chat_sft 0.8, chat_rl 0.05).

    Only trainable parameters are grouped (a LoRA model gets its adapters, in Muon groups by shape); the AdamW LR
    scaling by model width uses ``config.hidden_size`` so it does not depend on which parameters are trainable."""
    base = model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model
    config = getattr(base, "config", None)
    model_dim = getattr(config, "hidden_size", None)
    # PEFT prefixes every name with "base_model.model."; build_param_groups knows the plain names
    named = [(n.removeprefix("base_model.model."), p) for n, p in base.named_parameters()]
    view = types.SimpleNamespace(named_parameters=lambda: iter(named))
    groups = build_param_groups(view, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, matrix_lr=matrix_lr,
                                scalar_lr=scalar_lr, weight_decay=weight_decay, model_dim=model_dim)
    for group in groups:
        group["lr"] = group["initial_lr"] = group["lr"] * init_lr_frac
    return groups


@dataclass
class MuonAdamWSetup:
    """How the mixin builds and schedules MuonAdamW.

    param_groups: ``model -> MuonAdamW groups`` (with ``initial_lr``, the base of the schedule).
    lr_schedule: ``(step, num_steps) -> LR multiplier``.
    muon_momentum: ``step -> Muon momentum`` (None: keep the groups' own, 0.95 by default).
    muon_compute_dtype: dtype of the Polar Express matmuls; None = bf16 exactly when training in bf16 (nanochat).
    compile: torch.compile the update functions (worth it on GPU).
    shard_optimizer: nanochat's ZeRO-2-style sharded MuonAdamW instead of DDP's gradient all-reduce (see above).
    after_create: called with the new optimizer, e.g. to load a pretraining state (see ``load_optimizer_state``).
    """

    param_groups: Callable[[torch.nn.Module], list[dict]] = nanochat_param_groups
    lr_schedule: Callable[[int, int], float] = constant_schedule
    muon_momentum: Callable[[int], float] | None = None
    muon_compute_dtype: torch.dtype | None = None
    compile: bool = False
    shard_optimizer: bool = False
    after_create: Callable[[MuonAdamW], None] | None = None


def unwrap_optimizer(optimizer):
    """The MuonAdamW inside Accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def state_dict_is_collective(optimizer) -> bool:
    """True when ``optimizer.state_dict()`` must be called on every rank: a MuonAdamW that communicates
    (``distributed`` not False) in a process group of more than one rank."""
    opt = unwrap_optimizer(optimizer)
    return (isinstance(opt, MuonAdamW) and getattr(opt, "distributed", None) is not False
            and rank_world()[1] > 1)


class MuonAdamWTrainerMixin:
    """MuonAdamW for a ``transformers.Trainer`` subclass (TRL's SFTTrainer, GRPOTrainer, ...). List it before the
    Trainer class and pass ``muon_setup=MuonAdamWSetup(...)`` (default: nanochat's groups, constant LR, momentum
    0.95). See the module docstring for what it overrides and why."""

    def __init__(self, *args, muon_setup: MuonAdamWSetup | None = None, save_on_signal: bool = True, **kwargs):
        self.muon_setup = muon_setup or MuonAdamWSetup()
        super().__init__(*args, **kwargs)
        # appended after DefaultFlowCallback, so its on_step_end has the last word on this step's control flags
        self.signal_callback = SaveOnSignal() if save_on_signal else None
        if self.signal_callback is not None:
            self.add_callback(self.signal_callback)

    def train(self, *args, **kwargs):
        """Trainer.train; on SIGTERM/SIGINT: the step finishes, ``checkpoint-<step>`` is saved, then
        ``TrainingInterrupted`` is raised (see ``SaveOnSignal``). The previous signal handlers are restored. A resume
        first checks its checkpoint (``check_trainer_checkpoint``: complete, readable, optimizer state included)."""
        resume = kwargs.get("resume_from_checkpoint", args[0] if args else None)
        if resume:  # a partial checkpoint (run killed while saving) would fail deep inside, or resume half-way
            from transformers.trainer_utils import get_last_checkpoint

            from modeling_nanochat.checkpoints.training_state import check_trainer_checkpoint

            path = resume if isinstance(resume, str) else get_last_checkpoint(self.args.output_dir)
            if path:  # resume=True with no checkpoint at all: the Trainer's own error says so
                check_trainer_checkpoint(path, with_optimizer=not getattr(self.args, "save_only_model", False))
        stop = self.signal_callback
        if stop is None:
            return super().train(*args, **kwargs)
        with stop:
            result = super().train(*args, **kwargs)
        if stop.stop_signum:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            checkpoint = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{stop.step}")
            raise TrainingInterrupted(stop.stop_signum, stop.step, checkpoint, self.is_world_process_zero())
        if stop.signum and self.is_world_process_zero():  # came after the last step: the run is complete anyway
            print(f"{_signal_name(stop.signum)} received after the last step: finishing the run",
                  file=sys.stderr, flush=True)
        return result

    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        if getattr(self, "is_deepspeed_enabled", False) or getattr(self, "is_fsdp_enabled", False):
            raise ValueError("MuonAdamW cannot run under DeepSpeed or FSDP: both flatten or shard the parameters, "
                             "while Muon orthogonalises whole weight matrices. Launch with a DDP accelerate config "
                             "(e.g. accelerate_configs/ddp_8gpu.yaml), or use the stock optimizer path.")
        setup = self.muon_setup
        compute_dtype = setup.muon_compute_dtype
        if compute_dtype is None and getattr(self.args, "bf16", False):
            compute_dtype = torch.bfloat16
        # Trainer wraps the model in DDP when there is more than one process: either DDP averages the gradients and
        # the optimizer does not communicate, or (sharded) the reverse, see _prepare_for_training
        self.optimizer = MuonAdamW(setup.param_groups(self.model), muon_compute_dtype=compute_dtype,
                                   compile=setup.compile, distributed=None if setup.shard_optimizer else False)
        if setup.after_create is not None:
            setup.after_create(self.optimizer)
        return self.optimizer

    def _prepare_for_training(self, *args, **kwargs):
        model, dataloader = super()._prepare_for_training(*args, **kwargs)
        if self.muon_setup.shard_optimizer and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.debugging_hooks import noop_hook

            model.register_comm_hook(None, noop_hook)  # gradients stay local; MuonAdamW reduce-scatters them
        return model, dataloader

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = NanoChatSchedule(optimizer or self.optimizer, num_training_steps,
                                                 self.muon_setup.lr_schedule, self.muon_setup.muon_momentum)
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not state_dict_is_collective(self.optimizer):
            return super()._save_optimizer_and_scheduler(output_dir)
        from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

        state = self.optimizer.state_dict()  # every rank: gathers the shards
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))


# ---------------------------------------------------------------------------------------------------------------------
# Warm start from a pretraining optimizer state


def optimizer_state_mismatch(optimizer, state: dict) -> str | None:
    """Why ``state`` (a ``MuonAdamW.state_dict()``) cannot be loaded into ``optimizer``, or None if it can."""
    opt = unwrap_optimizer(optimizer)
    if not isinstance(state, dict) or "param_groups" not in state or "state" not in state:
        return "it is not a MuonAdamW state dict"
    saved_groups, groups = state["param_groups"], opt.param_groups
    if len(saved_groups) != len(groups):
        return f"it has {len(saved_groups)} parameter groups, this optimizer {len(groups)}"
    entries = {int(k): v for k, v in state["state"].items()}
    for saved, group in zip(saved_groups, groups):
        label = group.get("name", group["kind"])
        if saved.get("kind") != group["kind"] or saved.get("name", label) != label:
            return f"group {saved.get('name', saved.get('kind'))!r} does not match {label!r}"
        if len(saved["params"]) != len(group["params"]):
            return f"group {label!r} has {len(saved['params'])} parameters there, {len(group['params'])} here"
        for index, p in zip(saved["params"], group["params"]):
            entry = entries.get(int(index))
            for key, t in (entry or {}).items():
                if not isinstance(t, torch.Tensor) or key == "step":
                    continue
                expected = [tuple(p.shape)]
                if key == "second_momentum_buffer":  # per row (m, 1) or per column (1, n) of an (m, n) matrix
                    expected = [(p.shape[0], 1), (1, p.shape[-1])]
                if tuple(t.shape) not in expected:
                    return f"group {label!r}: saved {key} has shape {tuple(t.shape)}, parameter {tuple(p.shape)}"
    return None


def load_optimizer_state(optimizer, state: dict, *, keep: tuple[str, ...] = ("lr", "initial_lr", "weight_decay")) \
        -> str | None:
    """Load a pretraining MuonAdamW state (momentum and second-moment buffers) if it fits; returns None on success or
    the reason it was refused (the optimizer is then untouched, i.e. fresh).

    nanochat's chat_sft does the same and then resets the LRs to the fresh SFT values; the group fields named in
    ``keep`` are restored to this optimizer's values after loading (everything else, e.g. AdamW betas, comes from the
    checkpoint, as in nanochat; the Muon momentum is rescheduled each step anyway)."""
    opt = unwrap_optimizer(optimizer)
    reason = optimizer_state_mismatch(opt, state)
    if reason is not None:
        return reason
    kept = [{k: g[k] for k in keep if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, values in zip(opt.param_groups, kept):
        group.update(values)
    return None


# ---------------------------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: finish the step, save a Trainer checkpoint, exit 128 + signum


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived during ``train()``; the step was finished and ``checkpoint`` saved by the Trainer.
    ``exit_status`` is 128 + signum (143 for SIGTERM, 130 for SIGINT); entry points use ``report_interrupted``."""

    def __init__(self, signum: int, step: int, checkpoint: str, is_main: bool = True):
        self.signum, self.step, self.checkpoint, self.is_main = signum, step, checkpoint, is_main
        self.exit_status = 128 + signum
        super().__init__(f"interrupted by {_signal_name(signum)} at step {step}: saved {checkpoint}; "
                         f"resume with --resume_from_checkpoint {checkpoint}")


def report_interrupted(error: TrainingInterrupted) -> int:
    """Print the one line (main process only, stderr) and return the exit status, 128 + signum."""
    if error.is_main:
        print(error, file=sys.stderr, flush=True)
    return error.exit_status


class SaveOnSignal(TrainerCallback):
    """Stop cleanly on SIGTERM/SIGINT. Used as a context manager around ``Trainer.train`` (the mixin does this):
    entering installs the handlers, leaving restores the previous ones.

    The handler only records the signal (nothing is saved from inside it). At every ``on_step_end`` the ranks agree
    on it (max over a one-element all-reduce, so a rank that missed the signal stops at the same step as the others,
    and no rank waits in a collective the others never reach); then ``should_save`` and ``should_training_stop`` are
    set and an evaluation due at that step is skipped (a launcher or scheduler gives only a grace period). Afterwards
    ``stop_signum`` / ``step`` say why and where it stopped.

    Repeated signals do not cut the save short: launchers forward the signal they got (torchrun also turns a Ctrl-C
    into SIGTERM for its workers), so a second SIGTERM, or any signal once the stop is under way, is ignored. Only a
    second Ctrl-C (SIGINT) before the step ends raises KeyboardInterrupt right away (no checkpoint).

    The handlers are installed in the main thread only (Python allows no other); elsewhere this is inert."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None  # first signal this process received
        self.stop_signum: int | None = None  # the signal all ranks stopped for
        self.step: int | None = None  # global step of the checkpoint
        self._old: dict = {}

    def __enter__(self):
        self.signum = self.stop_signum = self.step = None
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self._old = {}
        return False

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.signum is None:
            self.signum = signum
        elif signum == self.signum == signal.SIGINT and self.stop_signum is None:
            raise KeyboardInterrupt  # a second Ctrl-C before the checkpoint starts: stop now

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signum or 0
        if rank_world()[1] > 1:  # every rank calls this at every step, so the collective always matches
            import torch.distributed as dist

            flag = torch.tensor([signum], dtype=torch.int64, device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        if signum and self.stop_signum is None:
            self.stop_signum, self.step = signum, state.global_step
            if state.is_world_process_zero:
                print(f"{_signal_name(signum)} received: saving a checkpoint at step {state.global_step} "
                      "before exiting", file=sys.stderr, flush=True)
        if self.stop_signum:
            control.should_save = control.should_training_stop = True
            control.should_evaluate = False
        return control


class MetricsFileCallback(TrainerCallback):
    """For TRL/transformers trainers (SFT, GRPO): every log line also goes to ``<output_dir>/metrics.jsonl`` (main
    process) through utils/run_files.MetricsLog, as the pretraining loop writes it."""

    def __init__(self, path: str):
        self.path, self.log = path, None

    def on_train_begin(self, args, state, control, **kwargs):
        # Trainer logs a step's rows under the number of finished steps, so on a resume from checkpoint-N the rows
        # of step N belong to the saved run and stay; only later ones are dropped (fresh run: all)
        step = state.global_step
        self.log = MetricsLog(self.path, state.is_world_process_zero, truncate_from=step + 1 if step else 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.log is not None and logs:
            self.log.write(step=state.global_step, **{k: v for k, v in logs.items()
                                                      if isinstance(v, (int, float)) and math.isfinite(v)})

__all__ = ["MuonAdamWTrainerMixin", "MuonAdamWSetup", "MetricsFileCallback", "nanochat_param_groups",
           "load_optimizer_state", "optimizer_state_mismatch", "unwrap_optimizer", "state_dict_is_collective",
           "SaveOnSignal", "TrainingInterrupted", "report_interrupted"]
