# Needs no BuildKit-only syntax, so it builds with the classic builder and without a registry for
# the frontend. The build context is what .dockerignore lets through (sources only: no target/,
# no data/ with its keys, no .env, no secrets/).

# ---- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /build
# sqlx macros (if any) must use the checked-in offline data, never a live database
ENV SQLX_OFFLINE=true

# Dependencies first, against dummy sources, so this layer is cached until Cargo.toml/Cargo.lock
# change. The manifest also names a bench (benches/hot_paths.rs) and an example
# (examples/loadgen.rs): cargo refuses a manifest whose target files are missing, even though
# `cargo build --release` builds neither, so empty stand-ins are created for them and stay.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches examples \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs benches/hot_paths.rs examples/loadgen.rs \
    && cargo build --locked --release \
    && rm -rf src

# Real sources. migrations/ is embedded at compile time.
COPY src ./src
COPY migrations ./migrations
# touch: the copied sources may be older than the dummy build, which would otherwise look fresh
RUN find src -name '*.rs' -exec touch {} + \
    && cargo build --locked --release \
    && install -m 0755 target/release/centraldb-mfa /usr/local/bin/centraldb-mfa

# ---- runtime ----------------------------------------------------------------------------------
FROM debian:bookworm-slim

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 centraldb \
    && useradd --system --uid 10001 --gid centraldb --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin centraldb \
    && mkdir -p /data \
    && chown centraldb:centraldb /data \
    && chmod 0700 /data

COPY --from=builder /usr/local/bin/centraldb-mfa /usr/local/bin/centraldb-mfa

ENV CENTRALDB_LISTEN=0.0.0.0:8080 \
    CENTRALDB_DATA_DIR=/data \
    CENTRALDB_LOG_FORMAT=json

VOLUME ["/data"]
WORKDIR /data
# numeric uid:gid so orchestrators can verify runAsNonRoot (the user is "centraldb")
USER 10001:10001
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["centraldb-mfa", "healthcheck"]

ENTRYPOINT ["centraldb-mfa"]
CMD ["serve"]
