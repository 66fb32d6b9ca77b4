"""Fine-tuning runs, the application behind `wtacrs finetune`, in parts:

- `spec`: the frozen specification of a command's runs (`Settings`) and of one run (`RunSpec`).
- `models`: loading a pre-trained model for a task; model names, kinds and length limits.
- `train`: one run with the Transformers Trainer, from its folder claimed to its results written.
- `results`: the results record of a run, written by `train` and read by `wtacrs report`.
"""
