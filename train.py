"""Train a face-mask classifier: `python train.py model=resnet18 trainer.max_epochs=5`.

See `python train.py --help` for the configuration groups, and README.md for a walk-through.
"""

from facemask.train import main

if __name__ == "__main__":
    main()
