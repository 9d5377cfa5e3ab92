"""Inference backends behind one interface: torch (eager), ONNX Runtime, TensorRT."""
