#!/usr/bin/env bash
# Advertises fake accelerators on the kind workers made from e2e/kind/cluster.yaml, as in the
# Kubernetes task "Advertise Extended Resources for a Node": a JSON patch of the node's
# status.capacity (and status.allocatable) through the status subresource. No device plugin:
# pods requesting the resource then schedule and run as ordinary containers.
# Also taints the B200 worker nvidia.com/gpu=present:NoSchedule, as on the kwok B200 nodes.
#
# usage: KUBECONFIG=.e2e/kubeconfig e2e/kind/advertise-resources.sh [KUBECTL]
set -euo pipefail
KUBECTL=${1:-${KUBECTL:-kubectl}}

# label whose value is the device count -> extended resource name
pairs=(
  "nvidia.com/gpu.count=nvidia.com/gpu"
  "rebellions.ai/npu.count=rebellions.ai/ATOM"
  "furiosa.ai/npu.count=furiosa.ai/rngd"
)

for pair in "${pairs[@]}"; do
  label=${pair%%=*} resource=${pair#*=}
  # JSON Pointer escapes "/" in the resource name as "~1"
  path=${resource//\//\~1}
  while read -r node count; do
    [[ -n "$node" ]] || continue
    patch="[{\"op\":\"add\",\"path\":\"/status/capacity/${path}\",\"value\":\"${count}\"},"
    patch+="{\"op\":\"add\",\"path\":\"/status/allocatable/${path}\",\"value\":\"${count}\"}]"
    "$KUBECTL" patch node "$node" --subresource=status --type=json -p "$patch" >/dev/null
    echo "${node}: ${resource}=${count}" >&2
  done < <("$KUBECTL" get nodes -l "$label" --no-headers \
             -o "custom-columns=N:.metadata.name,C:.metadata.labels.${label//./\\.}")
done

while read -r node; do
  [[ -n "$node" ]] || continue
  "$KUBECTL" taint node "$node" nvidia.com/gpu=present:NoSchedule --overwrite >/dev/null
  echo "${node}: tainted nvidia.com/gpu=present:NoSchedule" >&2
done < <("$KUBECTL" get nodes -l nvidia.com/gpu.product=NVIDIA-B200 --no-headers -o custom-columns=N:.metadata.name)

# wait until the scheduler sees the resources
for pair in "${pairs[@]}"; do
  resource=${pair#*=}
  for _ in $(seq 1 30); do
    n=$("$KUBECTL" get nodes -o "jsonpath={range .items[*]}{.status.allocatable.${resource//./\\.}}{\"\\n\"}{end}" | grep -c '[0-9]' || true)
    ((n > 0)) && break
    sleep 1
  done
done
