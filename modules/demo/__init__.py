"""The embedded demo: a tiny SDXL base "pretrained" on generated shapes, and the concept its LoRA learns."""
from tuneonce.demo.prepare import DemoPaths, DemoSettings, demo_paths, prepare_demo_base

__all__ = ["DemoPaths", "DemoSettings", "demo_paths", "prepare_demo_base"]
