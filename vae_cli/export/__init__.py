"""`vae export`'s formats: the weights as safetensors with the config (weights.py), ONNX
graphs of the encoder and decoder checked against the PyTorch model (onnx_graphs.py), and
the model card that says what the files are and how to load them (card.py)."""
