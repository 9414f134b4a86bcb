"""Prediction monitoring: input properties, drift against the training reference."""
