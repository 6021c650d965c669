"""Running the whole method: the pipeline of stages and the checkpoint-subset ablation."""
