#!/usr/bin/env bash
# The book (docs/, mdBook) builds, and every relative link and #anchor in
# it and in README.md resolves. Links to other sites are not fetched.
#
#   .ci/docs-check.sh            # installs mdBook first if it is missing
#
# The book is written to target/book (docs/book.toml). The CLI reference in
# it (docs/src/reference/cli.md) is checked against the binary by the test
# tests/docs_reference.rs, and the README's Rust example runs as a doctest
# (cargo test -p image-cache --doc): both run under `cargo test --workspace`.
set -euo pipefail
cd "$(dirname "$0")/.."

MDBOOK_VERSION=0.4.52
mdbook="$(command -v mdbook || true)"
if [ -z "$mdbook" ] && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/mdbook" ]; then
    mdbook="${CARGO_HOME:-$HOME/.cargo}/bin/mdbook"
fi
if [ -z "$mdbook" ] || [ "$("$mdbook" --version)" != "mdbook v$MDBOOK_VERSION" ]; then
    # From crates.io, pinned; only the search feature (no `serve`/`watch`,
    # which pull in a web server and file watchers): about 3-6 minutes of
    # building on a 2-core machine (6 min 15 s measured while other builds
    # shared the cores).
    cargo install mdbook --locked --version "$MDBOOK_VERSION" \
        --no-default-features --features search
    mdbook="${CARGO_HOME:-$HOME/.cargo}/bin/mdbook"
fi
"$mdbook" --version

"$mdbook" build docs
python3 .ci/check-links.py
