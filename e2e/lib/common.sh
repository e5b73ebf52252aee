# shellcheck shell=bash disable=SC2034  # the variables are used by the other files
# Shared settings for e2e/cluster. Sourced, not executed.

# Pinned versions (checked against the Go module proxy with `go list -m -versions`).
K8S_VERSION="v1.36.3"       # k8s.io/kubernetes; staging modules are v0.36.3
ETCD_VERSION="v3.6.14"      # go.etcd.io/etcd/server/v3
KWOK_VERSION="v0.8.0"       # sigs.k8s.io/kwok
HELM_VERSION="v3.21.4"      # helm.sh/helm/v3
# The proxy refuses the version lists of these two (403); named versions download.
JOBSET_VERSION="v0.10.1"    # sigs.k8s.io/jobset: the JobSet controller (dev profile)
TRAINER_VERSION="v2.0.0"    # github.com/kubeflow/trainer/v2: its CRDs only (TrainJob)
COREDNS_VERSION="v1.15.0"   # github.com/coredns/coredns (cluster DNS of the real node)

# Paths. E2E_DIR is e2e/, REPO_ROOT its parent: found from the script, not from cwd.
E2E_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_ROOT="$(cd "${E2E_DIR}/.." && pwd)"
STATE_DIR="${REPO_ROOT}/.e2e"
CACHE_DIR="${SOVEREIGN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sovereign-operator}"

K8S_BIN_DIR="${CACHE_DIR}/bin/kubernetes-${K8S_VERSION}"
ETCD_BIN_DIR="${CACHE_DIR}/bin/etcd-${ETCD_VERSION}"
KWOK_BIN_DIR="${CACHE_DIR}/bin/kwok-${KWOK_VERSION}"
HELM_BIN_DIR="${CACHE_DIR}/bin/helm-${HELM_VERSION}"
JOBSET_BIN_DIR="${CACHE_DIR}/bin/jobset-${JOBSET_VERSION}"
COREDNS_BIN_DIR="${CACHE_DIR}/bin/coredns-${COREDNS_VERSION}"

ETCD="${ETCD_BIN_DIR}/etcd"
KUBE_APISERVER="${K8S_BIN_DIR}/kube-apiserver"
KUBE_CONTROLLER_MANAGER="${K8S_BIN_DIR}/kube-controller-manager"
KUBE_SCHEDULER="${K8S_BIN_DIR}/kube-scheduler"
KUBECTL="${K8S_BIN_DIR}/kubectl"
KUBELET="${K8S_BIN_DIR}/kubelet"      # the real (system) node of the dev cluster
KWOK="${KWOK_BIN_DIR}/kwok"
HELM="${HELM_BIN_DIR}/helm"
JOBSET="${JOBSET_BIN_DIR}/jobset"
COREDNS="${COREDNS_BIN_DIR}/coredns"   # cluster DNS for the real node's pods

# Logs go to stderr; a closed stderr (e.g. `| head`) must not abort a half-started cluster.
log() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2 2>/dev/null || true; }
die() { log "ERROR: $*"; exit 1; }

# state_lock: serialises `up` and `down` on this checkout's .e2e/ (tests, demos and people may
# call them at the same time). The lock file lives in the cache, so `down` removing .e2e/ keeps it.
# fd 8; processes started by `up` must not inherit it (see start()).
state_lock() {
  local dir="${CACHE_DIR}/locks" key
  mkdir -p "$dir"
  key=$(printf '%s' "$REPO_ROOT" | cksum | cut -d' ' -f1)
  exec 8>"${dir}/state-${key}.lock"
  if ! flock -n 8; then
    log "another 'e2e/cluster up/down' is working on ${STATE_DIR}; waiting for it"
    flock -w 1800 8 || die "timed out waiting for the other e2e/cluster command"
  fi
}

# Go: use the one on PATH, else the usual install location.
ensure_go() {
  if ! command -v go >/dev/null 2>&1; then
    if [[ -x /usr/local/go/bin/go ]]; then
      PATH="/usr/local/go/bin:${PATH}"
      export PATH
    else
      die "Go is required to build the test cluster tools (go not found on PATH nor /usr/local/go/bin)"
    fi
  fi
}
