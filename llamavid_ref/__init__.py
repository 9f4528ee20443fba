"""PyTorch reference of LLaMA-VID: loads the released checkpoints and matches their numerics."""
