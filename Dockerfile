# The gateway alone in a distroless image, run as a non-root user.
#   docker build -t aggregator:0.1.0 .
#   docker run --rm -p 50051:50051 aggregator:0.1.0 --listen 0.0.0.0:50051   # the demo

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# The caches keep the registry and the build between image builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin aggregator \
    && cp target/release/aggregator /aggregator

# glibc and CA certificates (for https upstreams with the system roots), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /aggregator /usr/local/bin/aggregator
USER 65532:65532
# gRPC, and Prometheus metrics when [server] metrics_listen is set.
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/aggregator"]
CMD ["--config", "/etc/aggregator/gateway.toml", "--watch", "--log-format", "json"]
