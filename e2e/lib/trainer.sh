# shellcheck shell=bash
# The trainer image of the dev cluster's real node: Debian bookworm from Debian's own packages
# (debootstrap --variant=minbase) with python3-torch (Debian's CPU build of PyTorch, which ships
# torchrun), plus examples/train/train.py. No registry: built with buildah into the tool cache and
# imported into the node's containerd (node_up). examples/train/Dockerfile is the same image for
# users with a registry.
# Sourced by e2e/cluster after common.sh and node.sh.
#
# Two layers, cached apart: the Debian root filesystem (rebuilt only when its recipe changes: the
# key is a checksum of trainer_base's text, the suite and the packages) lives in buildah's storage
# in the cache; the script layer on top makes the archive,
# ${CACHE_DIR}/images/trainer-KEY.oci.tar (key: train.py's and trainer_archive's checksum).

TRAINER_SUITE=bookworm
TRAINER_PACKAGES=python3-torch
TRAINER_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TRAINER_REPO="localhost/sovereign-e2e/trainer"

trainer_base_key() {
  { declare -f trainer_base; echo "$TRAINER_SUITE $TRAINER_PACKAGES"; } | cksum | cut -d' ' -f1
}
trainer_key() {
  printf '%s-%s' "$(trainer_base_key)" \
    "$({ declare -f trainer_archive; cat "${REPO_ROOT}/examples/train/train.py"; } | cksum | cut -d' ' -f1)"
}
# The image name the tests and the demo run (the tag is the recipe's key).
trainer_image() { echo "${TRAINER_REPO}:$(trainer_key)"; }

# trainer_base: the Debian + PyTorch image in buildah's storage, built once per recipe.
trainer_base() {
  local name; name="${TRAINER_REPO}-base:$(trainer_base_key)"
  buildah_cache inspect --type image "$name" >/dev/null 2>&1 && { echo "$name"; return 0; }
  local t0=$SECONDS c root
  log "building the trainer base image (debootstrap ${TRAINER_SUITE} minbase + ${TRAINER_PACKAGES}; once per recipe)"
  c=$(buildah_cache from --pull-never scratch)
  root=$(buildah_cache mount "$c")
  # debootstrap mounts /proc and /sys inside the target while it installs; leave nothing mounted.
  if ! debootstrap --variant=minbase --include="$TRAINER_PACKAGES" "$TRAINER_SUITE" "$root" "$TRAINER_MIRROR" \
      > "${CACHE_DIR}/images/trainer-debootstrap.log" 2>&1; then
    umount_below "$root"
    buildah_cache rm "$c" >/dev/null 2>&1 || true
    tail -n 20 "${CACHE_DIR}/images/trainer-debootstrap.log" >&2
    die "debootstrap of the trainer image failed (log: ${CACHE_DIR}/images/trainer-debootstrap.log)"
  fi
  umount_below "$root"
  # What a container never needs: package caches and lists, documentation, locales.
  rm -rf "${root:?}"/var/cache/apt/archives/*.deb "${root}"/var/lib/apt/lists/* "${root}"/usr/share/doc/* \
    "${root}"/usr/share/man/* "${root}"/usr/share/locale/* "${root}"/var/log/*.log
  buildah_cache umount "$c" >/dev/null
  buildah_cache config --user 65532:65532 --workingdir /tmp --env HOME=/tmp --cmd '' "$c"
  buildah_cache commit --quiet --rm "$c" "$name" >/dev/null || die "cannot commit the trainer base image"
  local old   # bases of earlier recipes
  for old in $(buildah_cache images --format '{{.Name}}:{{.Tag}}' | grep -F "${TRAINER_REPO}-base:" | grep -vxF "$name"); do
    buildah_cache rmi "$old" >/dev/null 2>&1 || true
  done
  log "trainer base image ${name} built in $((SECONDS - t0))s"
  echo "$name"
}

# trainer_archive: the trainer image as an OCI archive in the cache (built when missing).
trainer_archive() {
  local dir="${CACHE_DIR}/images" image archive
  mkdir -p "$dir"
  image=$(trainer_image)
  archive="${dir}/trainer-$(trainer_key).oci.tar"
  if [[ ! -f "$archive" ]]; then
    local base c t0=$SECONDS
    base=$(trainer_base)
    log "adding examples/train/train.py to the trainer image"
    c=$(buildah_cache from --pull-never "$base")
    buildah_cache copy --chmod 0644 "$c" "${REPO_ROOT}/examples/train/train.py" /opt/train/train.py >/dev/null
    # --redirects 1 --tee 1: torchrun 1.13 under Python 3.11 (bookworm) cannot parse its own
    # default 0 (a Flag no longer iterates its zero member); this tees each worker's stdout.
    # PYTHONUNBUFFERED: torchrun's copy of it reaches the log line by line, not at exit. PATH:
    # containerd's CRI adds none to an image that sets none.
    buildah_cache config --entrypoint '["python3", "-m", "torch.distributed.run", "--redirects", "1", "--tee", "1"]' \
      --cmd '["/opt/train/train.py"]' --env PYTHONUNBUFFERED=1 \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --label org.opencontainers.image.title=sovereign-trainer \
      --label "org.opencontainers.image.description=DDP (gloo, CPU) example trainer: Debian ${TRAINER_SUITE} python3-torch" "$c"
    rm -f "${archive}.tmp"
    # gzip-compressed layers: each node's containerd keeps the layer blob beside its unpacked
    # copy, and three trainer nodes' copies of 1.2 GB filled these machines' disks
    buildah_cache commit --quiet --rm --format oci --disable-compression=false "$c" "oci-archive:${archive}.tmp:${image}" >/dev/null \
      || die "cannot write the trainer image archive"
    mv -f "${archive}.tmp" "$archive"
    # older archives of this image: only the current one is kept
    find "$dir" -maxdepth 1 -name 'trainer-*.oci.tar' ! -name "$(basename "$archive")" -delete
    log "trainer image ${image} written in $((SECONDS - t0))s ($(du -h "$archive" | cut -f1))"
  fi
  echo "$archive"
}
