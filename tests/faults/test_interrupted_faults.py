"""Interrupted work: a crash in the middle of a checkpoint save, a disk that fills during one, a killed evaluation.
What the user had stays intact, the restart cleans up after the crash, and a resumed run equals an uninterrupted one."""

import resource
import signal
import subprocess
import sys
import time

import pytest
from app_helpers import tiny_checkpoint
from conftest import REPO, shared_path
from fault_helpers import (INJECT, digest, env, losses, pretrain_args, pretrain_assets, run, temp_leftovers,
                           user_error)

STEPS = 8


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return pretrain_assets(tmp_path_factory.mktemp("interrupted"))


@pytest.fixture(scope="module")
def uninterrupted(assets):
    out = assets / "full"
    res = run(*pretrain_args(assets, out, "--num-iterations", STEPS, "--save-every", 4))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def killed_mid_save(assets):
    """A run SIGKILLed while checkpoint-8 (its last) was being moved into place: checkpoint-4 is the last good one."""
    out = assets / "killed"
    res = run(*pretrain_args(assets, out, "--num-iterations", STEPS, "--save-every", 4),
              extra_env={"PYTHONPATH": INJECT, "FAULT_KILL_ON_RENAME": f"checkpoint-{STEPS}"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.fault("Interrupted", "SIGKILL during a checkpoint save, then --resume")
def test_kill_during_save_then_resume_equals_the_uninterrupted_run(assets, uninterrupted, killed_mid_save, told,
                                                                    tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-a", str(killed_mid_save), str(out)], check=True)
    assert (out / "checkpoint-4" / "training_state" / "trainer_state.json").is_file()
    assert not (out / f"checkpoint-{STEPS}").exists()
    assert temp_leftovers(out), "the kill should have left a half-finished .tmp-checkpoint-* behind"
    res = run(*pretrain_args(assets, out, "--num-iterations", STEPS, "--save-every", 4, "--resume"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout and "checkpoint-4" in res.stdout
    assert temp_leftovers(out) == []
    assert losses(out) == losses(uninterrupted)
    told(f"restart resumed from checkpoint-4, removed the half-written checkpoint-{STEPS}; losses equal the "
         "uninterrupted run's")


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes get EFBIG
    return apply


@pytest.mark.slow
@pytest.mark.fault("Interrupted", "disk full (file-size limit) during a checkpoint save")
def test_disk_full_during_save_stops_clearly_and_keeps_the_last_checkpoint(assets, killed_mid_save, told, tmp_path):
    out = tmp_path / "run"
    subprocess.run(["cp", "-a", str(killed_mid_save), str(out)], check=True)
    before = digest(out / "checkpoint-4")
    res = run(*pretrain_args(assets, out, "--num-iterations", STEPS, "--save-every", 4, "--resume"),
              preexec_fn=_file_size_limit(64 * 1024))
    message = user_error(res, f"checkpoint-{STEPS}", "file too large", "last complete checkpoint",
                         str(out / "checkpoint-4"), "--resume")
    assert digest(out / "checkpoint-4") == before
    assert not (out / f"checkpoint-{STEPS}").exists() and temp_leftovers(out) == []
    told(message)


@pytest.mark.slow
@pytest.mark.fault("Interrupted", "evaluation killed before it finishes: no partial output")
def test_killed_evaluation_leaves_no_output_file(tmp_path, told):
    _, _, model = tiny_checkpoint(tmp_path / "model")
    output = tmp_path / "results" / "core.json"
    bundle = shared_path("core_sample")
    p = subprocess.Popen([sys.executable, "-m", "evaluation.core", "--model", model, "--bundle", str(bundle),
                          "--output", str(output)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    seen = ""
    while "CORE:" not in seen:  # the model is loaded and scoring has begun
        line = p.stdout.readline()
        assert line or p.poll() is None, seen
        seen += line
        assert time.time() < deadline, seen
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert not output.exists()
    assert temp_leftovers(tmp_path) == []
    told("no core.json (results are written in one atomic rename at the end)")
