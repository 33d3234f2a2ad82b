# syntax=docker/dockerfile:1
# audit-service image: `docker build -t audit-service .`
# docker-compose.yml builds it for the full stack (Kafka, PostgreSQL,
# Prometheus).

# ---- build -----------------------------------------------------------------
FROM rust:1.95-bookworm AS build
# rdkafka builds its bundled librdkafka with its own configure script (not
# cmake); features ssl, zstd, libz need OpenSSL and zlib headers and
# pkg-config (zstd is compiled from source). GSSAPI is off, so no
# libsasl2-dev: a librdkafka that found it would need libsasl2 at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The caches keep downloaded crates and compiled dependencies between builds;
# the binary is copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -m 0755 target/release/audit-service /usr/local/bin/audit-service

# ---- runtime ---------------------------------------------------------------
FROM debian:bookworm-slim
# libssl3: librdkafka, PostgreSQL TLS and the schema-registry client;
# ca-certificates: TLS to brokers, PostgreSQL and registries;
# curl: the health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 audit \
 && useradd --system --uid 10001 --gid audit --home-dir /app --no-create-home --shell /usr/sbin/nologin audit
WORKDIR /app
COPY --from=build /usr/local/bin/audit-service /usr/local/bin/audit-service
# Relative paths in the config (config/audit-service.toml, schemas/) resolve
# against /app.
COPY config/ config/
COPY schemas/ schemas/
USER audit:audit
# Listen on all interfaces in a container (the built-in default is
# 127.0.0.1:8080); override with AUDIT__HTTP__LISTEN.
ENV AUDIT__HTTP__LISTEN=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD curl -fsS -o /dev/null http://127.0.0.1:8080/api/v1/health || exit 1
ENTRYPOINT ["audit-service"]
CMD ["run"]
