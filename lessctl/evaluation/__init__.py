"""Evaluation of models on MMLU, BBH and TydiQA (and custom jsonl tasks): harnesses, metrics, the runner."""
