"""Train, track, serve and monitor a face-mask image classifier."""

__version__ = "0.1.0"
