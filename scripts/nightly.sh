# Sourced by scripts/release and scripts/cross-test (not run on its own): the nightly,
# build-std, immediate-abort build that keeps the binaries within the size budget (issue 5).
#
# Why nightly: on stable, `panic = "abort"` still links the standard library's panic message
# and backtrace printer (gimli, addr2line, miniz_oxide, libunwind), about 120 KiB of every
# binary. Rebuilding std from source (-Zbuild-std, needs the rust-src component) with the
# `immediate-abort` panic strategy leaves all of that out: a panic is a bare trap (SIGILL,
# no message, no backtrace). The settings are in .cargo/nightly-release.toml, which only these
# scripts load with `--config`, so stable `cargo build`/`test`/`clippy` never see them (stable
# cargo would reject `panic = "immediate-abort"` in Cargo.toml).
#
# Callers set NIGHTLY_TARGET_DIR and `install` (1: install what is missing, 0: fail instead),
# then call nightly_prepare TARGET... and nightly_build TARGET....

NIGHTLY_CONFIG=.cargo/nightly-release.toml
NIGHTLY_ENV=() # VAR=value pairs for the nightly cargo only (borrow_self_contained)

# nightly_prepare TARGET...: checks that the nightly toolchain is there, adds rust-src and the
# musl targets' rust-std to it. Targets with a glibc C linker (armv7 gnueabihf) need no
# prebuilt rust-std at all: build-std compiles std and the system's cross gcc brings the crt
# objects and libc. musl targets link with rust-lld against the crt objects, libc.a and
# libunwind.a that rust-std ships in lib/self-contained, so they need it.
nightly_check() {
  [ -z "${NIGHTLY_CHECKED:-}" ] || return 0
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "ERROR: the nightly Rust toolchain is not installed. The size-budget build needs it" >&2
    echo "(build-std and panic=immediate-abort are nightly-only): rustup toolchain install nightly" >&2
    return 1
  fi
  echo "nightly: $(rustup run nightly rustc --version)"
  NIGHTLY_CHECKED=1
}

nightly_prepare() {
  nightly_check || return 1
  if ! rustup component list --toolchain nightly --installed | grep -q '^rust-src'; then
    [ "$install" = 1 ] || { echo "missing: rust-src for nightly (run without --no-install)" >&2; return 1; }
    rustup component add rust-src --toolchain nightly ||
      { echo "ERROR: cannot add rust-src to nightly (needed by -Zbuild-std)" >&2; return 1; }
  fi
  local t installed log
  installed=$(rustup target list --installed --toolchain nightly)
  for t in "$@"; do
    case $t in *-musl*) ;; *) continue ;; esac
    grep -qx "$t" <<<"$installed" && continue
    if [ "$install" = 1 ]; then
      # rustup's failure is a multi-line backtrace: keep its first error line only.
      if log=$(rustup target add --toolchain nightly "$t" 2>&1); then
        echo "added $t to nightly"
        continue
      fi
      echo "rustup target add --toolchain nightly $t: $(grep -m1 -E 'error|status code' <<<"$log")" >&2
    fi
    # Not every nightly rust-std can be downloaded everywhere (on this project's machines
    # aarch64-unknown-linux-musl's is refused with a 404 while x86_64's and i686's come).
    # What the build needs from it is only the C side in lib/self-contained (musl's crt
    # objects and libc.a, LLVM's libunwind.a): borrow the stable toolchain's, through a
    # sysroot of symlinks that is nightly's everywhere else. Both toolchains bundle musl
    # 1.2.5: stable 1.95's and nightly 1.97's libc.a are byte-identical for x86_64 and i686.
    borrow_self_contained "$t" || return 1
  done
}

# borrow_self_contained TARGET: builds NIGHTLY_TARGET_DIR/sysroot-TARGET and adds to
# NIGHTLY_ENV the variable that points the nightly build's rustflags for TARGET at it.
borrow_self_contained() {
  local t=$1 nightly stable root e var
  nightly=$(rustup run nightly rustc --print sysroot)
  stable=$(rustup run stable rustc --print sysroot)
  if [ ! -f "$stable/lib/rustlib/$t/lib/self-contained/crt1.o" ]; then
    echo "ERROR: no rust-std for $t on nightly and none on stable to borrow from" >&2
    return 1
  fi
  echo "warning: nightly rust-std for $t unavailable; linking with stable's musl objects" >&2
  root=$(mkdir -p "$NIGHTLY_TARGET_DIR" && cd "$NIGHTLY_TARGET_DIR" && pwd)/sysroot-$t
  rm -rf "$root"
  mkdir -p "$root/lib/rustlib/$t/lib"
  for e in "$nightly"/*; do [ "${e##*/}" = lib ] || ln -s "$e" "$root/"; done
  for e in "$nightly"/lib/*; do [ "${e##*/}" = rustlib ] || ln -s "$e" "$root/lib/"; done
  for e in "$nightly"/lib/rustlib/*; do ln -s "$e" "$root/lib/rustlib/"; done
  ln -s "$stable/lib/rustlib/$t/lib/self-contained" "$root/lib/rustlib/$t/lib/self-contained"
  # CARGO_TARGET_<TRIPLE>_RUSTFLAGS, so only this target's crates get the sysroot (build
  # scripts and the host keep nightly's own). No [target] in .cargo/config.toml sets
  # rustflags for a musl target other than x86_64, whose nightly rust-std is downloadable.
  # Not exported: nightly_build passes it to nightly cargo only (stable rustc must not see
  # a nightly sysroot).
  var=CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$t")_RUSTFLAGS
  NIGHTLY_ENV+=("$var=--sysroot=$root")
}

# nightly_build TARGET...: the four binaries for each target, into NIGHTLY_TARGET_DIR (its own
# directory: the outputs have the same names as the stable `--profile tiny` ones).
nightly_build() {
  local target_args=() t
  for t in "$@"; do target_args+=(--target "$t"); done
  # --locked: exactly the dependency versions in Cargo.lock (std's own come with rust-src).
  env ${NIGHTLY_ENV[@]+"${NIGHTLY_ENV[@]}"} CARGO_TARGET_DIR="$NIGHTLY_TARGET_DIR" \
    cargo +nightly build --locked --config "$NIGHTLY_CONFIG" --profile tiny --bins "${target_args[@]}"
}
