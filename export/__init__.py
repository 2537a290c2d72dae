"""Export-side tools (need torch/diffusers/transformers): random checkpoints and ONNX export."""
