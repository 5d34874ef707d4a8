"""The pretraining -> SFT hand-over record (modeling_nanochat/checkpoints/handover.py): written, read back, read from
checkpoints saved before it existed, and a damaged one is reported rather than guessed around."""

import json

import pytest

from modeling_nanochat.checkpoints.handover import HANDOVER_FILE, HandoverError, PretrainHandover


def test_round_trip(tmp_path):
    record = PretrainHandover(max_seq_len=256, device_batch_size=4, total_batch_size=2048,
                              base_lrs={"embedding": 0.3, "matrix": 0.02}, group_lrs={"lm_head": 0.004},
                              optimizer="muonadamw", distributed_type="MULTI_CPU", step=7)
    record.save(str(tmp_path))
    assert PretrainHandover.load(str(tmp_path)) == record
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # written atomically


def test_checkpoints_from_before_the_record_still_hand_over(tmp_path):
    (tmp_path / "trainer_state.json").write_text(json.dumps({
        "step": 2, "plan": {"max_seq_len": 256, "device_batch_size": 4, "total_batch_size": 2048},
        "run_config": {"optimizer": "muon", "distributed_type": "DEEPSPEED",
                       "args": {"embedding_lr": 0.3, "unembedding_lr": 0.008, "matrix_lr": 0.02}}}))
    record = PretrainHandover.load(str(tmp_path))
    assert (record.max_seq_len, record.device_batch_size, record.total_batch_size) == (256, 4, 2048)
    assert record.base_lrs == {"embedding": 0.3, "unembedding": 0.008, "matrix": 0.02}
    assert (record.optimizer, record.distributed_type, record.step) == ("muon", "DEEPSPEED", 2)
    # the new record wins over the old file
    PretrainHandover(max_seq_len=128, device_batch_size=2, total_batch_size=256).save(str(tmp_path))
    assert PretrainHandover.load(str(tmp_path)).max_seq_len == 128


def test_missing_and_damaged(tmp_path):
    assert PretrainHandover.load(str(tmp_path)) is None
    (tmp_path / HANDOVER_FILE).write_text("{not json")
    with pytest.raises(HandoverError, match=HANDOVER_FILE):
        PretrainHandover.load(str(tmp_path))
