#!/usr/bin/env bash
# Builds a statically linked `tollgate` binary and the `FROM scratch` image around it.
#
#   deploy/build-image.sh                 # builds the binary, then the image tollgate:dev
#   IMAGE=registry.example/tollgate:0.1.0 deploy/build-image.sh
#   SKIP_BUILD=1 deploy/build-image.sh    # reuse the binary of the last build
#
# No base image is pulled: the image is the binary, an empty /data owned by the runtime user
# (65532) and nothing else. The build context handed to docker is a temporary directory holding
# only the Dockerfile, the binary and that empty directory.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
image="${IMAGE:-tollgate:dev}"
target="${TARGET:-x86_64-unknown-linux-gnu}"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
binary="$target_dir/$target/release/tollgate"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    # +crt-static links glibc statically. It only applies to what is built for --target (the
    # binary), not to build scripts and proc macros, which is why --target is given explicitly.
    # No debug info (the workspace's release profile keeps some for profiling): a smaller image.
    (
        cd "$root"
        RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
            CARGO_PROFILE_RELEASE_DEBUG=0 \
            CARGO_PROFILE_RELEASE_STRIP=debuginfo \
            cargo build --release --locked -p tollgate --bin tollgate --target "$target"
    )
fi

if [ ! -x "$binary" ]; then
    echo "build-image.sh: $binary is missing (run without SKIP_BUILD=1)" >&2
    exit 1
fi
# A scratch image has no dynamic loader and no shared libraries: refuse a dynamic binary.
if readelf -l "$binary" | grep -q 'Requesting program interpreter'; then
    echo "build-image.sh: $binary is dynamically linked; it cannot run in a FROM scratch image" >&2
    exit 1
fi

context="$(mktemp -d)"
trap 'rm -rf "$context"' EXIT
cp "$here/Dockerfile" "$context/Dockerfile"
cp "$binary" "$context/tollgate"
mkdir "$context/data"
chmod 0755 "$context/tollgate" "$context/data"

docker build --tag "$image" "$context"
echo "built $image ($(du -h "$binary" | cut -f1) binary)"
