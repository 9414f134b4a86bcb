"""Serving entry point. The prediction service is not implemented yet; this exits with status 1."""

import sys

if __name__ == "__main__":
    sys.exit("serve.py: serving is not implemented yet; only training (train.py) is available.")
