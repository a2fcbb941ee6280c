"""Name the flower in a photo: python predict.py IMAGE CHECKPOINT [--top_k 5 --category_names ...]."""
import sys

from flower_classifier.cli import single_command_main

if __name__ == "__main__":
    sys.exit(single_command_main("predict", "predict.py"))
