"""HTTP service for exported VAE artifacts: dynamically batched ONNX Runtime / TorchScript inference."""
