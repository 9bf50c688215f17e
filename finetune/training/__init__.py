"""Training: the data as the loop sees it, the step, losses, checkpoints, distillation, mining hooks."""
