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
NODE_COMPONENTS=(containerd apiserver-relay coredns kubelet)
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
ctr_node() { ctr --address "${NODE_DIR}/containerd/containerd.sock" --namespace k8s.io "$@"; }

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
# Builds a FROM-scratch image holding the given files into an OCI archive (named NAME).
oci_image_from_files() {
  local archive=$1 name=$2 user=$3 entrypoint=$4 c f
  shift 4
  local labels=()
  while (($#)) && [[ "$1" != -- ]]; do labels+=(--label "$1"); shift; done
  shift
  c=$(buildah_cache from --pull-never scratch)
  for f in "$@"; do buildah_cache copy --chmod 0755 "$c" "${f%%:*}" "${f#*:}" >/dev/null; done
  buildah_cache config --user "$user" --entrypoint "$entrypoint" --cmd '' "${labels[@]}" "$c"
  mkdir -p "$(dirname "$archive")"
  rm -f "${archive}.tmp"
  # gzip-compressed layers (buildah commit stores them uncompressed by default)
  buildah_cache commit --quiet --rm --format oci --disable-compression=false "$c" "oci-archive:${archive}.tmp:${name}" >/dev/null
  mv -f "${archive}.tmp" "$archive"
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
  write_kubeconfig "${PKI}/${name}.kubeconfig" "$name" "$user"
}

node_certs() {
  node_client_cert kubelet "/O=system:nodes/CN=system:node:${NODE_NAME}" "system:node:${NODE_NAME}"
  # CoreDNS reads Services, EndpointSlices and Namespaces cluster-wide (as kwok, a test-cluster
  # component in system:masters).
  node_client_cert coredns "/O=system:masters/CN=coredns" coredns
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

node_cni_config() {
  local cni="${NODE_DIR}/cni" p
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
     "ipam": {"type": "host-local", "dataDir": "${cni}/ipam", "ranges": [[{"subnet": "$(node_subnet)"}]], "routes": []}},
    {"type": "sovereign-apiserver-relay", "vip": "${SERVICE_FIRST_IP}", "port": 443,
     "socket": "${NODE_DIR}/apiserver.sock", "stateDir": "${cni}/relay"}
  ]
}
EOF
}

node_containerd_config() {
  local d="${NODE_DIR}/containerd"
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
    bin_dir = "${NODE_DIR}/cni/bin"
    conf_dir = "${NODE_DIR}/cni/net.d"
    max_conf_num = 1
EOF
}

node_kubelet_config() {
  local k="${NODE_DIR}/kubelet"
  mkdir -p "$k/root" "${NODE_DIR}/pod-logs" "$k/volume-plugins"
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
port: ${KUBELET_PORT}
healthzBindAddress: 127.0.0.1
healthzPort: ${KUBELET_HEALTHZ_PORT}
readOnlyPort: 0
containerRuntimeEndpoint: unix://${NODE_DIR}/containerd/containerd.sock
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
podLogsDir: ${NODE_DIR}/pod-logs
volumePluginDir: ${k}/volume-plugins
registerWithTaints:
  - {key: CriticalAddonsOnly, value: "true", effect: NoSchedule}
maxPods: 20
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
EOF
}

node_ready() {
  [[ "$(kc get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]
}

# node_up: called by cmd_up_kwok once the control plane answers (cluster.env has the ports).
node_up() {
  local t0=$SECONDS
  node_packages
  command -v cc >/dev/null 2>&1 || die "a C compiler is needed for the pause image (apt-get install gcc libc6-dev)"
  [[ -x "$KUBELET" ]] || die "no kubelet at ${KUBELET} (run e2e/cluster tools)"
  [[ -x "$COREDNS" ]] || die "no coredns at ${COREDNS} (run e2e/cluster tools)"
  pick_port KUBELET_PORT; pick_port KUBELET_HEALTHZ_PORT; pick_port COREDNS_HEALTH_PORT; pick_port COREDNS_READY_PORT
  printf 'REAL_NODE=1\nNODE_NAME=%s\nKUBELET_PORT=%s\nKUBELET_HEALTHZ_PORT=%s\nCLUSTER_DNS=%s\nCOREDNS_HEALTH_PORT=%s\nCOREDNS_READY_PORT=%s\n' \
    "$NODE_NAME" "$KUBELET_PORT" "$KUBELET_HEALTHZ_PORT" "$(node_gateway)" "$COREDNS_HEALTH_PORT" "$COREDNS_READY_PORT" \
    >> "${STATE_DIR}/cluster.env"
  mkdir -p "$NODE_DIR"
  local pause; pause=$(pause_archive)
  node_certs
  node_cni_config
  node_containerd_config
  node_kubelet_config
  node_coredns_config

  # write_kubeconfig leaves umask 077 behind; containerd and the kubelet would create image
  # root dirs and volumes that the containers' non-root users cannot enter.
  umask 022
  start containerd "$(command -v containerd)" --config "${NODE_DIR}/containerd/config.toml" --log-level warn
  wait_until containerd 30 "containerd's socket" ctr_node version
  node_import "$pause" || fail containerd "cannot import the pause image"

  rm -f "${NODE_DIR}/apiserver.sock"
  start apiserver-relay "$(command -v socat)" \
    "UNIX-LISTEN:${NODE_DIR}/apiserver.sock,fork,mode=600" "TCP:127.0.0.1:${APISERVER_PORT}"

  node_bridge_up
  start coredns "$COREDNS" -conf "${NODE_DIR}/coredns/Corefile"
  wait_until coredns 60 "CoreDNS ready on $(node_gateway):53" coredns_ready

  start kubelet "$KUBELET" --config="${NODE_DIR}/kubelet/config.yaml" \
    --kubeconfig="${PKI}/kubelet.kubeconfig" --root-dir="${NODE_DIR}/kubelet/root" \
    --cert-dir="${NODE_DIR}/kubelet/pki" --hostname-override="$NODE_NAME" \
    --node-labels=sovereign.ai/node-role=system,type=system --v=1
  wait_until kubelet 120 "node ${NODE_NAME} Ready" node_ready
  node_trainer_pool
  log "real node ${NODE_NAME} Ready in $((SECONDS - t0))s (containerd, kubelet; pods on $(node_subnet))"
}

# The real node as an accelerator pool of its own for real training runs: it advertises
# TRAINER_SLOTS of the extended resource TRAINER_RESOURCE (as a device plugin would: a patch of
# status.capacity; the kubelet copies it to allocatable) and carries TRAINER_LABEL, which only the
# tests' real-node pool selects (no vendor label: no other pool does). The trainer image is
# imported into its containerd and named in cluster.env (TRAINER_IMAGE).
TRAINER_RESOURCE="e2e.sovereign.ai/trainer"
TRAINER_LABEL="e2e.sovereign.ai/trainer-node"
TRAINER_SLOTS=4
node_trainer_pool() {
  local archive t0=$SECONDS
  archive=$(trainer_archive)
  node_import "$archive" || fail containerd "cannot import the trainer image"
  printf 'TRAINER_IMAGE=%s\nTRAINER_RESOURCE=%s\nTRAINER_LABEL=%s\nTRAINER_SLOTS=%s\n' \
    "$(trainer_image)" "$TRAINER_RESOURCE" "$TRAINER_LABEL" "$TRAINER_SLOTS" >> "${STATE_DIR}/cluster.env"
  kc label node "$NODE_NAME" "${TRAINER_LABEL}=true" >/dev/null || fail kubelet "cannot label ${NODE_NAME}"
  kc patch node "$NODE_NAME" --subresource=status --type=json \
    -p "[{\"op\": \"add\", \"path\": \"/status/capacity/${TRAINER_RESOURCE/\//~1}\", \"value\": \"${TRAINER_SLOTS}\"}]" \
    >/dev/null || fail kubelet "cannot advertise ${TRAINER_RESOURCE} on ${NODE_NAME}"
  wait_until kubelet 60 "${TRAINER_RESOURCE} allocatable on ${NODE_NAME}" node_trainer_allocatable
  log "trainer image $(trainer_image) and ${TRAINER_SLOTS} ${TRAINER_RESOURCE} on ${NODE_NAME} in $((SECONDS - t0))s"
}
node_trainer_allocatable() {
  [[ "$(kc get node "$NODE_NAME" -o "jsonpath={.status.allocatable.${TRAINER_RESOURCE//./\\.}}")" == "$TRAINER_SLOTS" ]]
}

# Unmounts everything mounted below DIR, deepest first.
umount_below() {
  local dir=$1 m
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/self/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "cannot unmount $m"
  done
}

# node_down: stops the node's pods, the kubelet, containerd and its shims; unmounts what they
# mounted, removes the pods' network namespaces and the bridge. Safe to call when half started.
node_down() {
  [[ -d "$NODE_DIR" ]] || return 0
  local sock="${NODE_DIR}/containerd/containerd.sock" id
  # Let the kubelet tear the pods down properly (CNI DEL) while the API server still answers.
  if pid_of kubelet >/dev/null && pid_of kube-apiserver >/dev/null; then
    kc cordon "$NODE_NAME" >/dev/null 2>&1 || true
    kc delete pods -A --field-selector "spec.nodeName=${NODE_NAME}" --grace-period=1 --wait=false >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 30))
    while ((SECONDS < deadline)) && [[ -n "$(ctr_node tasks ls -q 2>/dev/null)" ]]; do sleep 0.5; done
  fi
  stop kubelet
  if pid_of containerd >/dev/null; then
    for id in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_node tasks ls -q 2>/dev/null); do ctr_node tasks delete -f "$id" >/dev/null 2>&1 || true; done
    for id in $(ctr_node containers ls -q 2>/dev/null); do ctr_node containers delete "$id" >/dev/null 2>&1 || true; done
  fi
  stop containerd apiserver-relay coredns
  # shims that our containerd started (they name its socket on their command line)
  local p
  for p in /proc/[0-9]*; do
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -qF -- "-address ${sock} "; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  # relays of pods that were not torn down, and their network namespaces
  local f pid ns
  for f in "${NODE_DIR}"/cni/relay/*.pid; do
    [[ -f "$f" ]] || continue
    pid=$(cat "$f")
    [[ "$(cat "/proc/${pid}/comm" 2>/dev/null)" == socat ]] && kill -TERM -- "-${pid}" 2>/dev/null || true
  done
  for f in "${NODE_DIR}"/cni/relay/*.netns; do
    [[ -f "$f" ]] || continue
    ns=$(cat "$f")
    if [[ -e "$ns" ]]; then umount "$ns" 2>/dev/null || umount -l "$ns" 2>/dev/null || true; rm -f "$ns"; fi
  done
  umount_below "$NODE_DIR"
  local br; br=$(node_bridge)
  if ip link show "$br" >/dev/null 2>&1; then
    ip link delete "$br" && log "deleted bridge ${br}"
  fi
}

# node_healthy: the node's processes run (when this cluster has one).
node_healthy() {
  [[ "${REAL_NODE:-0}" == 1 ]] || return 0
  local c
  for c in "${NODE_COMPONENTS[@]}"; do pid_of "$c" >/dev/null || return 1; done
}
