"""Evaluation of frozen or fine-tuned backbones (`m3i eval TASK`) and run reports."""
