"""Checkpoint conversion from PyTorch / Hugging Face formats (torch only needed for `.pth`)."""
