"""Trainer: the Llama decoder (model.py), DeepSpeed ZeRO-3 training, checkpoints, export and sampling."""
