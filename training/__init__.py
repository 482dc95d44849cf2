"""Training: the job runner (app side, light imports) and the child process `python -m training METHOD ...`.

Only the standard library, yaml, storage, training.files, training.children and training.datamix may be imported
here and in training/runner.py: the Gradio app imports them. Torch, transformers, TRL and peft are imported inside the
method modules (dpo, reward, ppo, score, kto, sft, sft_dpo).
"""

METHODS = ("dpo", "reward", "ppo", "score", "kto", "sft", "sft_dpo")
