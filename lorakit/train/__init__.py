"""Training with LoRA: `train(load_config(path))` is what `lorakit train` runs; see loop.py for the loop itself."""

from lorakit.train.config import TrainConfig, load_config
from lorakit.train.loop import RunResult, evaluate, train

__all__ = ["RunResult", "TrainConfig", "evaluate", "load_config", "train"]
