"""Export to ONNX and per-runtime formats."""
