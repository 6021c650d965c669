"""Evaluation of models on MMLU, BBH and TydiQA (and custom jsonl tasks, reranking): harnesses, metrics, the runner."""
