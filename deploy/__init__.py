"""deploy: compress a PyTorch model for a target device, export it, and prove the result by measurement.

Runtimes (onnxruntime, openvino, tensorrt) are imported lazily, inside the functions that need them, so that
`import deploy` stays light; a test holds us to that.
"""
__version__ = "0.1.0"
