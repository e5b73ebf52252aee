# shellcheck shell=bash
# Simulated (kwok) node manifests for the profiles. Sourced by e2e/cluster after common.sh.
#
# Every node: annotation kwok.x-k8s.io/node=fake; labels type=kwok, kubernetes.io/hostname,
# kubernetes.io/os, kubernetes.io/arch, node.kubernetes.io/instance-type,
# topology.sovereign.ai/block, topology.sovereign.ai/rack, plus the vendor's device labels;
# status.capacity = status.allocatable with cpu, memory, pods, ephemeral-storage and the
# accelerator resource; a unique fake InternalIP in 10.64.0.0/16 (never contacted).
# Racks are numbered across the whole cluster (r01, r02, ... / r001, ...); a block holds
# racks_per_block consecutive racks; with new_block=1 every pool starts a new block.

# Pool table columns:
#  prefix count digits rack_size racks_per_block new_block vendor resource per_node product
#  gpu_memory family cpu memory ephemeral instance_type taint
# vendor: nvidia | rebellions | furiosa | cpu ; "-" = unused ; taint "-" = none
profile_pools() {
  case "$1" in
    dev)
      cat <<'EOF'
h200 4 2 2 4 0 nvidia nvidia.com/gpu 8 NVIDIA-H200 143771 hopper 224 2Ti 30Ti gpu-h200-8 -
b200 4 2 2 4 0 nvidia nvidia.com/gpu 8 NVIDIA-B200 183359 blackwell 224 4Ti 30Ti gpu-b200-8 nvidia.com/gpu=present:NoSchedule
atom 4 2 2 4 0 rebellions rebellions.ai/ATOM 8 RBLN-CA22 - ATOM 128 1Ti 7Ti npu-atom-8 -
rngd 4 2 2 4 0 furiosa furiosa.ai/rngd 8 rngd - rngd 128 1Ti 7Ti npu-rngd-8 -
cpu 2 2 2 4 0 cpu - - - - - 32 128Gi 1Ti cpu-32 -
EOF
      ;;
    national)
      cat <<'EOF'
h200 800 4 16 8 1 nvidia nvidia.com/gpu 8 NVIDIA-H200 143771 hopper 224 2Ti 30Ti gpu-h200-8 -
b200 450 4 16 8 1 nvidia nvidia.com/gpu 8 NVIDIA-B200 183359 blackwell 224 4Ti 30Ti gpu-b200-8 nvidia.com/gpu=present:NoSchedule
gh200 1000 4 16 8 1 nvidia nvidia.com/gpu 4 NVIDIA-GH200-480GB 97871 hopper 288 1800Gi 15Ti gpu-gh200-4 -
atom 250 4 16 8 1 rebellions rebellions.ai/ATOM 8 RBLN-CA22 - ATOM 128 1Ti 7Ti npu-atom-8 -
rngd 250 4 16 8 1 furiosa furiosa.ai/rngd 8 rngd - rngd 128 1Ti 7Ti npu-rngd-8 -
cpu 2 4 16 8 1 cpu - - - - - 32 128Gi 1Ti cpu-32 -
EOF
      ;;
    *) die "unknown profile '$1' (dev or national)" ;;
  esac
}

# Number of nodes a profile creates.
profile_node_count() {
  profile_pools "$1" | awk '{n += $2} END {print n}'
}

# Writes the node manifests of a profile as YAML files of at most CHUNK nodes into DIR
# (nodes-0000.yaml, ...). Prints nothing.
generate_nodes() {
  local profile=$1 dir=$2 chunk=${3:-250}
  mkdir -p "$dir"
  rm -f "$dir"/nodes-*.yaml
  profile_pools "$profile" | awk -v dir="$dir" -v chunk="$chunk" -v kver="$K8S_VERSION" '
    function q(s) { return "\"" s "\"" }
    {
      prefix = $1; count = $2; digits = $3; rsize = $4; rpb = $5; newblock = $6
      vendor = $7; res = $8; per = $9; product = $10; gmem = $11; family = $12
      cpu = $13; mem = $14; eph = $15; itype = $16; taint = $17
      rw = (digits > 2) ? 3 : 2   # rack number width
      # a new pool starts a new rack; with newblock, a new block too
      if (newblock && racks_in_block > 0) { block++; racks_in_block = 0 }
      for (i = 1; i <= count; i++) {
        if ((i - 1) % rsize == 0) {
          if (block == 0 || racks_in_block == rpb) { block++; racks_in_block = 0 }
          rack++; racks_in_block++
        }
        b = "b" block; r = sprintf("r%0" rw "d", rack)
        name = sprintf("%s-%0" digits "d", prefix, i)
        if (n % chunk == 0) { if (out) close(out); out = sprintf("%s/nodes-%04d.yaml", dir, n / chunk) }
        n++
        print "---" > out
        print "apiVersion: v1" > out
        print "kind: Node" > out
        print "metadata:" > out
        print "  name: " name > out
        print "  annotations:" > out
        print "    kwok.x-k8s.io/node: fake" > out
        print "    node.alpha.kubernetes.io/ttl: \"0\"" > out
        print "  labels:" > out
        print "    type: kwok" > out
        print "    kubernetes.io/hostname: " name > out
        print "    kubernetes.io/os: linux" > out
        print "    kubernetes.io/arch: amd64" > out
        print "    node.kubernetes.io/instance-type: " itype > out
        print "    topology.sovereign.ai/block: " b > out
        print "    topology.sovereign.ai/rack: " r > out
        if (vendor == "nvidia") {
          print "    nvidia.com/gpu.present: \"true\"" > out
          print "    nvidia.com/gpu.product: " product > out
          print "    nvidia.com/gpu.count: " q(per) > out
          print "    nvidia.com/gpu.memory: " q(gmem) > out
          print "    nvidia.com/gpu.family: " family > out
          print "    nvidia.com/gpu.clique: " b "." r > out
        } else if (vendor == "rebellions") {
          print "    rebellions.ai/npu.present: \"true\"" > out
          print "    rebellions.ai/npu.family: " family > out
          print "    rebellions.ai/npu.product: " product > out
          print "    rebellions.ai/npu.count: " q(per) > out
        } else if (vendor == "furiosa") {
          print "    furiosa.ai/npu.present: \"true\"" > out
          print "    furiosa.ai/npu.family: " family > out
          print "    furiosa.ai/npu.product: " product > out
          print "    furiosa.ai/npu.count: " q(per) > out
        }
        if (taint == "-") print "spec: {}" > out
        else {
          split(taint, t, /[=:]/)
          print "spec:" > out
          print "  taints:" > out
          print "  - key: " t[1] > out
          print "    value: " t[2] > out
          print "    effect: " t[3] > out
        }
        print "status:" > out
        for (k = 0; k < 2; k++) {
          print (k == 0 ? "  capacity:" : "  allocatable:") > out
          print "    cpu: " q(cpu) > out
          print "    memory: " mem > out
          print "    pods: \"110\"" > out
          print "    ephemeral-storage: " eph > out
          if (res != "-") print "    " res ": " q(per) > out
        }
        # a unique fake InternalIP per node (10.64.0.0/16; never contacted)
        print "  addresses:" > out
        print "  - type: InternalIP" > out
        print "    address: 10.64." int((n - 1) / 250) "." ((n - 1) % 250 + 1) > out
        print "  - type: Hostname" > out
        print "    address: " name > out
        # kwok fills in the rest of nodeInfo; without this the node version reads kwok-0.8.0
        print "  nodeInfo:" > out
        print "    kubeletVersion: " kver > out
        print "    architecture: amd64" > out
        print "    operatingSystem: linux" > out
      }
    }
    END { if (out) close(out) }'
}
