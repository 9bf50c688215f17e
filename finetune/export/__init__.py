"""Export: merge a run's adapters (alpha between base and adapted), sweep alpha, quantize behind a quality
gate, ONNX graphs, push to the Hub."""

DTYPES = ("fp32", "fp16", "bf16", "int8")  # export --dtype candidates (finetune/export/quantize.py)
