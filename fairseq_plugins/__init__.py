"""fairseq plugins for Kosmos-2 training (`--user-dir fairseq_plugins`): the official registered names on top of kosmos2.

task `image_gpt_interleaved_laion_obj` (task.py), model `unigptmodel` with archs `unigptmodel_xl` / `unigptmodel_tiny`
(model.py), criterion `unigpt` (criterion.py), optimizer `torch_adamw` (optim.py), checkpoint glue (glue.py).
Entry point: `python -m fairseq_plugins.train` (= fairseq-train with these plugins and a few argument checks).
`--deepspeed --zero N` trains through ds_trainer.py's DeepSpeedTrainer (deepspeed_config.py, deepspeed_checkpoint.py).
"""
import os
import sys

# kosmos2/ lives next to this folder; fairseq imports a --user-dir by putting only *its* parent on sys.path, which is
# the repository root already, but a user dir given by absolute path from elsewhere needs the same.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from . import criterion, glue, model, optim, task  # noqa: E402,F401  (registration side effects)

glue.install()
