"""What runs write for people: picture grids, text outputs, plots, TensorBoard, tables."""
