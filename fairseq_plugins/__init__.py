"""fairseq plugins for Kosmos-2 training (`--user-dir fairseq_plugins`): the official registered names on top of kosmos2.

task `image_gpt_interleaved_laion_obj` (task.py), model `unigptmodel` with archs `unigptmodel_xl` / `unigptmodel_tiny`
(model.py), criterion `unigpt` (criterion.py), optimizer `torch_adamw` (optim.py), checkpoint glue (glue.py).
Entry point: `python -m fairseq_plugins.train` (= fairseq-train with these plugins and a few argument checks).
`--deepspeed --zero N` trains through ds_trainer.py's DeepSpeedTrainer (deepspeed_config.py, deepspeed_checkpoint.py).
"""
from . import criterion, glue, model, optim, task  # noqa: F401  (registration side effects)

glue.install()
