"""The diffusion task: loading pipelines, prompts and concepts, sampling, evaluation and export."""
