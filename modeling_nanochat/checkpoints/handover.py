"""What pretraining hands to the chat stages: one typed record, `training_state/handover.json` in every pretraining
checkpoint, written by the pretraining loop and read by SFT (`sft/setup.py`). SFT never reads the pretraining
CLI's flag names or its plan's internals, so renaming a pretraining flag cannot silently change what SFT inherits.

Checkpoints written before this record existed are read from their `trainer_state.json` (`from_trainer_state`), so
every saved run keeps working.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields

from modeling_nanochat.utils.io import atomic_write_json
from modeling_nanochat.utils.errors import CheckpointError

HANDOVER_FILE = "handover.json"
BASE_LR_NAMES = ("embedding", "unembedding", "matrix", "scalar")


class HandoverError(CheckpointError):
    """The record exists but cannot be read (a damaged or foreign file)."""


@dataclass(frozen=True)
class PretrainHandover:
    max_seq_len: int  # T of the run (its model's context)
    device_batch_size: int  # rows per device per micro-step
    total_batch_size: int  # tokens per optimizer step
    # the base LRs the run was configured with, before its batch-size scaling: what nanochat's chat_sft inherits
    base_lrs: dict[str, float] = field(default_factory=dict)
    # the optimizer's LR per param group as trained (after scaling), by group name: for the record and for tools
    group_lrs: dict[str, float] = field(default_factory=dict)
    optimizer: str = "muonadamw"  # "muonadamw", or DeepSpeed's own "muon"/"adamw" (state not loadable by MuonAdamW)
    distributed_type: str = "NO"  # accelerate's DistributedType name
    step: int = 0
    version: int = 1

    def save(self, state_dir: str) -> None:
        atomic_write_json(os.path.join(state_dir, HANDOVER_FILE), asdict(self))

    @classmethod
    def load(cls, state_dir: str) -> PretrainHandover | None:
        """The record of a checkpoint's training_state/ dir: handover.json, else the older trainer_state.json,
        else None."""
        path = os.path.join(state_dir, HANDOVER_FILE)
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    data = json.load(f)
                known = {f.name for f in fields(cls)}
                return cls(**{k: v for k, v in data.items() if k in known})
            except (OSError, ValueError, TypeError) as e:
                raise HandoverError(f"{path} is unreadable ({e}); delete it to fall back to the defaults") from e
        legacy = os.path.join(state_dir, "trainer_state.json")
        if os.path.isfile(legacy):
            try:
                with open(legacy) as f:
                    return cls.from_trainer_state(json.load(f))
            except (OSError, ValueError) as e:
                raise HandoverError(f"{legacy} is unreadable ({e})") from e
        return None

    @classmethod
    def from_trainer_state(cls, state: dict) -> PretrainHandover | None:
        """Checkpoints from before handover.json: their trainer_state.json held the plan and the run's CLI args
        (the only place those flag names are still read)."""
        plan, run_config = state.get("plan") or {}, state.get("run_config") or {}
        if not plan:
            return None
        args = run_config.get("args") or {}
        return cls(max_seq_len=plan.get("max_seq_len"), device_batch_size=plan.get("device_batch_size"),
                   total_batch_size=plan.get("total_batch_size"),
                   base_lrs={k: args[f"{k}_lr"] for k in BASE_LR_NAMES if args.get(f"{k}_lr") is not None},
                   optimizer=run_config.get("optimizer", "muonadamw"),
                   distributed_type=run_config.get("distributed_type", "NO"), step=state.get("step", 0))
