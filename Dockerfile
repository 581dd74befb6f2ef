# syntax=docker/dockerfile:1
#
# docker build -t berth .
# docker run -p 5000:5000 -p 5001:5001 -v berth-data:/var/lib/berth berth
#
# /etc/berth/berth.toml is config/berth.toml, the same file that is compiled in as the
# default; mount your own over it. Its `storage.root = "./berth-data"` resolves against
# the working directory, /var/lib/berth, which is the volume.

FROM rust:1-bookworm AS build
WORKDIR /src
# Only what the binary is built from: tests/ and benches/ are not needed for
# `--bin berth` (cargo checks a declared test or bench path only when building it).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
# aws-lc-sys (rustls' crypto) and mimalloc build with the C compiler already in this
# image; no cmake.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin berth \
    && install -D -m 0755 target/release/berth /out/usr/local/bin/berth \
    && mkdir -p /out/var/lib/berth

# distroless cc: glibc, libgcc, CA certificates, no shell; uid/gid 65532 is "nonroot".
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/usr/local/bin/berth /usr/local/bin/berth
COPY config/berth.toml /etc/berth/berth.toml
# Copying the directory (not creating it with WORKDIR) lets it be owned by the
# non-root user, so a fresh volume mounted here is writable.
COPY --from=build --chown=65532:65532 /out/var/lib/ /var/lib/
USER 65532:65532
WORKDIR /var/lib/berth
VOLUME /var/lib/berth
# 5000: OCI pull API; 5001: /metrics, /healthz, /readyz, /admin/*
EXPOSE 5000 5001
ENTRYPOINT ["/usr/local/bin/berth"]
CMD ["serve", "--config", "/etc/berth/berth.toml"]
