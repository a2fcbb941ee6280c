"""Name a flower's species from a photo: a frozen pretrained CNN with a new trainable head.

The pieces, one module per stage: `data`, `backbones`, `model` (the head), `training`,
`checkpoint`, `prediction`, `evaluation`, `plots`, `cli`.
"""
from .backbones import BACKBONES, Backbone, Preprocessing, build_backbone
from .checkpoint import Checkpoint, load_checkpoint, load_model, save_checkpoint
from .config import TrainConfig
from .errors import UserError
from .model import FlowerClassifier, build_head, count_parameters
from .prediction import Prediction, imshow, predict, process_image

__version__ = "0.1.0"
