"""Models: the model table (towers), loading, LoRA per tower, QLoRA, the text-tower swap, tiny models built from configs."""
