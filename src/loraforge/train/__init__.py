"""Training adapters: the config, the loop, checkpoints, and scoring.

    from loraforge.train import TrainConfig, train
    train(TrainConfig(data="examples/pirate.jsonl", out="runs/pirate", max_steps=100))
"""

from .config import TrainConfig
from .methods import Trainable, base_quantization, prepare
from .trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "Trainable", "base_quantization", "prepare", "train"]
