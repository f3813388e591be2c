"""The person-album HTTP API (FastAPI) and the web page it serves; see docs/API.md."""
