# shellcheck shell=bash
# Runs etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok as local processes
# on 127.0.0.1. Sourced by e2e/cluster after common.sh, tools.sh and nodes.sh.
#
# State (git-ignored) in $STATE_DIR (.e2e/ at the repo root):
#   pids/<component>   "PID BINARY" of every process started     logs/<component>.log
#   pki/               CA, serving and client certs, kubeconfigs  etcd/  data dir
#   cluster.env        profile and ports                          kubeconfig  admin kubeconfig
#                                                                 (written last: the cluster is up)

PKI="${STATE_DIR}/pki"
PIDS="${STATE_DIR}/pids"
LOGS="${STATE_DIR}/logs"
KUBECONFIG_OUT="${STATE_DIR}/kubeconfig"
# Start order (stop_all stops the clients first, then the apiserver, then etcd).
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
SERVICE_CIDR="10.96.0.0/12"     # fake; nothing is ever sent there
SERVICE_FIRST_IP="10.96.0.1"
POD_CIDR="10.128.0.0/12"         # fake pod IPs handed out by kwok
# kwok renews each node's lease every quarter of this. 40 s (kubelet's default) for dev; national
# uses 120 s (a renewal every 30 s, inside kube-controller-manager's 50 s node-monitor grace
# period): 2,752 nodes renewing every 10 s keep a whole core busy on a 2-core machine.
node_lease_seconds() {
  if [[ -n "${E2E_NODE_LEASE_SECONDS:-}" ]]; then echo "$E2E_NODE_LEASE_SECONDS"
  elif [[ "$1" == national ]]; then echo 120
  else echo 40
  fi
}

# ---------------------------------------------------------------- processes

# pid_of COMPONENT: prints the recorded PID if that process is alive and still runs our binary.
pid_of() {
  local f="${PIDS}/$1" pid bin exe
  [[ -f "$f" ]] || return 1
  read -r pid bin < "$f" || return 1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/${pid}/exe" 2>/dev/null) || return 1
  [[ "$exe" == "$bin" || "$exe" == "$bin (deleted)" ]] || return 1
  echo "$pid"
}

log_tail() {
  local c=$1
  if [[ -f "${LOGS}/${c}.log" ]]; then
    log "last lines of ${LOGS}/${c}.log:"
    tail -n "${2:-40}" "${LOGS}/${c}.log" >&2
  fi
}

# start COMPONENT BINARY ARGS...: runs in its own session, detached from the caller's terminal.
start() {
  local c=$1 bin=$2
  shift 2
  mkdir -p "$PIDS" "$LOGS"
  # 8>&- 9>&-: not inheriting the state and tools locks (a running etcd would hold them forever)
  setsid "$bin" "$@" > "${LOGS}/${c}.log" 2>&1 < /dev/null 8>&- 9>&- &
  local pid=$! i
  echo "$pid $bin" > "${PIDS}/${c}"
  # setsid execs the binary in the same process; wait for that so pid_of recognises it
  for ((i = 0; i < 100; i++)); do
    [[ "$(readlink "/proc/${pid}/exe" 2>/dev/null)" == "$bin" ]] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.02
  done
  log "started ${c} (pid ${pid})"
}

# stop COMPONENT...: TERM them all, wait up to 15 s, then KILL. Only recorded PIDs that are ours.
stop() {
  local c pid i live
  local -a pids=() names=()
  for c in "$@"; do
    if pid=$(pid_of "$c"); then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid"); names+=("$c")
    fi
  done
  for ((i = 0; i < 150; i++)); do
    live=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && live=1; done
    ((live)) || break
    sleep 0.1
  done
  for i in "${!pids[@]}"; do
    pid=${pids[i]}
    if kill -0 "$pid" 2>/dev/null; then
      log "${names[i]} (pid ${pid}) ignored TERM; killing"
      kill -KILL "$pid" 2>/dev/null || true
      local j
      for ((j = 0; j < 50; j++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    log "stopped ${names[i]} (pid ${pid})"
  done
  for c in "$@"; do rm -f "${PIDS}/${c}"; done
}

# The real node first (its kubelet tears pods down through the apiserver), then the clients,
# then the apiserver, then etcd.
stop_all() {
  node_down
  stop jobset kwok kube-scheduler kube-controller-manager
  stop kube-apiserver
  stop etcd
}

# fail COMPONENT MESSAGE: show its log, stop everything we started, keep logs for inspection.
fail() {
  local c=$1
  shift
  log "ERROR: $*"
  log_tail "$c"
  trap - EXIT
  stop_all
  log "stopped all components; logs kept in ${LOGS} (\`e2e/cluster down\` removes them)"
  exit 1
}

# wait_until COMPONENT SECONDS WHAT CMD...: polls CMD until it succeeds; fails if COMPONENT dies.
wait_until() {
  local c=$1 secs=$2 what=$3
  shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    pid_of "$c" >/dev/null || fail "$c" "${c} exited while waiting for ${what}"
    ((SECONDS < deadline)) || fail "$c" "timed out after ${secs}s waiting for ${what}"
    sleep 0.3
  done
}

# ---------------------------------------------------------------- ports and addresses

port_in_use() {
  if command -v ss >/dev/null 2>&1; then
    [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]]
  else
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}

# pick_port VAR: sets VAR to a port in 20000-31999 that nothing listens on and that we have not
# handed out yet (no command substitution: PICKED_PORTS must survive between calls).
PICKED_PORTS=" "
pick_port() {
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12000))
    [[ "$PICKED_PORTS" == *" $p "* ]] && continue
    port_in_use "$p" && continue
    PICKED_PORTS+="$p "
    printf -v "$1" '%s' "$p"
    return 0
  done
  die "no free port found"
}

# A non-loopback IPv4 address of this machine, for --advertise-address only (the apiserver
# refuses a loopback one; it is written into the `kubernetes` Endpoints, nothing is sent there).
advertise_address() {
  local a
  a=$(ip -4 -o addr show scope global 2>/dev/null | awk '{split($4, x, "/"); print x[1]; exit}')
  [[ -n "$a" ]] || a=$(hostname -I 2>/dev/null | tr ' ' '\n' | grep -E '^[0-9]+\.' | grep -v '^127\.' | head -n1)
  if [[ -z "$a" ]]; then
    a="192.0.2.1"   # RFC 5737 documentation address: advertised only, never contacted
    log "no non-loopback IPv4 address found; advertising ${a} (never contacted)"
  fi
  echo "$a"
}

# ---------------------------------------------------------------- certificates and kubeconfigs

# issue_cert NAME SUBJECT EXTENDED_KEY_USAGE [SAN]: NAME.key and NAME.crt in the current
# directory (the PKI folder), signed by its ca.crt/ca.key.
issue_cert() {
  local ext="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=$3"
  [[ -n "${4:-}" ]] && ext+=$'\n'"subjectAltName=$4"
  openssl ecparam -name prime256v1 -genkey -noout -out "$1.key" 2>/dev/null
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -sha256 -extfile <(echo "$ext") -out "$1.crt" 2>/dev/null
  rm -f "$1.csr"
}

gen_certs() {
  mkdir -p "$PKI"
  (
    cd "$PKI"
    umask 077
    local days=3650
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
    openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=sovereign-e2e-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -out ca.crt 2>/dev/null
    issue_cert apiserver "/CN=kube-apiserver" serverAuth \
      "DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:${SERVICE_FIRST_IP}"
    issue_cert admin "/O=system:masters/CN=kubernetes-admin" clientAuth
    issue_cert controller-manager "/CN=system:kube-controller-manager" clientAuth
    issue_cert scheduler "/CN=system:kube-scheduler" clientAuth
    issue_cert kwok "/O=system:masters/CN=kwok-controller" clientAuth
    # service-account token signing key pair
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ca.srl
  ) || die "certificate generation with openssl failed"
}

b64() { base64 -w0 < "$1"; }

# write_kubeconfig FILE CERT_NAME USER
write_kubeconfig() {
  local f=$1 name=$2 user=$3
  umask 077
  cat > "$f" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sovereign-e2e
  cluster:
    server: https://127.0.0.1:${APISERVER_PORT}
    certificate-authority-data: $(b64 "${PKI}/ca.crt")
users:
- name: ${user}
  user:
    client-certificate-data: $(b64 "${PKI}/${name}.crt")
    client-key-data: $(b64 "${PKI}/${name}.key")
contexts:
- name: sovereign-e2e
  context:
    cluster: sovereign-e2e
    user: ${user}
    namespace: default
current-context: sovereign-e2e
EOF
}

# ---------------------------------------------------------------- health

kc() { "$KUBECTL" --kubeconfig "${PKI}/admin.kubeconfig" "$@"; }

load_env() {
  [[ -f "${STATE_DIR}/cluster.env" ]] || return 1
  # shellcheck source=/dev/null
  source "${STATE_DIR}/cluster.env"
}

# The cluster in .e2e/ is complete and every component answers.
healthy() {
  [[ -f "$KUBECONFIG_OUT" && -f "${STATE_DIR}/cluster.env" ]] || return 1
  [[ "$(cat "${STATE_DIR}/mode" 2>/dev/null)" == kwok ]] || return 1
  local c
  for c in "${COMPONENTS[@]}"; do pid_of "$c" >/dev/null || return 1; done
  (load_env && node_healthy && workloads_healthy) || return 1
  [[ "$("$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" get --raw /readyz 2>/dev/null)" == ok ]]
}

# Simulated nodes that are Ready and carry no node.kubernetes.io/* taint (not-ready, unreachable):
# the ones the scheduler can use.
ready_nodes() {
  kc get nodes -l type=kwok --no-headers \
    -o 'custom-columns=R:.status.conditions[?(@.type=="Ready")].status,T:.spec.taints[*].key' 2>/dev/null \
    | awk '$1 == "True" && $2 !~ /node\.kubernetes\.io\//' | wc -l
}

wait_nodes_ready() {
  local want=$1 secs=$2 n=0
  local deadline=$((SECONDS + secs))
  while :; do
    n=$(ready_nodes || true)
    ((n >= want)) && break
    pid_of kwok >/dev/null || fail kwok "kwok exited while waiting for nodes to become Ready"
    ((SECONDS < deadline)) || fail kwok "only ${n}/${want} nodes Ready after ${secs}s"
    sleep 1
  done
  log "${n}/${want} simulated nodes Ready"
}

# ---------------------------------------------------------------- nodes

create_nodes() {
  local profile=$1 dir="${STATE_DIR}/nodes" n t0=$SECONDS
  n=$(profile_node_count "$profile")
  generate_nodes "$profile" "$dir" 250
  log "creating ${n} simulated nodes (profile ${profile})"
  # Chunks of 250 nodes, two kubectl processes at a time (2 cores). Server-side apply keeps
  # status.capacity/allocatable on create (apiserver ignores them on update: patch /status).
  local f pids=() rc=0
  for f in "$dir"/nodes-*.yaml; do
    kc apply --server-side --force-conflicts --field-manager=e2e-cluster -f "$f" \
      > "${LOGS}/$(basename "$f" .yaml)-apply.log" 2>&1 &
    pids+=($!)
    if ((${#pids[@]} >= 2)); then wait "${pids[0]}" || rc=1; pids=("${pids[@]:1}"); fi
  done
  for f in "${pids[@]}"; do wait "$f" || rc=1; done
  ((rc == 0)) || fail kube-apiserver "creating nodes failed (see ${LOGS}/nodes-*-apply.log)"
  log "created ${n} nodes in $((SECONDS - t0))s"
}

# ---------------------------------------------------------------- up / down / status

cmd_up_kwok() {
  local profile=$1 t0=$SECONDS
  if healthy; then
    load_env
    if [[ "${E2E_PROFILE:-}" != "$profile" ]]; then
      die "a '${E2E_PROFILE:-?}' cluster is already running from ${STATE_DIR}; run \`e2e/cluster down\` before starting profile '${profile}'"
    fi
    log "cluster (profile ${profile}) already running and healthy; reusing it"
    echo "KUBECONFIG=${KUBECONFIG_OUT}"
    return 0
  fi
  if [[ -d "$STATE_DIR" ]]; then
    log "removing stale state in ${STATE_DIR}"
    cmd_down >/dev/null
  fi
  mkdir -p "$STATE_DIR" "$PIDS" "$LOGS"
  echo kwok > "${STATE_DIR}/mode"
  # Whatever ends `up` early (error, Ctrl-C, TERM) stops what was already started.
  # (the EXIT trap is removed once the cluster is up)
  trap 'log "interrupted"; exit 130' INT TERM
  trap 'log "up did not finish; stopping what was started"; stop_all' EXIT

  pick_port ETCD_PORT; pick_port ETCD_PEER_PORT; pick_port APISERVER_PORT
  pick_port KCM_PORT; pick_port SCHEDULER_PORT; pick_port KWOK_PORT
  local adv; adv=$(advertise_address)
  cat > "${STATE_DIR}/cluster.env" <<EOF
E2E_PROFILE=${profile}
ETCD_PORT=${ETCD_PORT}
ETCD_PEER_PORT=${ETCD_PEER_PORT}
APISERVER_PORT=${APISERVER_PORT}
KCM_PORT=${KCM_PORT}
SCHEDULER_PORT=${SCHEDULER_PORT}
KWOK_PORT=${KWOK_PORT}
ADVERTISE_ADDRESS=${adv}
EOF
  gen_certs
  write_kubeconfig "${PKI}/admin.kubeconfig" admin kubernetes-admin
  write_kubeconfig "${PKI}/controller-manager.kubeconfig" controller-manager system:kube-controller-manager
  write_kubeconfig "${PKI}/scheduler.kubeconfig" scheduler system:kube-scheduler
  write_kubeconfig "${PKI}/kwok.kubeconfig" kwok kwok-controller

  start etcd "$ETCD" --name=e2e --data-dir="${STATE_DIR}/etcd" \
    --listen-client-urls="http://127.0.0.1:${ETCD_PORT}" \
    --advertise-client-urls="http://127.0.0.1:${ETCD_PORT}" \
    --listen-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-advertise-peer-urls="http://127.0.0.1:${ETCD_PEER_PORT}" \
    --initial-cluster="e2e=http://127.0.0.1:${ETCD_PEER_PORT}" \
    --unsafe-no-fsync=true --quota-backend-bytes=8589934592 --log-level=warn
  wait_until etcd 30 "etcd /health" curl -fsS "http://127.0.0.1:${ETCD_PORT}/health"

  start kube-apiserver "$KUBE_APISERVER" \
    --etcd-servers="http://127.0.0.1:${ETCD_PORT}" \
    --bind-address=127.0.0.1 --secure-port="${APISERVER_PORT}" --advertise-address="${adv}" \
    --tls-cert-file="${PKI}/apiserver.crt" --tls-private-key-file="${PKI}/apiserver.key" \
    --client-ca-file="${PKI}/ca.crt" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="${PKI}/sa.pub" --service-account-signing-key-file="${PKI}/sa.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" \
    --authorization-mode=Node,RBAC --allow-privileged=true \
    --disable-admission-plugins=TaintNodesByCondition \
    --cert-dir="${PKI}/apiserver-generated" --profiling=false
  wait_until kube-apiserver 90 "kube-apiserver /readyz" \
    kc get --raw /readyz

  # --resource-quota-sync-period: a create the API server refuses after quota admission
  # (409 AlreadyExists: an operator restarted at once re-creates pods its killed
  # predecessor's last requests created) still adds to the quota's `used` until the
  # next full recount, 5 minutes by default; tests that restart the operator at once
  # would wait that long. (README, "Known limits".)
  start kube-controller-manager "$KUBE_CONTROLLER_MANAGER" \
    --resource-quota-sync-period=10s \
    --kubeconfig="${PKI}/controller-manager.kubeconfig" \
    --authentication-kubeconfig="${PKI}/controller-manager.kubeconfig" \
    --authorization-kubeconfig="${PKI}/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="${KCM_PORT}" --cert-dir="${PKI}/kcm-generated" \
    --leader-elect=false --controllers='*' --use-service-account-credentials=true \
    --root-ca-file="${PKI}/ca.crt" --service-account-private-key-file="${PKI}/sa.key" \
    --cluster-signing-cert-file="${PKI}/ca.crt" --cluster-signing-key-file="${PKI}/ca.key" \
    --service-cluster-ip-range="${SERVICE_CIDR}" --allocate-node-cidrs=false \
    --kube-api-qps=100 --kube-api-burst=200 --profiling=false

  start kube-scheduler "$KUBE_SCHEDULER" \
    --kubeconfig="${PKI}/scheduler.kubeconfig" \
    --authentication-kubeconfig="${PKI}/scheduler.kubeconfig" \
    --authorization-kubeconfig="${PKI}/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="${SCHEDULER_PORT}" --cert-dir="${PKI}/scheduler-generated" \
    --leader-elect=false --profiling=false

  # HOME in the state dir: kwok would also load stages from ~/.kwok/kwok.yaml if that existed.
  mkdir -p "${STATE_DIR}/kwok-home"
  HOME="${STATE_DIR}/kwok-home" start kwok "$KWOK" \
    --kubeconfig="${PKI}/kwok.kubeconfig" \
    --config="${E2E_DIR}/kwok/kwok.yaml" --config="${E2E_DIR}/kwok/stages.yaml" \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds="$(node_lease_seconds "$profile")" \
    --server-address="127.0.0.1:${KWOK_PORT}" \
    --cidr="${POD_CIDR}"

  wait_until kube-controller-manager 60 "kube-controller-manager /healthz" \
    curl -fsSk "https://127.0.0.1:${KCM_PORT}/healthz"
  wait_until kube-scheduler 60 "kube-scheduler /healthz" \
    curl -fsSk "https://127.0.0.1:${SCHEDULER_PORT}/healthz"
  wait_until kwok 60 "kwok /healthz" curl -fsS "http://127.0.0.1:${KWOK_PORT}/healthz"

  create_nodes "$profile"
  wait_until kube-controller-manager 60 "the default ServiceAccount in namespace default" \
    kc -n default get serviceaccount default
  local n; n=$(profile_node_count "$profile")
  wait_nodes_ready "$n" 300
  # The dev profile (what `make test` uses) adds one real node; E2E_REAL_NODE=0 leaves it out.
  if [[ "$profile" == dev && "${E2E_REAL_NODE:-1}" != 0 ]]; then
    node_up
    n=$((n + 1 + $(trainer_node_count)))
  fi
  # The dev profile runs the workload kinds tenants bring (JobSet controller, TrainJob CRD).
  [[ "$profile" == dev ]] && workloads_up

  cp "${PKI}/admin.kubeconfig" "${KUBECONFIG_OUT}.tmp"
  mv -f "${KUBECONFIG_OUT}.tmp" "$KUBECONFIG_OUT"
  trap - INT TERM EXIT
  log "cluster up (profile ${profile}, ${n} nodes) in $((SECONDS - t0))s; kubeconfig ${KUBECONFIG_OUT}"
  echo "KUBECONFIG=${KUBECONFIG_OUT}"
}

cmd_down() {
  if [[ "$(cat "${STATE_DIR}/mode" 2>/dev/null)" == kind ]]; then
    kind_down
  fi
  if [[ -d "$PIDS" ]]; then
    stop_all
  else
    node_down   # nothing may stay mounted below .e2e/ when it is removed
  fi
  if [[ -d "$STATE_DIR" ]]; then
    rm -rf "$STATE_DIR"
    log "removed ${STATE_DIR}"
  else
    log "nothing running (no ${STATE_DIR})"
  fi
}

cmd_status() {
  if [[ "$(cat "${STATE_DIR}/mode" 2>/dev/null)" == kind ]]; then
    kind_status
    return
  fi
  if [[ ! -d "$STATE_DIR" ]]; then
    echo "not running (no ${STATE_DIR})"
    return 1
  fi
  load_env || true
  echo "profile:    ${E2E_PROFILE:-?}"
  local c pid ok=1
  local all=("${COMPONENTS[@]}")
  [[ "${REAL_NODE:-0}" == 1 ]] && mapfile -t -O "${#all[@]}" all < <(node_components | tr ' ' '\n')
  [[ "${JOBSET_CONTROLLER:-0}" == 1 ]] && all+=(jobset)
  for c in "${all[@]}"; do
    if pid=$(pid_of "$c"); then
      printf '%-24s running  pid %s\n' "$c" "$pid"
    else
      printf '%-24s STOPPED\n' "$c"
      ok=0
    fi
  done
  echo "apiserver:  https://127.0.0.1:${APISERVER_PORT:-?} (etcd ${ETCD_PORT:-?}, controller-manager ${KCM_PORT:-?}, scheduler ${SCHEDULER_PORT:-?}, kwok ${KWOK_PORT:-?})"
  if [[ -f "$KUBECONFIG_OUT" ]]; then
    echo "kubeconfig: ${KUBECONFIG_OUT}"
  else
    echo "kubeconfig: (not written: the cluster did not finish starting)"
    ok=0
  fi
  if ((ok)) && healthy; then
    local nodes
    nodes=$("$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" get nodes --no-headers \
      -L node.kubernetes.io/instance-type 2>/dev/null) || true
    echo "nodes:      $(wc -l <<<"$nodes") total, $(awk '$2 == "Ready"' <<<"$nodes" | wc -l) Ready"
    awk '{k = $NF; t[k]++; if ($2 == "Ready") r[k]++} END {for (k in t) printf "  %-14s %5d nodes, %5d Ready\n", k, t[k], r[k]}' <<<"$nodes" | sort
    if (($(wc -l <<<"$nodes") <= 30)); then
      "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" get nodes \
        -L nvidia.com/gpu.product,rebellions.ai/npu.family,furiosa.ai/npu.family,topology.sovereign.ai/block,topology.sovereign.ai/rack
    fi
    echo "status:     healthy"
    return 0
  fi
  echo "status:     NOT healthy (\`e2e/cluster down && e2e/cluster up\` restarts it)"
  return 1
}
