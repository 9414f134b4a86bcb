"""Serve the registered face-mask classifier: `python serve.py model.alias=challenger port=9000`.

See `python serve.py --help` for the configuration, and README.md for the endpoints.
"""

from facemask.serve import main

if __name__ == "__main__":
    main()
