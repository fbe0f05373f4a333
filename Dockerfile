# syntax=docker/dockerfile:1
# One image for every detstream stage and the operator:
#   docker run IMAGE stage worker --plan plan.json --index 0    (a stage)
#   docker run IMAGE operator --liveness-port 8080              (the operator)
# Build: docker buildx build --build-arg VERSION=0.1.0 -t detstream:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: the detstream wheel and wheels of all its dependencies ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# Dependencies first (from pyproject.toml alone), so a source change does not rebuild them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
 && pip wheel --prefer-binary --wheel-dir /wheels -r requirements.txt
COPY README.md ./
COPY services/ services/
COPY operator/ operator/
COPY protos/ protos/
RUN pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime: python + the wheels, nothing else ----
FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG SOURCE=https://github.com/detstream/detstream
ARG LICENSES=BSD-3-Clause
LABEL org.opencontainers.image.title="detstream" \
      org.opencontainers.image.description="Stream detector data through pipeline stages; the detstream operator" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="${LICENSES}"
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The wheels are bind-mounted from the builder, so they never become a layer of this image;
# pip, setuptools and wheel are removed after use (no installer or build tool at run time).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/detstream-*.whl \
 && pip uninstall --yes pip setuptools wheel \
 && groupadd --system --gid 10001 detstream \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin detstream
# gRPC control 7100, metrics 9100, data plane 7200-7203; operator: liveness 8080, metrics 9090
EXPOSE 7100 9100 7200 7201 7202 7203 8080 9090
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["detstream"]
CMD ["--help"]
