"""`python -m modeling_nanochat.apps.publish` offline, up to the Hub calls: HfApi.create_repo / upload_folder are replaced
by recorders, and what upload_folder would send is computed with huggingface_hub's own pattern filter."""

import contextlib
import io
import json
import re
import shutil

import pytest
from conftest import FIXTURES, perturbed_model, tiny_config
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import filter_repo_objects

from evaluation.chat import format_table as chat_table
from evaluation.core import format_table as core_table
from modeling_nanochat.apps.publish import main, publish
from modeling_nanochat.pretrain.report import write_run_report
from modeling_nanochat.optim.scaling import plan_training
from modeling_nanochat.tokenizer.tokenizer import convert_nanochat_tokenizer, save_tokenizer

REPO_ID = "someone/nanochat-tiny"
STEPS, BATCH = 6, 512


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished run dir as recipes/pretrain.py leaves it (final model, a checkpoint, metrics, summary.md,
    loss.png) plus CORE / ChatCORE result files in the formats evaluation.core/chat --output write."""
    run = tmp_path_factory.mktemp("publish") / "runs" / "tiny"
    config = tiny_config()
    model = perturbed_model(config)
    tok = convert_nanochat_tokenizer(str(FIXTURES / "nanochat_tokenizer"))
    for d in (run / "checkpoint-3", run):
        model.save_pretrained(d)
        save_tokenizer(tok, str(d))
    (run / "checkpoint-3" / "training_state").mkdir()
    (run / "checkpoint-3" / "training_state" / "trainer_state.json").write_text(json.dumps({"step": 3}))
    plan = plan_training(config, device_batch_size=2, total_batch_size=BATCH, num_iterations=STEPS).to_dict()
    (run / "run_config.json").write_text(json.dumps({
        "world_size": 1, "distributed_type": "NO", "optimizer": "muonadamw", "device": "cpu",
        "args": {"data": "climbmix"}, "plan": plan}))
    rows = [{"step": 0, "val_bpb": 3.3}]
    rows += [{"step": s, "loss": 6.0 - s / 10, "smooth_loss": 6.0 - s / 20, "tok_per_s": 1000.0, "mfu": None,
              "total_training_time": s * 0.5} for s in range(STEPS)]
    rows += [{"step": 3, "val_bpb": 2.9}, {"step": STEPS, "val_bpb": 2.75}]
    rows.sort(key=lambda r: r["step"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_run_report(run)
    core = {"results": {"hellaswag_zeroshot": {"accuracy": 0.31, "centered": 0.08},
                        "arc_easy": {"accuracy": 0.45, "centered": 0.27}}, "core": 0.175}
    chat = {"results": {"gsm8k": {"title": "GSM8K", "accuracy": 0.02, "centered": 0.02, "passed": 1, "total": 50}},
            "chatcore": None, "chatcore_cat": None}
    (run / "core.json").write_text(json.dumps(core))
    (run / "chatcore.json").write_text(json.dumps(chat))
    return run, model, core, chat


@pytest.fixture
def hub(monkeypatch):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw))
                        or f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload_folder", kw["repo_id"], kw)))
    return calls


def _sent(folder, allow_patterns):
    """The files upload_folder sends: huggingface_hub's filter over every file under the folder."""
    paths = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return set(filter_repo_objects(paths, allow_patterns=allow_patterns))


def test_publish_writes_the_card_and_uploads_the_model_files_only(run, hub):
    run_dir, model, core, chat = run
    assert main([str(run_dir), REPO_ID, "--private", "--license", "mit"]) == 0
    (create, repo, create_kw), (upload, repo2, up_kw) = hub
    assert (create, repo, create_kw["private"]) == ("create_repo", REPO_ID, True)
    assert (upload, repo2) == ("upload_folder", REPO_ID)
    assert up_kw["folder_path"] == str(run_dir)
    assert _sent(run_dir, up_kw["allow_patterns"]) == {
        "README.md", "config.json", "generation_config.json", "model.safetensors", "configuration_nanochat.py",
        "modeling_nanochat.py", "tokenizer.json", "tokenizer_config.json", "token_bytes.pt",
        "run_config.json", "metrics.jsonl", "summary.md", "loss.png", "core.json", "chatcore.json"}

    card = ModelCard.load(run_dir / "README.md")
    assert (card.data.library_name, card.data.pipeline_tag, card.data.license) == ("transformers", "text-generation",
                                                                                    "mit")
    assert "nanochat" in card.data.tags
    text = card.text
    n_params = sum(p.numel() for p in model.parameters())
    for expected in (f"| depth (layers) | {model.config.num_hidden_layers} |", f"| parameters | {n_params:,} |",
                     f"| tokens trained | {STEPS * BATCH:,}", f"| steps | {STEPS:,} x {BATCH:,} tokens |",
                     "| validation bits per byte | 2.7500 (step 6) |", core_table(core), chat_table(chat),
                     "trust_remote_code=True", f"vllm serve {REPO_ID} --trust-remote-code --model-impl transformers",
                     f"--model-id {REPO_ID} --trust-remote-code", f"python -m modeling_nanochat.apps.serve {REPO_ID} --port 8000",
                     "final_logit_softcapping"):
        assert expected in text, expected
    summary = (run_dir / "summary.md").read_text()
    assert summary.splitlines()[-1] in text and "### Pretraining run" in text  # the run report, headings demoted


def test_the_cards_python_snippet_runs(run, hub):
    run_dir, *_ = run
    card = publish(run_dir, REPO_ID, dry_run=True)["card"]
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "max_new_tokens=256" in snippet
    snippet = snippet.replace(REPO_ID, str(run_dir)).replace("max_new_tokens=256", "max_new_tokens=8")  # quick
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(snippet, "card-snippet", "exec"), {})
    assert out.getvalue().strip()  # the tiny model said something
    assert hub == []


def test_a_checkpoint_reports_its_own_steps(run, hub):
    run_dir, *_ = run
    card = publish(run_dir / "checkpoint-3", REPO_ID, dry_run=True)["card"]
    assert f"| tokens trained | {3 * BATCH:,}" in card and "| validation bits per byte | 2.9000 (step 3) |" in card


def test_dry_run_touches_nothing_and_a_users_readme_is_kept(run, hub, capsys, tmp_path):
    run_dir, *_ = run
    before = (run_dir / "README.md").read_text() if (run_dir / "README.md").exists() else None
    assert main([str(run_dir), REPO_ID, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "library_name: transformers" in out and "  model.safetensors" in out and "training_state" not in out
    assert hub == [] and ((run_dir / "README.md").read_text() if before is not None else None) == before

    mine = tmp_path / "mine"
    shutil.copytree(run_dir / "checkpoint-3", mine, ignore=shutil.ignore_patterns("training_state"))
    (mine / "README.md").write_text("# my own card\n")
    assert publish(mine, REPO_ID)["card_written"] is False
    assert (mine / "README.md").read_text() == "# my own card\n"


def test_bad_directories_are_refused_with_the_fix(run, hub, capsys, tmp_path):
    run_dir, *_ = run
    bare = tmp_path / "no_tokenizer"
    perturbed_model(tiny_config(depth=1)).save_pretrained(bare)
    assert main([str(bare), REPO_ID]) == 2
    assert "tokenizer.json" in capsys.readouterr().err

    still_training = tmp_path / "run"
    (still_training / "checkpoint-3").mkdir(parents=True)
    for f in (run_dir / "checkpoint-3").iterdir():
        if f.is_file():
            (still_training / "checkpoint-3" / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=r"newest checkpoint is .*checkpoint-3"):
        publish(still_training, REPO_ID)
    with pytest.raises(ValueError, match="user-or-org/name"):
        publish(run_dir, "no-namespace")
    assert hub == []
