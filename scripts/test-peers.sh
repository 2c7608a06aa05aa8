#!/usr/bin/env bash
# Installs the pinned test peers (fake-gcs-server, consul, nomad): real programs the tests start on
# loopback in place of stand-ins. They are not product dependencies; `npm start` never needs them.
#
#   bash scripts/test-peers.sh [fake-gcs-server|consul|nomad ...]   (no name: all three)
#
# Each peer is built once per machine from the Go module proxy into a directory keyed by its version,
# $SBX_TEST_PEERS_DIR/<name>-<version>/<name> (default /var/cache/sbx-test-peers, or
# $HOME/.cache/sbx-test-peers when /var/cache is not writable); a peer already there is skipped.
# Prints one line per peer: "<name> <path to binary>". A build takes minutes of CPU
# (about 2 for fake-gcs-server, 10 each for consul and nomad) and ~9 GB of Go caches.
set -euo pipefail

declare -A module=(
  [fake-gcs-server]=github.com/fsouza/fake-gcs-server
  [consul]=github.com/hashicorp/consul
  [nomad]=github.com/hashicorp/nomad
)
# Pinned: the module proxy here is partial (@latest and commit lookups often fail), and these
# versions are the ones known to build with Go 1.26 (consul 1.21.5 does not: a dependency zip is refused).
declare -A version=(
  [fake-gcs-server]=v1.56.1
  [consul]=v1.22.2
  [nomad]=v1.10.5
)

default_dir=/var/cache/sbx-test-peers
if ! mkdir -p "$default_dir" 2>/dev/null || [[ ! -w $default_dir ]]; then
  default_dir=${HOME:-/tmp}/.cache/sbx-test-peers
fi
peers_dir=${SBX_TEST_PEERS_DIR:-$default_dir}
mkdir -p "$peers_dir"

names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(fake-gcs-server consul nomad)
for name in "${names[@]}"; do
  [[ -n ${module[$name]:-} ]] || { echo "test-peers: unknown peer '$name' (known: ${!module[*]})" >&2; exit 2; }
done

build() {
  local name=$1 v=${version[$1]} dest=$2
  if ! command -v go >/dev/null 2>&1; then
    echo "test-peers: the Go toolchain is needed to build $name $v for the tests and 'go' is not on PATH." >&2
    echo "test-peers: install Go >= 1.26 (https://go.dev/dl/) and run 'bash scripts/test-peers.sh $name'," >&2
    echo "test-peers: or put a $name $v binary at $dest/$name." >&2
    return 3
  fi
  local work
  work=$(mktemp -d)
  # The wrapper module is thrown away; only the binary is kept.
  trap 'rm -rf "$work"' RETURN
  echo "test-peers: building $name $v (minutes of CPU, once per machine) into $dest" >&2
  local started=$SECONDS
  (
    cd "$work"
    export GOTOOLCHAIN=local GOFLAGS=-buildvcs=false
    case $name in
      consul)
        # Two sub-modules consul pins are not in the checksum database.
        export GONOSUMDB=github.com/hashicorp/consul/envoyextensions,github.com/hashicorp/consul/troubleshoot
        ;;
    esac
    go mod init wrapper >/dev/null 2>&1
    if [[ $name == nomad ]]; then
      # nomad's go.mod replaces these; replace directives of a dependency do not apply, so repeat them.
      go mod edit \
        -replace=github.com/hashicorp/hcl=github.com/hashicorp/hcl@v1.0.1-nomad-1 \
        -replace=github.com/hashicorp/nomad/api=github.com/hashicorp/nomad/api@v0.0.0-20250909143645-a3b86c697f38
    fi
    go get "${module[$name]}@$v" >&2
    go build -trimpath -ldflags='-s -w' -o "$work/$name" "${module[$name]}" >&2
  ) || { echo "test-peers: building $name $v failed (output above)" >&2; return 1; }
  mkdir -p "$dest"
  mv "$work/$name" "$dest/$name.tmp" && mv "$dest/$name.tmp" "$dest/$name"
  echo "test-peers: built $name $v in $((SECONDS - started)) s" >&2
}

for name in "${names[@]}"; do
  dest="$peers_dir/$name-${version[$name]}"
  mkdir -p "$dest"
  # One builder per peer on a machine: test processes starting together wait for the first one.
  exec {lock}>"$dest/.lock"
  flock "$lock"
  if [[ ! -x $dest/$name ]]; then
    build "$name" "$dest" || { status=$?; flock -u "$lock"; exit $status; }
  fi
  flock -u "$lock"
  exec {lock}>&-
  echo "$name $dest/$name"
done
