"""Train a flower classifier: python train.py DATA_DIR [--save_dir DIR --arch vgg16 ...]; see --help."""
import sys

from flower_classifier.cli import single_command_main

if __name__ == "__main__":
    sys.exit(single_command_main("train", "train.py"))
