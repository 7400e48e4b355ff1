# syntax=docker/dockerfile:1
# proj's image: the wheel and its runtime dependencies, at the versions
# requirements.txt pins, and nothing of the tests or the tools. One image
# serves every process (web, worker, beat, relay, migrations); the command
# chooses (docker-compose.yml, deploy/kubernetes/).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# requirements.txt as constraints: the pinned version of whatever the wheel
# (with its otel extra) and gunicorn need, and none of the rest.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=requirements.txt,target=/requirements.txt \
    pip install --constraint /requirements.txt "$(ls /wheels/proj-*.whl)[otel]" gunicorn
# The bytecode was compiled at install; the processes write none, nor buffer their logs.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# An unprivileged user whose only writable folder is the data folder: beat's
# schedule, the file mailer's messages, the embedded setup's files.
RUN groupadd --system --gid 10001 proj \
    && useradd --system --uid 10001 --gid proj --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin proj \
    && mkdir /data \
    && chown proj:proj /data \
    && chmod 0700 /data
ENV PROJ_DATA_DIR=/data
# Celery puts the working folder on sys.path: one nobody can write to.
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can tell it is not root.
USER 10001:10001
EXPOSE 5000
# The web tier, as docker-compose.yml and deploy/kubernetes/web.yaml run it.
CMD ["gunicorn", "--bind", "0.0.0.0:5000", "--workers", "4", "--worker-tmp-dir", "/dev/shm", \
     "--no-control-socket", "--graceful-timeout", "25", "--access-logfile", "-", \
     "proj.web:create_app()"]
