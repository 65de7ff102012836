# syntax=docker/dockerfile:1.7
#
# The loraops image: one `loraops` binary (registry, gateway, trainer and CLI) on Debian slim,
# running as an unprivileged user (uid 10001). The Helm chart (helm/loraops) runs it with a
# read-only root filesystem; everything it writes goes to mounted volumes.
#
#   docker build -t loraops:0.1.0 .                              # CPU image (the default target)
#   docker build --target cuda -t loraops:0.1.0-cuda \
#       --build-arg CUDA_COMPUTE_CAP=90 .                        # CUDA image: GPU training + serving
#
# CUDA_COMPUTE_CAP is the GPU generation the kernels are compiled for (80 = A100, 89 = L4/L40S,
# 90 = H100/H200); the build machine needs no GPU. See helm/README.md for running the CUDA image.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm
ARG CUDA_VERSION=12.8.1
ARG CUDA_UBUNTU=ubuntu24.04

# --- CPU build ---------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
# Unpinned apt packages on purpose: the release's archive moves with its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config cmake clang \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin loraops \
 && cp target/release/loraops /usr/local/bin/loraops

# --- CUDA build and image (docker build --target cuda) ------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-devel-${CUDA_UBUNTU} AS cuda-builder
ARG RUST_VERSION
ARG CUDA_COMPUTE_CAP=90
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config cmake clang \
 && rm -rf /var/lib/apt/lists/*
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --profile minimal --default-toolchain "${RUST_VERSION}"
ENV PATH=/root/.cargo/bin:${PATH} \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin loraops \
        --features cuda \
 && cp target/release/loraops /usr/local/bin/loraops

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${CUDA_UBUNTU} AS cuda
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loraops \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/loraops --shell /usr/sbin/nologin loraops \
 && install -d -o 10001 -g 10001 /var/lib/loraops /var/cache/loraops /models
COPY --from=cuda-builder /usr/local/bin/loraops /usr/local/bin/loraops
USER 10001:10001
WORKDIR /var/lib/loraops
EXPOSE 8400 8500
ENTRYPOINT ["/usr/local/bin/loraops"]
CMD ["--help"]

# --- CPU image (the default target: last stage) ------------------------------------------------
FROM debian:${DEBIAN_RELEASE}-slim AS cpu
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 loraops \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/loraops --shell /usr/sbin/nologin loraops \
 && install -d -o 10001 -g 10001 /var/lib/loraops /var/cache/loraops /models
COPY --from=builder /usr/local/bin/loraops /usr/local/bin/loraops
USER 10001:10001
WORKDIR /var/lib/loraops
EXPOSE 8400 8500
ENTRYPOINT ["/usr/local/bin/loraops"]
CMD ["--help"]
