# The sovereign-operator image for users: a static Rust binary in an empty (FROM scratch) image,
# running as a non-root user; no shell, no package manager, nothing to patch but the binary.
#
#   docker build -t REGISTRY/sovereign-operator:0.1.0 --build-arg VERSION=0.1.0 .
#   docker push REGISTRY/sovereign-operator:0.1.0
#   helm install sovereign-operator charts/sovereign-operator -n sovereign-system --create-namespace \
#     --set image.repository=REGISTRY/sovereign-operator --set image.tag=0.1.0
#
# `make image` builds the same layout without Docker (buildah, from the binary the e2e suite runs).

ARG RUST_VERSION=1.89

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY e2e ./e2e
# glibc's static libc (crt-static): the binary loads nothing at run time.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --bin sovereign-operator --target "$target" \
 && cp "target/$target/release/sovereign-operator" /sovereign-operator \
 && strip /sovereign-operator \
 && /sovereign-operator version

FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sovereign-operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.description="Allocates sovereign AI compute (GPU and NPU pools, grants, gang-admitted training runs)"
COPY --from=build /sovereign-operator /sovereign-operator
# The chart's securityContext runs it as this user too (runAsNonRoot needs a numeric one).
USER 65532:65532
ENTRYPOINT ["/sovereign-operator"]
CMD ["run"]
