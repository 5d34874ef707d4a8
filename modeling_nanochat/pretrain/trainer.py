"""The pretraining loop (nanochat's base_train) on Accelerate: `recipes/pretrain.py` parses flags and calls `run`.

One optimizer step = `grad_accum_steps` micro-batches per process, loss scaled by 1/grad_accum_steps, then the
scheduled LR / Muon momentum / Muon weight decay are written into the param groups and the optimizer steps.

Two optimizer paths:
* faithful (default): nanochat's MuonAdamW. The model is NOT wrapped in DDP: like nanochat, the optimizer averages
  gradients itself (reduce-scatter / all-gather, ZeRO-2 style sharded state). Accelerate provides the process group,
  device, autocast and trackers.
* DeepSpeed ZeRO-2/3 (an accelerate config with `distributed_type: DEEPSPEED`): DeepSpeed's own Muon (or AdamW),
  see `optim/zero.py`; this trades nanochat's exact optimizer for ZeRO memory scaling.

Everything else follows nanochat: evaluation of val bits-per-byte every `eval_every` steps on a freshly built val
loader, CORE every `core_every` steps, greedy samples, EMA-smoothed loss for display, timing that skips the first
10 steps, GC frozen after the first step. What we add: `metrics.jsonl` (one JSON object per step), step-exact resume
(see `checkpoints/training_state.py` and the data loader's state), SIGINT/SIGTERM checkpointing, and a progress bar with tok/s,
MFU and ETA.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from evaluation.samples import SAMPLE_PROMPTS, greedy_completions

from modeling_nanochat.checkpoints.handover import BASE_LR_NAMES, PretrainHandover
from modeling_nanochat.checkpoints.training_state import (CHECKPOINT_NAME, STATE_DIR, checkpoint_path,
                                                          latest_checkpoint, list_checkpoints, load_training_state,
                                                          prune_checkpoints, save_checkpoint)
from modeling_nanochat.optim.scaling import peak_flops
from modeling_nanochat.optim.schedules import apply_schedule
from modeling_nanochat.utils.distributed import rank_world
from modeling_nanochat.utils.io import OutputError, atomic_copy, remove_stale_temp_dirs, replace_dir
from modeling_nanochat.utils.run_files import MetricsLog
from modeling_nanochat.utils.errors import NanochatError


class RunError(NanochatError):
    """A problem with the run's settings or output directory, reported before any compute."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived and a checkpoint was saved; the entry point exits with 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum} after saving a checkpoint")
        self.signum = signum


@dataclass
class LoopState:
    step: int = 0  # optimizer steps completed
    smooth_loss: float = 0.0  # EMA (beta 0.9) of the training loss, not yet debiased
    val_bpb: float | None = None
    min_val_bpb: float = math.inf
    total_training_time: float = 0.0  # seconds, excluding the first 10 steps and all evaluation


# flags that shape the model: a --resume with any of them changed is refused, naming the flag
_SAME_ON_RESUME = ("depth", "aspect_ratio", "head_dim", "window_pattern", "max_seq_len",
                   # and the objective: a distillation run resumes only with the same teacher and mix
                   "teacher", "kd_temperature", "kd_alpha")


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    rank, world = rank_world()
    if world > 1:
        dist.all_reduce(t)
        t = t / world
    return t


def _any_rank(flag: bool, device) -> bool:
    rank, world = rank_world()
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


class _StopSignals:
    """SIGINT/SIGTERM only set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        # a second Ctrl-C stops right away; repeated SIGTERMs do not (launchers forward the one they got, and torchrun
        # turns a Ctrl-C into a SIGTERM for the workers, which must not cut the save short)
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


class Pretrainer:
    """Owns the model, optimizer, loaders and loop state of one run (see module docstring)."""

    def __init__(self, *, accelerator, model, tokenizer, optimizer, plan, train_loader, make_val_loader, token_bytes,
                 args, train_model=None, deepspeed_engine=None, run_config=None, teacher=None):
        self.acc = accelerator
        self.teacher = teacher  # frozen; set: the loss is distillation's (pretrain/distill.py)
        self._parts = None  # the step's distillation terms, for metrics.jsonl
        self.model = model  # the plain module: evaluation, sampling, saving
        # possibly torch.compile'd or a DeepSpeed engine; `is None`, not `or`: a compiled module has no truth value
        self.train_model = model if train_model is None else train_model
        self.ds = deepspeed_engine
        self.tokenizer = tokenizer
        self.optimizer = optimizer
        self.plan = plan
        self.train_loader = train_loader
        self.make_val_loader = make_val_loader
        self.token_bytes = token_bytes
        self.args = args
        self.run_config = run_config or {}
        self.state = LoopState()
        self.out = args.output_dir
        self.device = accelerator.device
        self.rank, self.world = rank_world()
        self.is_main = self.rank == 0
        self.peak = peak_flops(self.device)
        self.resume_step = None

    # -- one optimizer step ------------------------------------------------------------------------------------
    def train_step(self) -> float:
        """Run one optimizer step at `self.state.step`; returns the mean loss over micro-batches and ranks."""
        plan, it = self.plan, self.state.step
        values = dict(lr_multiplier=plan.lr_multiplier(it), muon_momentum=plan.muon_momentum(it),
                      muon_weight_decay=plan.muon_weight_decay(it))
        if self.ds is not None:  # before the micro-batches: ZeRO reads the Muon momentum during the last backward
            from modeling_nanochat.optim.zero import set_schedule
            set_schedule(self.optimizer, **values)
        total = torch.zeros((), device=self.device)
        parts = torch.zeros(2, device=self.device) if self.teacher is not None else None
        for i in range(plan.grad_accum_steps):
            x, y = next(self.train_loader)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True).contiguous()
            with self.acc.autocast():
                out = self.train_model(input_ids=x, labels=y, shift_labels=y)
                loss = out.loss
                if self.teacher is not None:
                    loss, p = self._distill(x, y, out)
                    parts += torch.stack([p["kd"], p["ce"]])
            total += loss.detach()
            if self.ds is not None:
                self.ds.set_gradient_accumulation_boundary(i == plan.grad_accum_steps - 1)
                self.ds.backward(loss)  # DeepSpeed scales by 1/gradient_accumulation_steps itself
            else:
                (loss / plan.grad_accum_steps).backward()  # each backward sums grads: normalise here
        if self.ds is not None:
            self.ds.step()
        else:
            apply_schedule(self.optimizer.param_groups, **values)
            self.optimizer.step()
            self.model.zero_grad(set_to_none=True)
        if parts is not None:
            both = _all_reduce_mean(torch.cat([total.view(1), parts]) / plan.grad_accum_steps).tolist()
            self._parts = {"kd_loss": both[1], "ce_loss": both[2]}
            return both[0]
        return _all_reduce_mean(total / plan.grad_accum_steps).item()  # .item(): the step's one host sync

    def _distill(self, x, y, out):
        from modeling_nanochat.pretrain.distill import distillation_loss

        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=x).logits
        return distillation_loss(out.logits, teacher_logits, y, temperature=self.args.kd_temperature,
                                 alpha=self.args.kd_alpha, hard_loss=out.loss)

    # -- evaluation and samples ------------------------------------------------------------------------------
    def evaluate_bpb(self) -> float:
        from evaluation.bpb import evaluate_bpb

        steps = max(1, self.args.eval_tokens // (self.plan.device_batch_size * self.plan.max_seq_len * self.world))
        self.model.eval()
        try:
            return evaluate_bpb(self.model, self.make_val_loader(), steps, self.token_bytes, autocast=self.acc.autocast)
        finally:
            self.model.train()

    def evaluate_core(self) -> dict | None:
        try:
            from evaluation.core import evaluate_core
        except ImportError as e:  # pragma: no cover - the evaluation package ships with this repo
            raise RunError(f"--core-every needs the evaluation package ({e})") from e
        self.model.eval()
        try:
            with self.acc.autocast():
                return evaluate_core(self.model, self.tokenizer, self.args.core_bundle,
                                     max_per_task=self.args.core_max_per_task, device=self.device,
                                     progress=self.is_main)
        finally:
            self.model.train()

    def samples(self) -> list[str]:
        return greedy_completions(self.model, self.tokenizer, SAMPLE_PROMPTS, device=self.device,
                                  autocast=self.acc.autocast)

    # -- saving ----------------------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        return {"step": self.state.step, "loop_state": asdict(self.state), "world_size": self.world,
                "plan": self.plan.to_dict(), "run_config": self.run_config}

    def handover(self) -> PretrainHandover:
        """The typed record SFT inherits from (checkpoints/handover.py)."""
        groups = self.optimizer.param_groups
        if self.ds is not None:
            from modeling_nanochat.optim.zero import optimizer_param_groups
            groups = optimizer_param_groups(self.optimizer)
        return PretrainHandover(
            max_seq_len=self.plan.max_seq_len, device_batch_size=self.plan.device_batch_size,
            total_batch_size=self.plan.total_batch_size,
            base_lrs={k: getattr(self.args, f"{k}_lr") for k in BASE_LR_NAMES if hasattr(self.args, f"{k}_lr")},
            group_lrs={g.get("name", f"group_{i}"): g["initial_lr"] for i, g in enumerate(groups)},
            optimizer=self.run_config.get("optimizer", "muonadamw"),
            distributed_type=self.run_config.get("distributed_type", "NO"), step=self.state.step)

    def save(self, final: bool = False) -> str:
        """Checkpoint at the current step; every rank must call this (optimizer and loader states are gathered)."""
        from accelerate.utils import gather_object

        loader_states = gather_object([self.train_loader.state_dict()])
        path = checkpoint_path(self.out, self.state.step)
        if self.ds is not None:
            self._save_deepspeed(path, loader_states, final)
            return path
        opt_state = self.optimizer.state_dict()  # a collective for MuonAdamW: every rank calls it
        if self.is_main:
            try:
                save_checkpoint(path, model=self.model, tokenizer=self.tokenizer, optimizer_state=opt_state,
                                loader_states=loader_states, trainer_state=self.trainer_state(),
                                handover=self.handover())
            except OutputError as e:  # a full disk: say which checkpoint is the last good one
                last = latest_checkpoint(self.out)
                raise RunError(f"{e.problem}\n  the run stopped at step {self.state.step}; the last complete "
                               f"checkpoint is {last or 'none'}", f"{e.fix}, then continue with --resume") from e
            if final:
                publish_final_model(path, self.out)
            prune_checkpoints(self.out, self.args.keep_last)
        self.acc.wait_for_everyone()
        return path

    def _save_deepspeed(self, path: str, loader_states: list, final: bool) -> None:
        """Under DeepSpeed every rank writes its own optimizer shards, so the temporary directory has a name all ranks
        know; it is renamed into place by rank 0 once everyone is done (a crash leaves only `.tmp-checkpoint-*`)."""
        from modeling_nanochat.tokenizer.tokenizer import save_tokenizer
        from modeling_nanochat.optim.zero import save_hf_checkpoint_zero

        tmp = os.path.join(self.out, f".tmp-checkpoint-{self.state.step}")
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(os.path.join(tmp, STATE_DIR))
        self.acc.wait_for_everyone()
        save_hf_checkpoint_zero(self.acc, self.ds, tmp)  # gathers ZeRO-3 weights; rank 0 writes
        self.ds.save_checkpoint(os.path.join(tmp, STATE_DIR, "deepspeed"), tag="state")  # fp32 masters, optimizer
        if self.is_main:
            save_tokenizer(self.tokenizer, tmp)
            torch.save({"world_size": len(loader_states), "ranks": loader_states},
                       os.path.join(tmp, STATE_DIR, "dataloader.pt"))
            with open(os.path.join(tmp, STATE_DIR, "trainer_state.json"), "w") as f:
                json.dump(self.trainer_state(), f, indent=2)
            self.handover().save(os.path.join(tmp, STATE_DIR))
            replace_dir(tmp, path)
            if final:
                publish_final_model(path, self.out)
            prune_checkpoints(self.out, self.args.keep_last)
        self.acc.wait_for_everyone()

    def resume_from(self, path: str) -> None:
        trainer_state, opt_state, loader_states = load_training_state(path)
        if trainer_state["world_size"] != self.world:
            raise RunError(
                f"{path} was saved by {trainer_state['world_size']} processes but this run has {self.world}: the data "
                "loader's position is per process, so an exact resume needs the same number of processes. Launch "
                f"with --num_processes {trainer_state['world_size']}, or start a new --output-dir")
        saved_opt = trainer_state.get("run_config", {}).get("optimizer")
        if saved_opt != self.run_config.get("optimizer") or (opt_state is None) != (self.ds is not None):
            raise RunError(f"{path} was trained with optimizer {saved_opt!r}, this run uses "
                           f"{self.run_config.get('optimizer')!r} (DeepSpeed: {self.ds is not None}); resume with the "
                           "same accelerate config and --optimizer")
        saved_args = trainer_state.get("run_config", {}).get("args", {})
        for key in _SAME_ON_RESUME:  # the architecture flags: the saved weights only fit the same model
            now, then = getattr(self.args, key, None), saved_args.get(key, getattr(self.args, key, None))
            if now != then:
                flag = "--" + key.replace("_", "-")
                raise RunError(f"--resume: {flag} is {now!r} now but was {then!r} for {path}",
                               f"resume with {flag} {then}, or start a new --output-dir")
        saved_plan = trainer_state["plan"]
        for key in ("depth", "max_seq_len", "vocab_size", "total_batch_size", "device_batch_size", "num_iterations"):
            if saved_plan.get(key) != getattr(self.plan, key):
                raise RunError(f"--resume: {key} is {getattr(self.plan, key)} now but {saved_plan.get(key)} in {path}; "
                               "resume with the same settings, or use a new --output-dir")
        if self.ds is not None:  # DeepSpeed restores the fp32 masters and the optimizer from its own shards
            self.ds.load_checkpoint(os.path.join(path, STATE_DIR, "deepspeed"), tag="state")
        else:
            from safetensors.torch import load_file

            from modeling_nanochat.checkpoints.model_dirs import check_weights
            check_weights(path)  # a truncated file is a CheckpointError naming it, not safetensors' own error
            state = load_file(os.path.join(path, "model.safetensors"))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "inv_freq" not in k]:
                raise RunError(f"{path}: weights do not match the model (missing {missing}, unexpected {unexpected})")
            self.optimizer.load_state_dict(opt_state)
        self.train_loader.load_state_dict(loader_states[self.rank])
        self.state = LoopState(**trainer_state["loop_state"])
        self.resume_step = self.state.step

    # -- the loop --------------------------------------------------------------------------------------------
    def _periodic_evals(self, last: bool, flops_so_far: int, metrics, log) -> None:
        """val bpb, CORE and samples when their interval (or the end) comes, as nanochat's loop does them."""
        args, st = self.args, self.state
        if args.eval_every > 0 and (last or st.step % args.eval_every == 0):
            st.val_bpb = self.evaluate_bpb()
            st.min_val_bpb = min(st.min_val_bpb, st.val_bpb)
            log(f"step {st.step:05d} | val bpb {st.val_bpb:.6f}")
            metrics.write(step=st.step, val_bpb=st.val_bpb, total_training_flops=flops_so_far,
                          total_training_time=st.total_training_time)
            self.acc.log({"val/bpb": st.val_bpb}, step=st.step)
        if args.core_every > 0 and (last or (st.step > 0 and st.step % args.core_every == 0)):
            core = self.evaluate_core()
            log(f"step {st.step:05d} | CORE {core['core']:.4f}")
            metrics.write(step=st.step, core=core["core"],
                          core_results={k: v["centered"] for k, v in core["results"].items()})
            self.acc.log({"core_metric": core["core"]}, step=st.step)
        if args.sample_every > 0 and (self.is_main or self.ds is not None) and \
                (last or (st.step > 0 and st.step % args.sample_every == 0)):
            for text in self.samples():  # under DeepSpeed all ranks generate: ZeRO-3 gathers collectively
                log(f"  sample: {text!r}")

    def _record_step(self, loss: float, dt: float, flops_so_far: int, metrics, bar) -> None:
        """The step's line in metrics.jsonl, the trackers and the progress bar (EMA loss debiased as nanochat)."""
        plan, st = self.plan, self.state
        st.smooth_loss = 0.9 * st.smooth_loss + 0.1 * loss
        smooth = st.smooth_loss / (1 - 0.9 ** (st.step + 1))
        tok_per_s = plan.total_batch_size / dt
        mfu = (100 * plan.flops_per_token * tok_per_s / (self.peak * self.world)) if self.peak else None
        if st.step > 10:
            st.total_training_time += dt
        lrm = plan.lr_multiplier(st.step)
        record = dict(step=st.step, loss=loss, smooth_loss=smooth, lrm=lrm, dt=dt, tok_per_s=tok_per_s,
                      mfu=mfu, total_training_flops=flops_so_far, total_training_time=st.total_training_time,
                      **(self._parts or {}))
        metrics.write(**record)
        if self.args.log_every > 0 and st.step % self.args.log_every == 0:
            self.acc.log({f"train/{k}": v for k, v in record.items() if k != "step" and v is not None},
                         step=st.step)
        bar.set_postfix_str(f"loss {smooth:.4f} | lrm {lrm:.2f} | {tok_per_s:,.0f} tok/s"
                            + (f" | mfu {mfu:.1f}%" if mfu is not None else ""), refresh=False)
        bar.update(1)

    def run(self) -> LoopState:
        from tqdm.auto import tqdm

        args, plan, st = self.args, self.plan, self.state
        metrics = MetricsLog(os.path.join(self.out, "metrics.jsonl"), self.is_main, truncate_from=st.step)
        bar = tqdm(total=plan.num_iterations, initial=st.step, disable=not self.is_main, unit="step",
                   dynamic_ncols=True, desc=f"d{plan.depth}")
        log = bar.write if self.is_main else (lambda *a, **k: None)
        with _StopSignals() as stop:
            while True:
                last = st.step == plan.num_iterations
                flops_so_far = plan.flops_per_token * plan.total_batch_size * st.step
                self._periodic_evals(last, flops_so_far, metrics, log)
                if last:
                    self.save(final=True)
                    if self.is_main:
                        from modeling_nanochat.pretrain.report import write_run_report
                        write_run_report(self.out)
                    log(f"done: {st.step} steps, final model in {self.out} (summary.md, loss.png)")
                    break
                if st.step > 0 and st.step != self.resume_step and args.save_every > 0 and st.step % args.save_every == 0:
                    self.save()

                t0 = time.time()
                loss = self.train_step()
                _synchronize(self.device)
                dt = time.time() - t0
                if not math.isfinite(loss):
                    self.acc.end_training()
                    raise FloatingPointError(f"loss is {loss} at step {st.step}; lower the learning rates or check "
                                             "the data (the last checkpoint is intact)")

                self._record_step(loss, dt, flops_so_far, metrics, bar)
                first_step = st.step == 0 or st.step == self.resume_step
                st.step += 1
                if first_step:  # nanochat: the GC's cycle scans cost ~500 ms now and then; freeze the setup garbage
                    gc.collect()
                    gc.freeze()
                    gc.disable()
                elif st.step % 5000 == 0:
                    gc.collect()

                if _any_rank(stop.signum is not None, self.device):
                    log(f"signal received: saving a checkpoint at step {st.step} before exiting")
                    self.save()
                    bar.close()
                    self.acc.end_training()
                    gc.enable()
                    raise Interrupted(stop.signum or signal.SIGTERM)
        bar.close()
        gc.enable()
        self.acc.end_training()
        return st


def publish_final_model(checkpoint: str, output_dir: str) -> None:
    """Copy the final checkpoint's model files (not its training state) to the output dir root, so
    `from_pretrained(output_dir)` gives the final model. Each file lands with an atomic rename; config.json comes
    last, so a reader never sees a config whose weights are not in place yet."""
    names = sorted(n for n in os.listdir(checkpoint) if os.path.isfile(os.path.join(checkpoint, n)))
    names.sort(key=lambda n: n == "config.json")
    for name in names:
        atomic_copy(os.path.join(checkpoint, name), os.path.join(output_dir, name))


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_output_dir(output_dir: str, *, resume: bool, overwrite: bool, is_main: bool) -> str | None:
    """Validate the output directory before any compute; returns the checkpoint to resume from (or None). The main
    process also deletes what a crash left half-written there (`.tmp-*`: a checkpoint is gigabytes at d24)."""
    if is_main and os.path.isdir(output_dir):
        remove_stale_temp_dirs(output_dir)
    exists = os.path.isdir(output_dir) and any(not n.startswith(".") for n in os.listdir(output_dir))
    if resume:
        ckpt = latest_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        # Checkpoints without their training state (copied models, a damaged run): starting over would overwrite
        # them, so refuse. A run that died before its first checkpoint has nothing to lose and starts over.
        names = sorted(n for n in os.listdir(output_dir) if CHECKPOINT_NAME.match(n)) if exists else []
        if ckpt is None and names:
            raise RunError(f"--resume: nothing to resume in {output_dir}: {', '.join(names)} hold no "
                           f"{STATE_DIR}/trainer_state.json (a model without its training state)",
                           "to train on from those weights, start a new run (--output-dir elsewhere); to start over "
                           "here, pass --overwrite instead of --resume")
        return ckpt
    if exists and not overwrite:
        raise RunError(f"{output_dir} already holds a run; pass --resume to continue it from its last checkpoint, "
                       "--overwrite to start over (its checkpoints and metrics are deleted), or another --output-dir")
    if exists and overwrite and is_main:
        for _, path in list_checkpoints(output_dir):
            shutil.rmtree(path)
        for name in ("metrics.jsonl", "run_config.json"):
            if os.path.exists(os.path.join(output_dir, name)):
                os.remove(os.path.join(output_dir, name))
    return None


__all__ = ["Pretrainer", "LoopState", "RunError", "Interrupted", "prepare_output_dir", "publish_final_model"]
