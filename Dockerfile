# aigc on CPU, serving trained run folders mounted at /runs:
#   docker build -t aigc .
#   docker run --rm -p 8000:8000 -v "$PWD/runs:/runs" aigc /runs/quickstart
# then open http://localhost:8000/ (the playground) or call http://localhost:8000/v1/...
# Arguments after the image name are those of `aigc serve` (run folders, flags); every
# flag can also be set by its AIGC_* environment variable (docker run -e AIGC_API_KEYS=...).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the CPU index, so that `pip install .` keeps it instead of pulling a
# CUDA build. Any torch build that pyproject.toml accepts works: for a GPU image, start
# from a CUDA base and install that build here instead.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md /tmp/aigc/
COPY src /tmp/aigc/src
RUN pip install /tmp/aigc && rm -rf /tmp/aigc

# Not root. Runs are read from the mounted folder; caches go to this user's home.
RUN useradd --create-home --uid 1000 aigc
USER aigc
WORKDIR /home/aigc

# Listen on every interface of the container: `aigc serve`'s default, 127.0.0.1,
# cannot be reached through `-p`.
ENV AIGC_HOST=0.0.0.0 \
    AIGC_PORT=8000
EXPOSE 8000
VOLUME ["/runs"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ.get('AIGC_PORT', '8000'), timeout=4)"
# On `docker stop` aigc gets SIGTERM and lets requests in flight finish (--grace-seconds,
# 30 by default): stop with `docker stop -t 35` to give it that time.
ENTRYPOINT ["aigc", "serve"]
