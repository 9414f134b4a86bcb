"""The classifier: a timm backbone wrapped in a LightningModule."""
