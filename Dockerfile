# syntax=docker/dockerfile:1
# The CPU image of every facecluster process (API, workers, jobs; docs/DEPLOY.md):
#   docker build -t facecluster:cpu .
# Two stages: the build stage resolves the locked dependencies with uv and installs the
# project; the runtime stage gets only the result and runs as an unprivileged user. The model
# files come from the locked packages and are checked against the sha256 pinned in
# libs/facecore/models.py, in the build stage and again in the image that ships.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
RUN pip install --no-cache-dir uv==0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
# The dependencies alone first: this layer changes only with the lock file.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-install-project --extra cpu
COPY alembic.ini ./
COPY migrations migrations
COPY libs libs
COPY services services
COPY training training
# The project itself, in place: services/store/db.py finds the migrations next to it in /app.
RUN uv sync --frozen --compile-bytecode --extra cpu
# w600k-mbf is opt-in (extra insightface-models, non-commercial licence): not in this image.
RUN .venv/bin/facecluster models check --skip w600k-mbf

FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 facecluster \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/facecluster --shell /usr/sbin/nologin facecluster
WORKDIR /app
# Owned by root, read-only to the user that runs it; its home is the one writable place
# (caches of the libraries).
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
# The files this image ships, checked once more as the user that runs them.
RUN facecluster models check --skip w600k-mbf
EXPOSE 8000
CMD ["python", "-m", "services.api", "--host", "0.0.0.0", "--port", "8000"]
