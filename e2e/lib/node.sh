# shellcheck shell=bash
# The real node of the dev cluster: a kubelet (built from the same wrapper module as the control
# plane) with containerd, runc and the CNI plugins from Debian's packages, beside the kwok nodes.
# It is a system node: label sovereign.ai/node-role=system and taint CriticalAddonsOnly:NoSchedule,
# no accelerator label, so no pool selects it and no training pod lands on it.
# Sourced by e2e/cluster after common.sh, tools.sh and controlplane.sh.
#
# State in $NODE_DIR (.e2e/node/): containerd/ (root, state, socket, config), kubelet/ (root dir,
# config, kubeconfig), cni/ (bin links, net.d, IPAM data, relay state), pod-logs/.
#
# Networking (only loopback and namespaces made here): pods get addresses of a fake /24 on a bridge
# with no default route, so a pod reaches nothing but the bridge. The API server stays on the
# host's 127.0.0.1; the chained CNI plugin e2e/node/apiserver-relay makes the `kubernetes` Service
# address 10.96.0.1:443 answer inside each pod's own network namespace (see that file).
#
# Cluster DNS: CoreDNS (built by e2e/cluster tools) serves cluster.local from the API server and
# is the kubelet's clusterDNS. It listens on the bridge's gateway address (.1 of the pod subnet),
# and on no other: the bridge and that address are made here (node_bridge_up, before the CNI
# plugin adopts the bridge) and deleted on `down`, so every pod reaches it on its own subnet and
# nothing outside the host's own namespaces can. (A relay per pod, as for the API server, would
# have to carry UDP datagrams; a bind on the bridge is plainer.) It forwards nothing: a name
# outside cluster.local is refused, never sent on. Its health and readiness ports are on 127.0.0.1.

NODE_DIR="${STATE_DIR}/node"
NODE_NAME="sovereign-e2e-system"
NODE_IMAGE_PAUSE="localhost/sovereign-e2e/pause:1"
# Debian packages the node needs: command -> package.
NODE_PACKAGES=(containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins
               buildah:buildah socat:socat jq:jq nsenter:util-linux ss:iproute2 debootstrap:debootstrap)

# node_key: a short number unique to this checkout (bridge name and pod subnet).
node_key() { printf '%s' "$REPO_ROOT" | cksum | cut -d' ' -f1; }
node_bridge() { echo "sove2e$(( $(node_key) % 100000 ))"; }
NODE_SUBNET_BITS=24
node_subnet() { echo "10.250.$(( $(node_key) % 250 )).0/24"; }
# The bridge's own address: the pods' gateway and the cluster DNS server's only address.
node_gateway() { echo "10.250.$(( $(node_key) % 250 )).1"; }
ctr_node() { ctr_at "$NODE_DIR" "$@"; }
# ctr_at DIR ARGS...: ctr against the containerd of the real node whose state is in DIR.
ctr_at() { local dir=$1; shift; ctr --address "${dir}/containerd/containerd.sock" --namespace k8s.io "$@"; }

# Trainer nodes: E2E_TRAINER_NODES (default 3) more real nodes, each its own kubelet and
# containerd (a kubelet stops the pods its runtime runs that are not its own), with their pods on
# the same bridge and subnet as the system node's (each node its own slice of the addresses), so
# a gang's pods talk to each other on one link: no routes, no forwarding. State in
# .e2e/node-t<i>/, components containerd-t<i> and kubelet-t<i>.
trainer_node_count() { echo "${TRAINER_NODE_COUNT:-${E2E_TRAINER_NODES:-3}}"; }
trainer_node_name() { echo "sovereign-e2e-trainer-$1"; }
trainer_node_dir() { echo "${STATE_DIR}/node-t$1"; }
# Every process of the real nodes (for status and health).
node_components() {
  local i
  echo containerd apiserver-relay coredns kubelet
  for ((i = 1; i <= $(trainer_node_count); i++)); do echo "containerd-t$i" "kubelet-t$i"; done
}

# Installs the Debian packages the node needs (skipped when present). Needs root, as the node does.
node_packages() {
  local want=() e cmd pkg
  for e in "${NODE_PACKAGES[@]}"; do
    cmd=${e%%:*}; pkg=${e#*:}
    if [[ "$cmd" == /* ]]; then [[ -e "$cmd" ]] && continue
    else command -v "$cmd" >/dev/null 2>&1 && continue
    fi
    want+=("$pkg")
  done
  ((${#want[@]})) || return 0
  [[ $EUID -eq 0 ]] || die "the real node needs root and these Debian packages: ${want[*]}"
  log "installing Debian packages for the real node: ${want[*]}"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}"; } \
    > "${LOGS}/apt.log" 2>&1 || { tail -n 20 "${LOGS}/apt.log" >&2; die "apt-get install ${want[*]} failed"; }
}

# buildah with its storage in the tool cache (vfs: no mounts left behind).
buildah_cache() {
  buildah --root "${CACHE_DIR}/buildah/root" --runroot "${CACHE_DIR}/buildah/run" --storage-driver vfs "$@"
}

# oci_image_from_files ARCHIVE NAME USER ENTRYPOINT_JSON [LABEL=V ...] -- SRC:DEST...
# Builds a FROM-scratch image holding the given files into an OCI archive (named NAME), for
# OCI_ARCH (amd64, arm64; default: this machine's).
oci_image_from_files() {
  local archive=$1 name=$2 user=$3 entrypoint=$4 c f
  shift 4
  local labels=()
  while (($#)) && [[ "$1" != -- ]]; do labels+=(--label "$1"); shift; done
  shift
  c=$(buildah_cache from --pull-never scratch)
  for f in "$@"; do buildah_cache copy --chmod 0755 "$c" "${f%%:*}" "${f#*:}" >/dev/null; done
  buildah_cache config --user "$user" --entrypoint "$entrypoint" --cmd '' ${OCI_ARCH:+--os linux --arch "$OCI_ARCH"} \
    "${labels[@]}" "$c"
  mkdir -p "$(dirname "$archive")"
  rm -f "${archive}.tmp"
  # gzip-compressed layers (buildah commit stores them uncompressed by default)
  buildah_cache commit --quiet --rm --format oci --disable-compression=false "$c" "oci-archive:${archive}.tmp:${name}" >/dev/null
  mv -f "${archive}.tmp" "$archive"
}

# oci_image_labels VERSION REVISION: the OCI labels of the operator's image (the Dockerfile sets
# the same), as KEY=value arguments; the source only when known: SOVEREIGN_SOURCE, or the https
# address of the origin remote.
OPERATOR_IMAGE_DESCRIPTION="Allocates sovereign AI compute (GPU and NPU pools, grants, gang-admitted training runs)"
oci_image_labels() {
  local version=$1 revision=$2 source=${SOVEREIGN_SOURCE:-}
  if [[ -z "$source" ]]; then
    source=$(git -C "$REPO_ROOT" remote get-url origin 2>/dev/null || true)
    [[ "$source" == https://* ]] || source=""
  fi
  printf '%s\n' "org.opencontainers.image.title=sovereign-operator" \
    "org.opencontainers.image.description=${OPERATOR_IMAGE_DESCRIPTION}" \
    "org.opencontainers.image.licenses=Apache-2.0" \
    "org.opencontainers.image.version=${version}" \
    "org.opencontainers.image.revision=${revision}"
  [[ -z "$source" ]] || echo "org.opencontainers.image.source=${source%.git}"
}

# oci_archive_labels ARCHIVE: the labels of the (one) image in an OCI archive, as KEY=value lines.
oci_archive_labels() {
  local archive=$1 manifest config
  manifest=$(tar -xOf "$archive" index.json | jq -r '.manifests[0].digest') && [[ "$manifest" == sha256:* ]] || return 1
  config=$(tar -xOf "$archive" "blobs/${manifest/://}" | jq -r '.config.digest') && [[ "$config" == sha256:* ]] || return 1
  tar -xOf "$archive" "blobs/${config/://}" | jq -r '.config.Labels // {} | to_entries[] | "\(.key)=\(.value)"'
}

# oci_labels_check ARCHIVE KEY...: each OCI label KEY is on the archive's image, not empty.
oci_labels_check() {
  local archive=$1 labels key missing=()
  shift
  labels=$(oci_archive_labels "$archive") || { log "cannot read the image config of ${archive}"; return 1; }
  for key in "$@"; do
    grep -q "^${key}=." <<<"$labels" || missing+=("$key")
  done
  ((${#missing[@]} == 0)) || { log "${archive} lacks the labels: ${missing[*]}"; return 1; }
}

# The pause image, built once per pause.c into the cache.
pause_archive() {
  local sum dir
  sum=$(cksum < "${E2E_DIR}/node/pause.c" | cut -d' ' -f1)
  dir="${CACHE_DIR}/images"
  local archive="${dir}/pause-${sum}.oci.tar"
  if [[ ! -f "$archive" ]]; then
    log "building the pause image"
    mkdir -p "$dir"
    cc -static -Os -s -o "${dir}/pause" "${E2E_DIR}/node/pause.c" || die "cannot compile pause.c (gcc and libc6-dev)"
    oci_image_from_files "$archive" "$NODE_IMAGE_PAUSE" 65535:65535 '["/pause"]' -- "${dir}/pause:/pause" \
      || die "cannot build the pause image with buildah"
  fi
  echo "$archive"
}

# node_import ARCHIVE: loads an image archive into the node's containerd.
node_import() {
  ctr_node images import --no-unpack=false "$1" >/dev/null
}

# node_client_cert NAME SUBJECT USER: a client certificate signed by the cluster CA, and its
# kubeconfig ${PKI}/NAME.kubeconfig.
node_client_cert() {
  local name=$1 subject=$2 user=$3
  (
    cd "$PKI"
    umask 077
    openssl ecparam -name prime256v1 -genkey -noout -out "${name}.key" 2>/dev/null
    openssl req -new -key "${name}.key" -subj "$subject" -out "${name}.csr" 2>/dev/null
    openssl x509 -req -in "${name}.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 \
      -extfile <(printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n') \
      -out "${name}.crt" 2>/dev/null
    rm -f "${name}.csr" ca.srl
  ) || die "${name} certificate generation failed"
  # (in a subshell: write_kubeconfig leaves umask 077 behind)
  (write_kubeconfig "${PKI}/${name}.kubeconfig" "$name" "$user")
}

# The bridge with its gateway address, before CoreDNS binds that address and before the CNI
# bridge plugin, which adopts an existing bridge and finds its gateway address already there.
node_bridge_up() {
  local br; br=$(node_bridge)
  ip link show "$br" >/dev/null 2>&1 || ip link add name "$br" type bridge || die "cannot create bridge ${br}"
  ip -4 addr show dev "$br" | grep -qF " $(node_gateway)/" \
    || ip addr add "$(node_gateway)/${NODE_SUBNET_BITS}" dev "$br" || die "cannot address bridge ${br}"
  ip link set "$br" up
}

node_coredns_config() {
  mkdir -p "${NODE_DIR}/coredns"
  cat > "${NODE_DIR}/coredns/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $(node_gateway)
    errors
    health 127.0.0.1:${COREDNS_HEALTH_PORT}
    ready 127.0.0.1:${COREDNS_READY_PORT}
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig ${PKI}/coredns.kubeconfig sovereign-e2e
        ttl 1
    }
}
EOF
}

coredns_ready() { curl -fsS "http://127.0.0.1:${COREDNS_READY_PORT}/ready"; }

# node_cni_config DIR INDEX: node INDEX (0: the system node) hands out addresses
# .(2+60*INDEX) to .(61+60*INDEX) of the shared subnet.
node_cni_config() {
  local dir=$1 idx=$2 cni="${1}/cni" p base
  base=$(node_subnet); base=${base%.0/*}
  mkdir -p "${cni}/bin" "${cni}/net.d" "${cni}/ipam" "${cni}/relay"
  for p in bridge host-local loopback; do ln -sf "/usr/lib/cni/$p" "${cni}/bin/$p"; done
  ln -sf "${E2E_DIR}/node/apiserver-relay" "${cni}/bin/sovereign-apiserver-relay"
  # isGateway gives the bridge the .1 address (the kubelet's probes reach pods through it);
  # no default route and no masquerading: a pod reaches its subnet and nothing else.
  cat > "${cni}/net.d/10-sovereign-e2e.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "sovereign-e2e",
  "plugins": [
    {"type": "bridge", "bridge": "$(node_bridge)", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "dataDir": "${cni}/ipam", "routes": [],
              "ranges": [[{"subnet": "$(node_subnet)", "gateway": "$(node_gateway)",
                           "rangeStart": "${base}.$((2 + 60 * idx))", "rangeEnd": "${base}.$((61 + 60 * idx))"}]]}},
    {"type": "sovereign-apiserver-relay", "vip": "${SERVICE_FIRST_IP}", "port": 443,
     "socket": "${NODE_DIR}/apiserver.sock", "stateDir": "${cni}/relay"}
  ]
}
EOF
}

node_containerd_config() {
  local dir=$1 d="${1}/containerd"
  mkdir -p "$d"
  cat > "${d}/config.toml" <<EOF
version = 2
root = "${d}/root"
state = "${d}/state"
[grpc]
  address = "${d}/containerd.sock"
[ttrpc]
  address = "${d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "${d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${NODE_IMAGE_PAUSE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "${dir}/cni/bin"
    conf_dir = "${dir}/cni/net.d"
    max_conf_num = 1
EOF
}

# node_kubelet_config DIR PORT HEALTHZ_PORT TAINT
node_kubelet_config() {
  local dir=$1 port=$2 healthz=$3 taint=$4 k="${1}/kubelet"
  mkdir -p "$k/root" "${dir}/pod-logs" "$k/volume-plugins"
  cat > "${k}/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# these machines have cgroup v1 and no systemd-managed cgroups
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
address: 127.0.0.1
port: ${port}
healthzBindAddress: 127.0.0.1
healthzPort: ${healthz}
readOnlyPort: 0
containerRuntimeEndpoint: unix://${dir}/containerd/containerd.sock
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: ${PKI}/ca.crt}
authorization: {mode: AlwaysAllow}
# cluster DNS (CoreDNS on the bridge's gateway address) and no host resolver in pods: only
# cluster names resolve, nothing is sent anywhere else
clusterDNS: [$(node_gateway)]
clusterDomain: cluster.local
resolvConf: ""
podLogsDir: ${dir}/pod-logs
volumePluginDir: ${k}/volume-plugins
registerWithTaints:
  - ${taint}
maxPods: 20
# absolute floors: on a big shared disk 1% is gigabytes that other work may be using
evictionHard: {memory.available: "100Mi", nodefs.available: "512Mi", imagefs.available: "512Mi"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
}

# node_ready [NAME]
node_ready() {
  [[ "$(kc get node "${1:-$NODE_NAME}" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

# node_instance SUFFIX DIR NAME INDEX PORT HEALTHZ_PORT TAINT LABELS: the configuration, containerd
# (with the pause image) and kubelet of one real node; components containerd SUFFIX, kubelet SUFFIX.
node_instance() {
  local sfx=$1 dir=$2 name=$3 idx=$4 port=$5 healthz=$6 taint=$7 node_labels=$8
  mkdir -p "$dir"
  node_client_cert "kubelet${sfx}" "/O=system:nodes/CN=system:node:${name}" "system:node:${name}"
  node_cni_config "$dir" "$idx"
  node_containerd_config "$dir"
  node_kubelet_config "$dir" "$port" "$healthz" "$taint"
  start "containerd${sfx}" "$(command -v containerd)" --config "${dir}/containerd/config.toml" --log-level warn
  wait_until "containerd${sfx}" 30 "containerd's socket" ctr_at "$dir" version
  ctr_at "$dir" images import --no-unpack=false "$(pause_archive)" >/dev/null \
    || fail "containerd${sfx}" "cannot import the pause image"
  start "kubelet${sfx}" "$KUBELET" --config="${dir}/kubelet/config.yaml" \
    --kubeconfig="${PKI}/kubelet${sfx}.kubeconfig" --root-dir="${dir}/kubelet/root" \
    --cert-dir="${dir}/kubelet/pki" --hostname-override="$name" --node-labels="$node_labels" --v=1
}

# node_up: called by cmd_up_kwok once the control plane answers (cluster.env has the ports).
node_up() {
  local t0=$SECONDS i
  node_packages
  command -v cc >/dev/null 2>&1 || die "a C compiler is needed for the pause image (apt-get install gcc libc6-dev)"
  [[ -x "$KUBELET" ]] || die "no kubelet at ${KUBELET} (run e2e/cluster tools)"
  [[ -x "$COREDNS" ]] || die "no coredns at ${COREDNS} (run e2e/cluster tools)"
  local trainers; trainers=$(trainer_node_count)
  pick_port KUBELET_PORT; pick_port KUBELET_HEALTHZ_PORT; pick_port COREDNS_HEALTH_PORT; pick_port COREDNS_READY_PORT
  printf 'REAL_NODE=1\nNODE_NAME=%s\nKUBELET_PORT=%s\nKUBELET_HEALTHZ_PORT=%s\nCLUSTER_DNS=%s\nCOREDNS_HEALTH_PORT=%s\nCOREDNS_READY_PORT=%s\nTRAINER_NODE_COUNT=%s\n' \
    "$NODE_NAME" "$KUBELET_PORT" "$KUBELET_HEALTHZ_PORT" "$(node_gateway)" "$COREDNS_HEALTH_PORT" "$COREDNS_READY_PORT" \
    "$trainers" >> "${STATE_DIR}/cluster.env"
  mkdir -p "$NODE_DIR"
  pause_archive >/dev/null
  # built (once per recipe, into the cache) before any node runs
  local trainer; trainer=$(trainer_archive)
  # CoreDNS's client certificate
  node_client_cert coredns "/O=system:masters/CN=coredns" coredns
  node_coredns_config

  # write_kubeconfig leaves umask 077 behind; containerd and the kubelet would create image
  # root dirs and volumes that the containers' non-root users cannot enter.
  umask 022
  node_bridge_up
  rm -f "${NODE_DIR}/apiserver.sock"
  start apiserver-relay "$(command -v socat)" \
    "UNIX-LISTEN:${NODE_DIR}/apiserver.sock,fork,mode=600" "TCP:127.0.0.1:${APISERVER_PORT}"
  start coredns "$COREDNS" -conf "${NODE_DIR}/coredns/Corefile"
  wait_until coredns 60 "CoreDNS ready on $(node_gateway):53" coredns_ready

  node_instance "" "$NODE_DIR" "$NODE_NAME" 0 "$KUBELET_PORT" "$KUBELET_HEALTHZ_PORT" \
    '{key: CriticalAddonsOnly, value: "true", effect: NoSchedule}' sovereign.ai/node-role=system,type=system
  local port healthz
  for ((i = 1; i <= trainers; i++)); do
    pick_port port; pick_port healthz
    node_instance "-t$i" "$(trainer_node_dir "$i")" "$(trainer_node_name "$i")" "$i" "$port" "$healthz" \
      "{key: ${TRAINER_LABEL}, value: \"true\", effect: NoSchedule}" "type=trainer,${TRAINER_LABEL}=true"
  done
  wait_until kubelet 120 "node ${NODE_NAME} Ready" node_ready
  for ((i = 1; i <= trainers; i++)); do
    wait_until "kubelet-t$i" 120 "node $(trainer_node_name "$i") Ready" node_ready "$(trainer_node_name "$i")"
  done
  node_trainer_pool "$trainer"
  log "real nodes Ready in $((SECONDS - t0))s: ${NODE_NAME} (system) and ${trainers} trainer nodes (pods on $(node_subnet))"
}

# The trainer nodes as an accelerator pool of their own for real training runs: each advertises
# TRAINER_SLOTS of the extended resource TRAINER_RESOURCE (as a device plugin would: a patch of
# status.capacity; the kubelet copies it to allocatable) and carries TRAINER_LABEL (and its
# NoSchedule taint), which only a pool made for them selects (no vendor label: no other pool
# does). The trainer image is imported into each one's containerd and named in cluster.env
# (TRAINER_IMAGE).
TRAINER_RESOURCE="e2e.sovereign.ai/trainer"
TRAINER_LABEL="e2e.sovereign.ai/trainer-node"
TRAINER_SLOTS=2
node_trainer_pool() {
  local archive=$1 t0=$SECONDS i name pids=() rc=0
  printf 'TRAINER_IMAGE=%s\nTRAINER_RESOURCE=%s\nTRAINER_LABEL=%s\nTRAINER_SLOTS=%s\n' \
    "$(trainer_image)" "$TRAINER_RESOURCE" "$TRAINER_LABEL" "$TRAINER_SLOTS" >> "${STATE_DIR}/cluster.env"
  for ((i = 1; i <= $(trainer_node_count); i++)); do
    ctr_at "$(trainer_node_dir "$i")" images import --no-unpack=false "$archive" >/dev/null &
    pids+=($!)
  done
  for i in "${pids[@]}"; do wait "$i" || rc=1; done
  ((rc == 0)) || fail kubelet-t1 "cannot import the trainer image"
  for ((i = 1; i <= $(trainer_node_count); i++)); do
    name=$(trainer_node_name "$i")
    kc patch node "$name" --subresource=status --type=json \
      -p "[{\"op\": \"add\", \"path\": \"/status/capacity/${TRAINER_RESOURCE/\//~1}\", \"value\": \"${TRAINER_SLOTS}\"}]" \
      >/dev/null || fail "kubelet-t$i" "cannot advertise ${TRAINER_RESOURCE} on ${name}"
    wait_until "kubelet-t$i" 60 "${TRAINER_RESOURCE} allocatable on ${name}" node_trainer_allocatable "$name"
  done
  log "trainer image $(trainer_image) on the trainer nodes, ${TRAINER_SLOTS} ${TRAINER_RESOURCE} each, in $((SECONDS - t0))s"
}
node_trainer_allocatable() {
  [[ "$(kc get node "$1" -o "jsonpath={.status.allocatable.${TRAINER_RESOURCE//./\\.}}")" == "$TRAINER_SLOTS" ]]
}

# Unmounts everything mounted below DIR, deepest first.
umount_below() {
  local dir=$1 m
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "cannot unmount $m"
  done
}

# node_down_one DIR NAME SUFFIX: stops one real node's pods, kubelet, containerd and its shims;
# unmounts what they mounted and removes the pods' network namespaces.
node_down_one() {
  local dir=$1 name=$2 sfx=$3
  [[ -d "$dir" ]] || return 0
  local sock="${dir}/containerd/containerd.sock" id
  # Let the kubelet tear the pods down properly (CNI DEL) while the API server still answers.
  if pid_of "kubelet${sfx}" >/dev/null && pid_of kube-apiserver >/dev/null; then
    kc cordon "$name" >/dev/null 2>&1 || true
    kc delete pods -A --field-selector "spec.nodeName=${name}" --grace-period=1 --wait=false >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)) && [[ -n "$(ctr_at "$dir" tasks ls -q 2>/dev/null)" ]]; do sleep 0.5; done
  fi
  stop "kubelet${sfx}"
  if pid_of "containerd${sfx}" >/dev/null; then
    for id in $(ctr_at "$dir" tasks ls -q 2>/dev/null); do ctr_at "$dir" tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_at "$dir" tasks ls -q 2>/dev/null); do ctr_at "$dir" tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_at "$dir" containers ls -q 2>/dev/null); do ctr_at "$dir" containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop "containerd${sfx}"
  # shims that this containerd started (they name its socket on their command line)
  local p
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -qF -- "-address ${sock} "; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  # relays of pods that were not torn down, and their network namespaces
  local f pid ns
  for f in "${dir}"/cni/relay/*.pid; do
    [[ -f "$f" ]] || continue
    pid=$(cat "$f")
    if [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == socat ]]; then kill -TERM -- "-${pid}" 2>/dev/null || true; fi
  done
  for f in "${dir}"/cni/relay/*.netns; do
    [[ -f "$f" ]] || continue
    ns=$(cat "$f")
    if [[ -e "$ns" ]]; then umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null || true; rm -f "$ns"; fi
  done
  umount_below "$dir"
}

# node_down: every real node (trainer nodes first), then the relay, CoreDNS and the bridge.
# Safe to call when half started.
node_down() {
  local d i
  for d in "${STATE_DIR}"/node-t*; do
    [[ -d "$d" ]] || continue
    i=${d##*/node-t}
    node_down_one "$d" "$(trainer_node_name "$i")" "-t$i"
  done
  node_down_one "$NODE_DIR" "$NODE_NAME" ""
  stop apiserver-relay coredns
  local br; br=$(node_bridge)
  if ip link show "$br" >/dev/null 2>&1; then
    ip link delete "$br" && log "deleted bridge ${br}"
  fi
}

# node_healthy: the node's processes run (when this cluster has one).
node_healthy() {
  [[ "${REAL_NODE:-0}" == 1 ]] || return 0
  local c
  for c in $(node_components); do pid_of "$c" >/dev/null || return 1; done
}
