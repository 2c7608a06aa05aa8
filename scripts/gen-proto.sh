#!/usr/bin/env bash
# Generates TypeScript for every .proto under proto/ into libs/proto/src/gen with
# ts-proto, using Debian's protoc. `--check` generates into a scratch directory and
# fails when the committed code differs (the suite runs it, so stale code is red).
set -euo pipefail
cd "$(dirname "$0")/.."
out=libs/proto/src/gen
check=0
[[ ${1:-} == --check ]] && check=1
command -v protoc >/dev/null || { echo "gen-proto: protoc missing (Debian protobuf-compiler); run npm run bootstrap" >&2; exit 1; }
target=$out
if [[ $check -eq 1 ]]; then target=$(mktemp -d); trap 'rm -rf "$target"' EXIT; fi
rm -rf "${target:?}"/*
mkdir -p "$target"
mapfile -t files < <(cd proto && find . -name '*.proto' | sed 's|^\./||' | sort)
protoc \
  --plugin=protoc-gen-ts_proto=node_modules/.bin/protoc-gen-ts_proto \
  --ts_proto_out="$target" \
  --ts_proto_opt=outputServices=grpc-js,esModuleInterop=true,env=node,importSuffix=.js,forceLong=number,useDate=true,useExactTypes=false \
  -I proto -I /usr/include \
  "${files[@]}"
if [[ $check -eq 1 ]]; then
  if ! diff -r "$target" "$out" >/dev/null; then
    echo "gen-proto: generated code in $out is stale; run npm run proto and commit it" >&2
    diff -r "$target" "$out" | head -20 >&2
    exit 1
  fi
  echo "gen-proto: generated code is up to date"
fi
