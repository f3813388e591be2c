"""``python -m services.api [--db URL] [--host H] [--port P]``: the API under uvicorn."""

import sys

from services.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
