#!/usr/bin/env bash
# Installs the Debian packages listed in scripts/system-packages.txt that are
# missing. Quiet and quick when everything is already there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mapfile -t wanted < <(grep -vE '^\s*(#|$)' "$here/system-packages.txt")
missing=()
for pkg in "${wanted[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "bootstrap: missing Debian packages (${missing[*]}); run as root or install them" >&2
  exit 1
fi
echo "bootstrap: installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Services packaged with init scripts (redis-server) must not start on install:
# tests and the node start their own instances on loopback.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
trap '[[ $created_policy -eq 1 ]] && rm -f "$policy"' EXIT
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/sbx-apt.log 2>&1; then
  apt-get update -qq >>/tmp/sbx-apt.log 2>&1
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>/tmp/sbx-apt.log 2>&1 || {
    echo "bootstrap: apt-get install failed; see /tmp/sbx-apt.log" >&2; tail -20 /tmp/sbx-apt.log >&2; exit 1; }
fi
