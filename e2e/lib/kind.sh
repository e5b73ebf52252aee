# shellcheck shell=bash
# `e2e/cluster up --kind`: the same node labels and fake accelerator resources on a kind cluster.
# Needs kind and a container engine (docker, or podman with KIND_EXPERIMENTAL_PROVIDER=podman).
# Sourced by e2e/cluster after common.sh and controlplane.sh.

KIND_CLUSTER_NAME="${KIND_CLUSTER_NAME:-sovereign-e2e}"

kind_require() {
  command -v kind >/dev/null 2>&1 \
    || die "--kind needs the 'kind' CLI on PATH (https://kind.sigs.k8s.io); it is not installed here. Without Docker use the default kwok cluster: e2e/cluster up"
  local engine=${KIND_EXPERIMENTAL_PROVIDER:-docker}
  command -v "$engine" >/dev/null 2>&1 \
    || die "--kind needs a container engine ('${engine}' not found on PATH). Without one use the default kwok cluster: e2e/cluster up"
  "$engine" info >/dev/null 2>&1 || die "--kind: '${engine} info' failed; is the ${engine} daemon running?"
}

cmd_up_kind() {
  local profile=$1
  [[ "$profile" == dev ]] || die "--kind supports only --profile dev (the national profile needs kwok: e2e/cluster up --profile national)"
  kind_require
  if [[ "$(cat "${STATE_DIR}/mode" 2>/dev/null)" == kind ]] && kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER_NAME" \
     && "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" get --raw /readyz >/dev/null 2>&1; then
    log "kind cluster ${KIND_CLUSTER_NAME} already running; reusing it"
    echo "KUBECONFIG=${KUBECONFIG_OUT}"
    return 0
  fi
  if [[ -d "$STATE_DIR" ]]; then
    log "removing stale state in ${STATE_DIR}"
    cmd_down >/dev/null
  fi
  mkdir -p "$STATE_DIR"
  echo kind > "${STATE_DIR}/mode"
  echo "E2E_PROFILE=${profile}" > "${STATE_DIR}/cluster.env"
  local args=(create cluster --name "$KIND_CLUSTER_NAME" --config "${E2E_DIR}/kind/cluster.yaml"
              --kubeconfig "${KUBECONFIG_OUT}.tmp" --wait 180s)
  [[ -n "${KIND_NODE_IMAGE:-}" ]] && args+=(--image "$KIND_NODE_IMAGE")
  kind "${args[@]}" >&2 || die "kind create cluster failed"
  KUBECONFIG="${KUBECONFIG_OUT}.tmp" "${E2E_DIR}/kind/advertise-resources.sh" "$KUBECTL" \
    || die "advertising the fake accelerator resources failed"
  KUBECONFIG="${KUBECONFIG_OUT}.tmp" "$KUBECTL" -n default wait --for=jsonpath='{.metadata.name}'=default \
    serviceaccount/default --timeout=60s >/dev/null || die "no default ServiceAccount"
  mv -f "${KUBECONFIG_OUT}.tmp" "$KUBECONFIG_OUT"
  log "kind cluster ${KIND_CLUSTER_NAME} up; kubeconfig ${KUBECONFIG_OUT}"
  echo "KUBECONFIG=${KUBECONFIG_OUT}"
}

kind_down() {
  if command -v kind >/dev/null 2>&1; then
    kind delete cluster --name "$KIND_CLUSTER_NAME" >&2 || log "kind delete cluster failed"
  else
    log "kind not on PATH; cannot delete kind cluster ${KIND_CLUSTER_NAME}"
  fi
}

kind_status() {
  echo "mode:       kind (cluster ${KIND_CLUSTER_NAME})"
  echo "kubeconfig: ${KUBECONFIG_OUT}"
  if [[ -f "$KUBECONFIG_OUT" ]] && "$KUBECTL" --kubeconfig "$KUBECONFIG_OUT" get nodes \
       -L nvidia.com/gpu.product,rebellions.ai/npu.family,furiosa.ai/npu.family; then
    echo "status:     healthy"
    return 0
  fi
  echo "status:     NOT healthy"
  return 1
}
