"""Reading, checking, splitting and loading the image data."""
