"""Adapting and measuring models: pretrain a model from a preset (`attendo train`), adapt one
(`attendo finetune`, fully or with LoRA adapters in PEFT's format), evaluate it, on one process
or many (torchrun with DDP or FSDP).

data.py (files → token ids → batches) · bpe.py (a tokenizer for new models) · settings.py (what
a run is asked to do, the learning-rate schedule) · loop.py (the optimizer steps) ·
checkpoint.py (exact resume) · distributed.py (torchrun, DDP, FSDP) · export.py (the Hugging Face
format) · report.py and plot.py (progress, log.jsonl, the loss curve) · pretrain.py and
finetune.py (the two commands' pipelines) · cli.py (their flags) · lora.py (adapters).
"""
