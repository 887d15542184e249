# wsedge container: `docker build -t wsedge .`, then the demo:
#   docker run --rm -p 8080:8080 -p 9090:9090 wsedge --demo
# or your configuration (listen on 0.0.0.0 inside a container):
#   docker run -p 80:8080 -p 9090:9090 -v $PWD/wsedge.yaml:/etc/wsedge/wsedge.yaml:ro wsedge
# The configuration is read from /etc/wsedge/wsedge.yaml (or $WSEDGE_CONFIG); it must be
# readable by uid 10001 (or run with --user as its owner). With `source.etcd`, the
# last-known-good file goes to /var/lib/wsedge: give it a volume. README: "Containers".

FROM rust:1-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq cmake protobuf-compiler >/dev/null && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# The dependencies first, against stand-in sources, so that a change of wsedge's own code
# rebuilds only wsedge (a minute) and not every crate (five).
COPY Cargo.toml Cargo.lock ./
COPY tools/wsload/Cargo.toml tools/wsload/
COPY tools/h2io/Cargo.toml tools/h2io/
RUN mkdir -p src tools/wsload/src tools/h2io/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > tools/wsload/src/main.rs && touch tools/h2io/src/lib.rs \
 && cargo build --locked --release --bin wsedge \
 && rm -rf src tools/wsload/src tools/h2io/src
COPY src ./src
COPY examples ./examples
COPY tools ./tools
# COPY keeps the files' own times, which may be older than the stand-ins' build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --locked --release --bin wsedge && strip target/release/wsedge

FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 wsedge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin wsedge \
 && mkdir -p /etc/wsedge /var/lib/wsedge \
 && chown wsedge:wsedge /var/lib/wsedge
COPY --from=build /src/target/release/wsedge /usr/local/bin/wsedge
COPY conf/container.yaml /etc/wsedge/wsedge.yaml
USER wsedge
# The proxy and the admin listener (/healthz, /metrics).
EXPOSE 8080 9090
# SIGTERM drains: each tunnel gets a Close frame over drain.spread, then wsedge exits.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/wsedge", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/wsedge"]
CMD ["-c", "/etc/wsedge/wsedge.yaml"]
