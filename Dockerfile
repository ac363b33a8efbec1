# The one `imz` binary in a small image. Build: docker build -t imz .
# (Untested here: the development machines run no Docker engine.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin imz

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 imz && mkdir -p /data /cache /secrets && chown imz /data /cache /secrets
COPY --from=build /src/target/release/imz /usr/local/bin/imz
USER imz
ENTRYPOINT ["/usr/local/bin/imz"]
