# wsedge container: `docker build -t wsedge .` then
#   docker run -p 8080:8080 -v $PWD/conf/wsedge.yaml:/etc/wsedge/wsedge.yaml:ro wsedge
# The configuration is read from /etc/wsedge/wsedge.yaml (mount yours there).

FROM rust:1-bookworm AS build
RUN apt-get update -qq && apt-get install -y -qq cmake >/dev/null && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY examples ./examples
COPY tools ./tools
RUN cargo build --locked --release --bin wsedge && strip target/release/wsedge

FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq ca-certificates >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin wsedge \
 && mkdir -p /etc/wsedge
COPY --from=build /src/target/release/wsedge /usr/local/bin/wsedge
COPY conf/wsedge.yaml /etc/wsedge/wsedge.yaml
USER wsedge
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/wsedge"]
CMD ["-c", "/etc/wsedge/wsedge.yaml"]
