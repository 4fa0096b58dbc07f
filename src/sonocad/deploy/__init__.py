"""A finished run as a predictor with its preprocessing (`predictor`), and its ONNX export and engine (`export`)."""
