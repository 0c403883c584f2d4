#!/usr/bin/env bash
# `make setup`: everything jpeglm needs, in .venv, with a line per step (the first run takes ~3 minutes).
#
# 1. system libraries pillow-simd is built against (a C compiler, libjpeg-turbo, zlib, libwebp headers) and the
#    strict JPEG judge (libjpeg-turbo-progs: djpeg, libturbojpeg): installed with apt-get when missing and running
#    as root on Debian/Ubuntu, else we stop with the exact command to run;
# 2. the virtual environment;
# 3. pillow-simd built from source once into the wheelhouse (AVX2 where the CPU has it), with WebP;
# 4. the project and its test extras in one pip resolver run pinned by the constraints file (CPU torch), `pip check`;
# 5. guards: plain `pillow` must not have replaced pillow-simd, and the built PIL must read WebP.
#
# Variables (set by the Makefile): PYTHON VENV CONSTRAINTS PILLOW_SIMD WHEELHOUSE SIMD_CC
#
# `scripts/setup.sh browser` (make setup-browser, run by make test) does one thing instead: Debian's chromium, for the
# test that renders `jpeglm report`'s page in a real headless browser (skipped without it). Not part of make setup:
# ~113 MB to download and ~290 MB installed (measured: apt-get install --no-install-recommends chromium, 18 s here),
# which no pipeline or training machine needs.
set -euo pipefail

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=${CONSTRAINTS:-constraints/cpu.txt}
PILLOW_SIMD=${PILLOW_SIMD:-pillow-simd==12.1.1.post0}
WHEELHOUSE=${WHEELHOUSE:-.cache/wheelhouse}
SIMD_CC=${SIMD_CC:-cc}
BIN=$VENV/bin
# The marker names what the wheel was built with: a wheel from before WebP was required is rebuilt.
BUILT=$WHEELHOUSE/.pillow-simd-webp

step() { printf '>> setup: %s\n' "$*"; }
fail() { printf 'ERROR (make setup): %s\n' "$*" >&2; exit 1; }
quiet_pip() {  # pip's one harmless warning about our find-links folder is noise
    "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}

apt_install() {  # apt_install "~N s" PACKAGE...: as root on Debian/Ubuntu
    local cost=$1
    shift
    step "installing system packages $* with apt-get ($cost)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || fail "apt-get update failed; install $* yourself and rerun"
    apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 \
        || fail "apt-get install $* failed; install them yourself and rerun"
}

# -- browser only (make setup-browser) -------------------------------------------------------------------------------
if [ "${1:-}" = browser ]; then
    if command -v chromium >/dev/null 2>&1 || command -v chromium-headless-shell >/dev/null 2>&1; then
        exit 0
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt_install "113 MB download, ~20 s" chromium
    else
        # Not fatal: only tests/test_report.py's browser test needs it, and it says it was skipped.
        printf '>> setup: no chromium: the report browser test will be skipped (Debian: sudo apt-get install chromium)\n'
    fi
    exit 0
fi

# -- 1. system libraries -------------------------------------------------------------------------------------------
have_header() {  # have_header NAME.h: the C compiler finds it
    printf '#include <stddef.h>\n#include <stdio.h>\n#include <%s>\nint main(void){return 0;}\n' "$1" | ${SIMD_CC%% *} -x c -fsyntax-only - 2>/dev/null
}
if [ ! -f "$BUILT" ]; then
    missing=()
    command -v "${SIMD_CC%% *}" >/dev/null 2>&1 || missing+=(gcc)
    if [ ${#missing[@]} -eq 0 ]; then
        have_header jpeglib.h || missing+=(libjpeg-dev)
        have_header zlib.h || missing+=(zlib1g-dev)
        have_header webp/decode.h || missing+=(libwebp-dev)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt_install "~30 s" "${missing[@]}"
        elif command -v apt-get >/dev/null 2>&1; then
            fail "pillow-simd needs the system packages ${missing[*]}. Run: sudo apt-get install ${missing[*]}"
        elif command -v brew >/dev/null 2>&1; then
            fail "pillow-simd needs a C compiler and the jpeg, zlib and webp headers. Run: brew install jpeg-turbo zlib webp"
        else
            fail "pillow-simd needs a C compiler and the headers of libjpeg-turbo, zlib and libwebp (missing: ${missing[*]})"
        fi
    fi
fi

# The strict JPEG judge (pipeline/strict_decode.py): `djpeg -strict` and libturbojpeg, from libjpeg-turbo-progs.
# (grep without -q reads the whole listing: under pipefail, -q's early exit fails ldconfig with SIGPIPE.)
if ! command -v djpeg >/dev/null 2>&1 || ! { ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } \
        | grep 'libturbojpeg\.so\.0' >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt_install "the strict JPEG judge: djpeg, libturbojpeg; ~15 s" libjpeg-turbo-progs
    elif command -v apt-get >/dev/null 2>&1; then
        fail "the strict JPEG judge needs djpeg and libturbojpeg. Run: sudo apt-get install libjpeg-turbo-progs"
    elif command -v brew >/dev/null 2>&1; then
        fail "the strict JPEG judge needs djpeg and libturbojpeg. Run: brew install jpeg-turbo"
    else
        fail "the strict JPEG judge needs libjpeg-turbo's djpeg and libturbojpeg (Debian: libjpeg-turbo-progs)"
    fi
fi

# -- 2. virtual environment ----------------------------------------------------------------------------------------
if [ ! -x "$BIN/pip" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
        || fail "$PYTHON is missing or older than Python 3.10; run: make setup PYTHON=python3.11"
    step "creating $VENV with $("$PYTHON" --version 2>&1) (~5 s)"
    "$PYTHON" -m venv "$VENV"
fi

# -- 3. pillow-simd ------------------------------------------------------------------------------------------------
if [ ! -f "$BUILT" ]; then
    step "building $PILLOW_SIMD from source with WebP (CC='$SIMD_CC') into $WHEELHOUSE (~30 s)"
    mkdir -p "$WHEELHOUSE"
    rm -f "$WHEELHOUSE"/pillow_simd-*.whl
    CC="$SIMD_CC" quiet_pip "$BIN/pip" wheel --quiet --no-deps --no-cache-dir --no-binary pillow-simd \
        -w "$WHEELHOUSE" "$PILLOW_SIMD"
    touch "$BUILT"
fi

# -- 4. the project ------------------------------------------------------------------------------------------------
step "installing jpeglm and its dependencies into $VENV, pinned by $CONSTRAINTS (~2 min the first time)"
# One resolver run for everything: s3fs/aiobotocore/botocore pins break when installed piecemeal.
# --force-reinstall of pillow-simd alone: a venv made before WebP was required keeps its old build otherwise.
DS_BUILD_OPS=0 quiet_pip "$BIN/pip" install --quiet --disable-pip-version-check -c "$CONSTRAINTS" \
    --find-links "$WHEELHOUSE" -e ".[test]"
if ! "$BIN/python" -c 'from PIL import features; import sys; sys.exit(not features.check("webp"))' 2>/dev/null; then
    quiet_pip "$BIN/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall --no-index \
        --find-links "$WHEELHOUSE" "$PILLOW_SIMD"
fi
step "checking the installed dependencies (pip check)"
"$BIN/pip" check >/dev/null || { "$BIN/pip" check; fail "pip check found broken requirements (above)"; }

# -- 5. guards -----------------------------------------------------------------------------------------------------
# Plain Pillow would silently overwrite pillow-simd's PIL/ (and uninstalling it deletes PIL/ entirely).
if "$BIN/pip" show --quiet pillow 2>/dev/null; then
    fail "a dependency pulled in plain 'pillow', which replaces pillow-simd. Find it with:
  grep -il '^Requires-Dist: pillow' $VENV/lib/python*/site-packages/*.dist-info/METADATA"
fi
"$BIN/python" - <<'EOF' || fail "the installed PIL cannot read WebP: run 'rm -rf .cache/wheelhouse' and make setup again"
import io, sys
from PIL import Image, features
assert features.check("webp"), "no WebP codec"
buf = io.BytesIO()
Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "WEBP", quality=90)
img = Image.open(io.BytesIO(buf.getvalue()))
img.load()
assert img.size == (16, 16)
print(f">> setup: PIL {Image.__version__} (pillow-simd) reads JPEG, PNG, WebP; jpeglm is installed in the venv")
EOF
echo ">> setup: done. Run commands as .venv/bin/jpeglm ..., or first: source $VENV/bin/activate"
