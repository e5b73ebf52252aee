# The sovereign-operator image for users: a static Rust binary in an empty (FROM scratch) image,
# running as a non-root user; no shell, no package manager, nothing to patch but the binary.
# One build stage, run on the builder's own platform, cross-compiles for the target platform, so
# amd64 and arm64 images come from one command without emulation:
#
#   docker buildx build --platform linux/amd64,linux/arm64 \
#     --build-arg VERSION=0.1.0 --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE=https://REPOSITORY-URL \
#     -t REGISTRY/sovereign-operator:0.1.0 --push .
#   helm install sovereign-operator charts/sovereign-operator -n sovereign-system --create-namespace \
#     --set image.repository=REGISTRY/sovereign-operator --set image.tag=0.1.0
#
# Docker cannot run on the project's CI and development machines, so this file's build is not run
# there: scripts/release (the release: binaries, images, SBOMs, signatures) and `make image` (the
# e2e suite's image) build the same layout, labels included, with buildah and no Docker.
#
# The base is pinned by digest (the multi-platform index of rust:1.89-bookworm). To move it,
# resolve the new tag's index digest (docker buildx imagetools inspect rust:TAG) and change it here.

ARG RUST_IMAGE=docker.io/library/rust:1.89-bookworm@sha256:948f9b08a66e7fe01b03a98ef1c7568292e07ec2e4fe90d88c07bb14563c84ff

FROM --platform=$BUILDPLATFORM ${RUST_IMAGE} AS build
ARG TARGETARCH
# The release's version and commit (the build has no .git to read them from: build.rs).
ARG VERSION
ARG REVISION
# A C cross compiler and static libc for each target: ring and mimalloc compile C, and the
# binary links glibc statically (crt-static) so that it loads nothing at run time.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      gcc-x86-64-linux-gnu libc6-dev-amd64-cross gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY benches ./benches
COPY e2e ./e2e
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=sovereign-target-${TARGETARCH} \
    case "${TARGETARCH}" in \
      amd64) target=x86_64-unknown-linux-gnu; gnu=x86_64-linux-gnu ;; \
      arm64) target=aarch64-unknown-linux-gnu; gnu=aarch64-linux-gnu ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}: amd64 or arm64" >&2; exit 1 ;; \
    esac \
 && env="$(echo "${target}" | tr 'a-z-' 'A-Z_')" \
 && export "CARGO_TARGET_${env}_LINKER=${gnu}-gcc" "CC_$(echo "${target}" | tr '-' '_')=${gnu}-gcc" \
 && SOVEREIGN_VERSION="${VERSION}" SOVEREIGN_COMMIT="${REVISION}" \
    RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked --bin sovereign-operator --target "${target}" \
 && cp "target/${target}/release/sovereign-operator" /sovereign-operator \
 && "${gnu}-strip" /sovereign-operator

FROM scratch
ARG VERSION
ARG REVISION
# The repository's public address (scripts/release: SOVEREIGN_SOURCE or the https origin).
ARG SOURCE
LABEL org.opencontainers.image.title="sovereign-operator" \
      org.opencontainers.image.description="Allocates sovereign AI compute (GPU and NPU pools, grants, gang-admitted training runs)" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
COPY --from=build /sovereign-operator /sovereign-operator
# The chart's securityContext runs it as this user too (runAsNonRoot needs a numeric one).
USER 65532:65532
ENTRYPOINT ["/sovereign-operator"]
CMD ["run"]
