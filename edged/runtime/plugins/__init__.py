"""Accelerator plugins: one small module per type, each an AcceleratorPlugin subclass."""
