#!/usr/bin/env bash
# Runs every loopfuse test: unit tests, then the integration tests, which mount for real.
#
# As root it installs missing tools, runs all tests as root, then runs the integration tests
# again as the unprivileged user 'loopfuse-test' (created if missing), since unprivileged
# users are who loopfuse is for. For that run it makes /dev/fuse mode 0666, as the udev rules
# of distributions do. As another user it runs the tests once, as that user.
#
# LOOPFUSE_REQUIRE_FUSE=1 turns a test that cannot mount into a failure instead of a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/common.sh
source scripts/lib/common.sh

TEST_USER=${LOOPFUSE_TEST_USER:-loopfuse-test}

ensure_tools
export PATH="$PATH:/usr/sbin:/sbin"

echo "==> cargo test (as $(id -un))"
# --show-output prints the one-line reason of every test that skipped.
cargo test --all-targets -- --show-output

if [ "$(id -u)" -ne 0 ]; then
    exit 0
fi

echo "==> integration tests as the unprivileged user $TEST_USER"
if ! id "$TEST_USER" >/dev/null 2>&1; then
    useradd --system --no-create-home --shell /usr/sbin/nologin "$TEST_USER"
fi
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    echo "    /dev/fuse is mode $(stat -c %a /dev/fuse); setting 0666 as udev rules do"
    chmod 0666 /dev/fuse
fi

# Copy the test binaries and loopfuse to a directory the user can read, because the
# checkout may sit under a directory that user cannot enter.
stage=$(mktemp -d /tmp/loopfuse-unprivileged.XXXXXX)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
cp target/debug/loopfuse "$stage/"
mapfile -t binaries < <(cargo test --no-run --tests --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    target = message.get("target", {})
    if message.get("reason") == "compiler-artifact" and target.get("kind") == ["test"] and message.get("executable"):
        print(message["executable"])
')
status=0
for binary in "${binaries[@]}"; do
    cp "$binary" "$stage/"
    name=$(basename "$binary")
    echo "--> $name as $TEST_USER"
    setpriv --reuid="$TEST_USER" --regid="$TEST_USER" --init-groups \
        env -i PATH="/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" HOME="$stage" TMPDIR=/tmp \
        LOOPFUSE_BIN="$stage/loopfuse" LOOPFUSE_REQUIRE_FUSE="${LOOPFUSE_REQUIRE_FUSE:-}" \
        "$stage/$name" --show-output || status=1
done
exit "$status"
