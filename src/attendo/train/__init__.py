"""Adapting and measuring models: training, fine-tuning, LoRA adapters (PEFT format) and evaluation."""
