"""check_trainer_checkpoint: a transformers Trainer checkpoint (SFT, GRPO) is whole before a resume, or the error names
the missing or broken file and the earlier checkpoint to resume from. Checkpoints laid out as the Trainer writes them."""

import json

import pytest
import torch
from safetensors.torch import save_file

from modeling_nanochat.checkpoints.training_state import check_trainer_checkpoint
from modeling_nanochat.utils.errors import CheckpointError


def _checkpoint(root, step, adapter=False):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    save_file({"w": torch.ones(4, 4)}, str(path / ("adapter_model.safetensors" if adapter else "model.safetensors")))
    torch.save({"state": {0: {"momentum": torch.zeros(4)}}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    return path


@pytest.mark.parametrize("adapter", [False, True], ids=["model", "lora-adapter"])
def test_a_whole_checkpoint_passes(tmp_path, adapter):
    assert check_trainer_checkpoint(str(_checkpoint(tmp_path, 7, adapter))) == 7


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


BREAKS = {
    "optimizer missing": (lambda p: (p / "optimizer.pt").unlink(), "optimizer.pt missing"),
    "both states missing": (lambda p: [(p / n).unlink() for n in ("optimizer.pt", "scheduler.pt")],
                            "optimizer.pt and scheduler.pt missing"),
    "optimizer truncated": (lambda p: _cut(p / "optimizer.pt"), "optimizer.pt is truncated"),
    "weights truncated": (lambda p: _cut(p / "model.safetensors", 0.3), "model.safetensors is truncated or corrupt"),
    "weights missing": (lambda p: (p / "model.safetensors").unlink(), "model.safetensors is missing"),
    "state unreadable": (lambda p: _cut(p / "trainer_state.json"), "trainer_state.json is unreadable"),
    "state missing": (lambda p: (p / "trainer_state.json").unlink(), "trainer_state.json is unreadable"),
}


@pytest.mark.parametrize("fault", list(BREAKS))
def test_a_partial_checkpoint_names_the_file_and_the_earlier_checkpoint(tmp_path, fault):
    earlier = _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 2)
    last = _checkpoint(tmp_path, 8)
    breaks, says = BREAKS[fault]
    breaks(last)
    with pytest.raises(CheckpointError) as e:
        check_trainer_checkpoint(str(last))
    assert str(last) in e.value.problem and says in e.value.problem
    assert e.value.fix.startswith(f"resume from {earlier} (the checkpoint before it)")


def test_without_an_earlier_checkpoint_the_fix_is_to_start_again(tmp_path):
    only = _checkpoint(tmp_path, 3)
    (only / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError) as e:
        check_trainer_checkpoint(str(only))
    assert e.value.fix == f"move {only} away and start again without --resume_from_checkpoint"
    assert check_trainer_checkpoint(str(only), with_optimizer=False) == 3  # save_only_model runs keep no optimizer


def test_deepspeed_checkpoints_keep_their_own_optimizer_files(tmp_path):
    path = _checkpoint(tmp_path, 5)
    for name in ("optimizer.pt", "scheduler.pt"):
        (path / name).unlink()
    (path / "global_step5").mkdir()
    assert check_trainer_checkpoint(str(path)) == 5


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint directory") as e:
        check_trainer_checkpoint(str(tmp_path / "checkpoint-9"))
    assert e.value.fix == "pass a checkpoint-N directory that a run saved, or start without --resume_from_checkpoint"
    for step in (10, 2):
        _checkpoint(tmp_path, step)
    with pytest.raises(CheckpointError) as e:  # a typo in the step: the ones that exist, oldest first
        check_trainer_checkpoint(str(tmp_path / "checkpoint-9"))
    assert e.value.fix == f"pass one of checkpoint-2, checkpoint-10 (in {tmp_path})"
