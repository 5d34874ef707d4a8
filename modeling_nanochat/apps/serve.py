"""``python -m modeling_nanochat.apps.serve CHECKPOINT [transformers serve options]``: transformers' own OpenAI-compatible
server (``transformers serve``) for a checkpoint that carries its modeling code.

Why a launcher: ``transformers serve`` (5.23-5.25) picks the model class as ``getattr(transformers,
config.architectures[0])`` and never reads ``auto_map``, so it cannot load a remote-code model: with our
``NanoChatHFForCausalLM`` it stops with "module transformers has no attribute NanoChatHFForCausalLM" (and under
the earlier name ``NanoChatForCausalLM`` it silently built transformers' own, different Oct-2025 nanochat). Here
that name is pointed at ``AutoModelForCausalLM``, which follows ``auto_map`` (the checkpoint's own code, as TGI
and vLLM load it), and the unmodified ``transformers serve`` runs with ``--trust-remote-code`` and the checkpoint
pinned. Since 5.25 the model loads in a spawned process: the name travels in ``$NANOCHAT_SERVE_ARCHITECTURE`` and
this module, which a spawned child of ``python -m modeling_nanochat.apps.serve`` imports as its main module, points it
there too.

Needs ``pip install 'transformers[serving]'``. Clients must send the checkpoint path as the model name (the
server is pinned to it): ``python app.py --endpoint http://127.0.0.1:8000 --endpoint-model CHECKPOINT``.
"""

from __future__ import annotations

import os
import sys

_ENV = "NANOCHAT_SERVE_ARCHITECTURE"


def _point_architecture_at_auto(architecture: str) -> None:
    import transformers
    from transformers import AutoModelForCausalLM
    setattr(transformers, architecture, AutoModelForCausalLM)


if os.environ.get(_ENV):  # in the model's spawned process
    _point_architecture_at_auto(os.environ[_ENV])


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m modeling_nanochat.apps.serve CHECKPOINT [transformers serve options]\n"
                         "CHECKPOINT: a model directory (e.g. runs/d20 or runs/d20/checkpoint-5000) or a Hub id")
    checkpoint, options = argv[0], argv[1:]
    from transformers import PretrainedConfig
    from transformers.cli.transformers import main as transformers_cli

    try:
        architecture = PretrainedConfig.get_config_dict(checkpoint)[0]["architectures"][0]
    except (OSError, KeyError, IndexError) as e:
        raise SystemExit(f"{checkpoint}: no config.json naming its architecture ({e})") from None
    os.environ[_ENV] = architecture
    _point_architecture_at_auto(architecture)
    sys.argv = ["transformers", "serve", "--trust-remote-code", *options, checkpoint]
    transformers_cli()


if __name__ == "__main__":
    main()
