"""One DeepSpeed run for tests/optim/test_zero.py, started by `accelerate launch` on 2 CPU processes.

Builds the tiny NanoChatForCausalLM, prepares it with `modeling_nanochat.optim.zero.configure_deepspeed`, then records
what the live DeepSpeed optimizer holds (which parameter is in which group, with which lr/betas/wd/momentum),
trains a few steps, checks that the per-group lr and the Muon momentum set each step really reach the update,
and saves an HF checkpoint plus independently gathered weights. Writes ``rank{r}.json`` into --out; the parent
test does the asserting.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import InitProcessGroupKwargs  # noqa: E402
from conftest import tiny_config  # noqa: E402

from modeling_nanochat import NanoChatForCausalLM  # noqa: E402
from modeling_nanochat.optim import zero  # noqa: E402

GAS = 2  # micro-batches per optimizer step
LRS = dict(unembedding_lr=0.008, embedding_lr=0.3, matrix_lr=0.02, scalar_lr=0.5, weight_decay=0.28)


def gathered(model, stage):
    """Full weights as plain tensors, gathered by DeepSpeed's own context under ZeRO-3 (not via get_state_dict)."""
    params = list(model.named_parameters())
    if stage == 3:
        import deepspeed
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().clone() for n, p in params}
    return {n: p.detach().clone() for n, p in params}


def momentum_buffers(opt):
    inner = zero._zero_optimizer(opt)
    state = getattr(inner, "optimizer", inner).state
    return [s["momentum_buffer"].clone() for s in state.values() if "momentum_buffer" in s]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--optimizer", default="muon")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    out = Path(args.out)

    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    rank, world = dist.get_rank(), dist.get_world_size()
    plugin = acc.state.deepspeed_plugin
    stage = plugin.deepspeed_config["zero_optimization"]["stage"]

    torch.manual_seed(0)
    config = tiny_config()
    # Under ZeRO-3 with zero3_init_flag, transformers builds the model inside deepspeed.zero.Init (partitioned
    # from birth): the case where DeepSpeed once saw every parameter as 1-D and turned Muon off (PR #8438).
    model = NanoChatForCausalLM._from_config(config)
    zero_init = all(hasattr(p, "ds_id") for p in model.parameters())
    groups = zero.deepspeed_param_groups(model, optimizer=args.optimizer, **LRS)
    engine, opt = zero.configure_deepspeed(acc, model, groups, args.optimizer, micro_batch_size=2,
                                           gradient_accumulation_steps=GAS)

    names = {id(p): n for n, p in engine.module.named_parameters()}
    live = []
    for g, members in zip(zero.optimizer_param_groups(opt), zero.group_members(opt)):
        live.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
                    | {"members": sorted(names[id(p)] for p in members)})

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data, fixed across steps
    batches = [torch.randint(0, config.vocab_size, (2, 33), generator=gen) for _ in range(GAS)]

    calls = []

    def run_step():
        """One optimizer step over GAS micro-batches, the way zero.py's docstring tells a loop to do it."""
        calls.append(1)
        total = 0.0
        for i, ids in enumerate(batches):
            engine.set_gradient_accumulation_boundary(i == GAS - 1)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)  # DeepSpeed divides by GAS itself
            total += loss.item() / GAS
        engine.step()
        mean = torch.tensor(total)
        dist.all_reduce(mean)
        return mean.item() / world

    def train_step(**schedule):
        zero.set_schedule(opt, **schedule)  # before the backwards: ZeRO reads the Muon momentum while reducing
        return run_step()

    losses = [train_step(lr_multiplier=1.0, muon_momentum=0.95) for _ in range(args.steps)]

    # Per-group lr is live: zero it for every other group for one step, then the complement. A parameter must
    # move exactly when its group had lr > 0 (lr = 0 also cancels weight decay, which is scaled by lr).
    n_groups = len(live)
    lr_check = []
    for parity in (0, 1):
        on = [i % 2 == parity for i in range(n_groups)]
        before = gathered(engine.module, stage)
        for g, keep in zip(zero.optimizer_param_groups(opt), on):
            g["lr"] = g["initial_lr"] if keep else 0.0
        run_step()
        after = gathered(engine.module, stage)
        moved = sorted(n for n in before if not torch.equal(before[n], after[n]))
        lr_check.append({"lr_on": [g["name"] for g, keep in zip(live, on) if keep], "moved": moved})

    momentum_check = None
    if args.optimizer == "muon":
        momentum_check = {}
        for label, beta in (("beta_1", 1.0), ("beta_0.5", 0.5)):
            before = momentum_buffers(opt)
            train_step(lr_multiplier=1.0, muon_momentum=beta)
            after = momentum_buffers(opt)
            momentum_check[label] = {"buffers": len(before),
                                     "unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}
        # what setting only the group key does (ZeRO-3 reads a copy taken at init): recorded, not asserted
        zero.set_schedule(opt, lr_multiplier=1.0, muon_momentum=0.5)
        for g in zero.optimizer_param_groups(opt):
            if g.get("use_muon"):
                g["momentum"] = 1.0
        before = momentum_buffers(opt)
        run_step()
        momentum_check["group_key_only_beta_1_unchanged"] = all(
            torch.equal(a, b) for a, b in zip(before, momentum_buffers(opt)))

    # DeepSpeed's own checkpoint holds the sharded optimizer state (Muon momentum, Adam moments): save, train two
    # steps, load, train the same two steps again; the losses must repeat.
    accumulation = dict(optimizer_steps=len(calls), engine_global_steps=engine.global_steps,
                        engine_gas=engine.gradient_accumulation_steps(), gas=GAS)
    engine.save_checkpoint(str(out / "ds"), tag="resume")
    continued = [train_step(lr_multiplier=0.5, muon_momentum=0.9) for _ in range(2)]
    engine.load_checkpoint(str(out / "ds"), tag="resume")
    resumed = [train_step(lr_multiplier=0.5, muon_momentum=0.9) for _ in range(2)]

    zero.save_hf_checkpoint_zero(acc, engine, out / "hf")
    weights = gathered(engine.module, stage)
    if rank == 0:
        torch.save(weights, out / "gathered.pt")
    inner = zero._zero_optimizer(opt)
    report = dict(rank=rank, world_size=world, accelerator_num_processes=acc.num_processes, stage=stage,
                  zero_init=zero_init, groups=live, losses=losses, lr_check=lr_check, momentum_check=momentum_check,
                  continued=continued, resumed=resumed, accumulation=accumulation,
                  zero_optimizer=type(inner).__name__,
                  basic_optimizer=type(getattr(inner, "optimizer", inner)).__name__,
                  gradient_clipping=engine.gradient_clipping())
    (out / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    dist.barrier()


if __name__ == "__main__":
    main()
