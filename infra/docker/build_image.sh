#!/usr/bin/env bash
# Build the moon3 CPU image offline (the README's air-gapped recipe), from a bare Debian machine as root.
#
#   infra/docker/build_image.sh [build]   # (default) tools, engine, base, wheelhouse, image; prints IMAGE=moon3:TAG
#   infra/docker/build_image.sh engine    # tools and a running engine only (what the image test needs first)
#   infra/docker/build_image.sh tag       # the tag this tree's image carries (src-<source hash>)
#   infra/docker/build_image.sh stop      # stop the engine this script started (data root and caches stay)
#
# Phases, each timed, each skipped when its result is already there:
#   tools       docker.io (dockerd) and debootstrap from Debian's archive if missing (apt-get, as root)
#   engine      a Docker engine: the one already answering, else `dockerd --iptables=false --bridge=none` with its
#               data root in $MOON3_DOCKER_ROOT (default /var/lib/moon3-docker: kept between runs on one machine)
#   base        moon3-base:<hash of the debootstrap recipe>: Debian bookworm minbase with python3, venv, pip and
#               CA certificates, `docker import`ed (no registry is needed; python:3.11-slim-bookworm elsewhere)
#   wheelhouse  $MOON3_IMAGE_CACHE/wheelhouse-<hash of constraints.txt + pyproject.toml + this recipe>: every
#               wheel the image installs, for CPython 3.11 on manylinux x86_64, torch the CPU build
#   image       moon3:<tag> (and <pipeline.image>:<tag>), `docker build --network none` from the wheelhouse;
#               an image with this tag already in the engine is reused as it is
#
# Environment: PY (python with moon3 importable; default .venv/bin/python), MOON3_DOCKER_ROOT, MOON3_IMAGE_CACHE
# (default /var/cache/moon3-image), TORCH_INDEX (the PyTorch CPU index, tried besides PyPI and pip's own
# find-links), DEBIAN_MIRROR, MOON3_IMAGE_FORCE=1 (rebuild the image even if the tag exists), MOON3_IMAGE_KEEP
# (how many moon3:src-* images to keep, default 3).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
DATA_ROOT=${MOON3_DOCKER_ROOT:-/var/lib/moon3-docker}
CACHE=${MOON3_IMAGE_CACHE:-/var/cache/moon3-image}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
KEEP=${MOON3_IMAGE_KEEP:-3}
WHEELHOUSE=infra/docker/wheelhouse
export DOCKER_BUILDKIT=0  # the legacy builder: no buildx plugin needed, reads the root .dockerignore

# --- timing ------------------------------------------------------------------------------------------------------
TIMES=()
T0=$(date +%s.%N)
phase_start() { PHASE=$1; PHASE_T=$(date +%s.%N); echo "== $PHASE" >&2; }
phase_end() {  # phase_end [note]
    local s
    s=$(awk -v a="$PHASE_T" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    TIMES+=("$(printf '%-10s %7ss  %s' "$PHASE" "$s" "${1:-}")")
    echo "== $PHASE: ${s}s ${1:-}" >&2
}
report() {
    echo "-- phase times --" >&2
    printf '%s\n' "${TIMES[@]}" >&2
    awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "total      %7.1fs\n", b - a }' >&2
}
sha() { sha256sum | cut -c1-12; }

# --- tools ---------------------------------------------------------------------------------------------------------
APT_UPDATED=
apt_install() {  # apt_install PACKAGE...: as root, from Debian's archive
    if [ "$(id -u)" != 0 ]; then
        echo "build_image.sh: '$*' missing and not root: install them (apt-get install $*) or run as root" >&2
        exit 3
    fi
    [ -n "$APT_UPDATED" ] || { apt-get update -qq; APT_UPDATED=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

tools() {
    phase_start tools
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker >/dev/null || missing+=(docker.io)
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
    phase_end "${missing[*]:-present}"
}

# --- engine --------------------------------------------------------------------------------------------------------
engine() {
    phase_start engine
    if docker info >/dev/null 2>&1; then
        phase_end "already running"
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "build_image.sh: no Docker engine answers and only root can start one" >&2
        exit 3
    fi
    mkdir -p "$DATA_ROOT"
    # No iptables and no bridge: this machine may not allow either; containers use --network none or host.
    setsid dockerd --iptables=false --ip-masq=false --bridge=none --data-root "$DATA_ROOT" \
        --pidfile /var/run/moon3-dockerd.pid >>/var/log/moon3-dockerd.log 2>&1 </dev/null &
    local i
    for i in $(seq 120); do
        docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker info >/dev/null 2>&1 || { tail -20 /var/log/moon3-dockerd.log >&2; echo "dockerd did not start" >&2; exit 4; }
    phase_end "started (data root $DATA_ROOT, log /var/log/moon3-dockerd.log)"
}

# --- base image ------------------------------------------------------------------------------------------------------
BASE_SUITE=bookworm
BASE_PACKAGES=python3,python3-venv,python3-pip,ca-certificates
make_base() {  # make_base TAG: debootstrap a minimal bookworm with Python 3.11 and import it
    command -v debootstrap >/dev/null || apt_install debootstrap
    local root
    root=$(mktemp -d /var/tmp/moon3-base.XXXXXX)
    debootstrap --variant=minbase --include="$BASE_PACKAGES" "$BASE_SUITE" "$root" "$DEBIAN_MIRROR" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/* "$root"/var/log/*.log
    tar -C "$root" -c . | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$1" >/dev/null
    rm -rf "$root"
}

base() {
    phase_start base
    # The recipe's hash: make_base as bash prints it (no comments) and its settings.
    BASE_IMAGE=moon3-base:$( { declare -f make_base; echo "$BASE_SUITE $BASE_PACKAGES $DEBIAN_MIRROR"; } | sha)
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        phase_end "$BASE_IMAGE cached"
    else
        # Roots left by an interrupted build (an hour old: not one running now).
        find /var/tmp -maxdepth 1 -name 'moon3-base.*' -mmin +60 -exec rm -rf {} +
        make_base "$BASE_IMAGE"
        phase_end "$BASE_IMAGE built"
    fi
}

# --- wheelhouse ------------------------------------------------------------------------------------------------------
# Every wheel for CPython 3.11 on glibc x86_64 (bookworm: glibc 2.36), whatever Python runs this script. torch
# is asked for as the CPU build (`torch==<pinned>+cpu` from the PyTorch CPU index, or from pip's find-links
# where that index is out of reach): the plain PyPI wheel carries CUDA libraries (~5 GB). DeepSpeed ships only a
# source archive, and so do antlr4-python3-runtime (omegaconf) and kfp-server-api: SDIST_ONLY are built first into
# pure-Python wheels (DeepSpeed without compiled ops, DS_BUILD_OPS=0); the build stops if one is not pure.
SDIST_ONLY="deepspeed antlr4-python3-runtime kfp-server-api"
PLATFORMS="manylinux2014_x86_64 manylinux2010_x86_64 manylinux1_x86_64 $(for v in $(seq 17 36); do printf 'manylinux_2_%s_x86_64 ' "$v"; done)"
make_wheelhouse() {  # make_wheelhouse DIR
    local dir=$1 reqs torch name pin platform_args=()
    reqs=$(mktemp)
    "$PY" -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" >"$reqs"
    torch="$(grep -i '^torch==' constraints.txt)+cpu"
    for p in $PLATFORMS; do platform_args+=(--platform "$p"); done
    local target=(--only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 "${platform_args[@]}")
    for name in $SDIST_ONLY; do
        pin=$(grep -i "^${name}==" constraints.txt)
        DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --wheel-dir "$dir" "$pin"
    done
    if find "$dir" -name '*.whl' ! -name '*-py3-none-any.whl' | grep .; then
        echo "a wheel built from source is not pure Python (above): it would only fit this machine's Python" >&2
        return 1
    fi
    # torch alone from the CPU index (one look-up there, not one per package), then everything from PyPI.
    "$PY" -m pip download -q --no-deps --dest "$dir" "${target[@]}" --extra-index-url "$TORCH_INDEX" "$torch"
    "$PY" -m pip download -q --dest "$dir" --find-links "$dir" "${target[@]}" \
        -c constraints.txt -r "$reqs" "$torch" "setuptools>=68" "wheel>=0.41"
    rm -f "$reqs"
}

wheelhouse() {
    phase_start wheelhouse
    local hash dir
    hash=$( { cat constraints.txt pyproject.toml; declare -f make_wheelhouse; echo "$PLATFORMS $TORCH_INDEX $SDIST_ONLY"; } | sha)
    dir=$CACHE/wheelhouse-$hash
    local note="$dir cached"
    if [ ! -f "$dir/.complete" ]; then
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
        mkdir -p "$CACHE"
        if ! make_wheelhouse "$dir.tmp" >"$CACHE/wheelhouse.log" 2>&1; then
            grep -v "^WARNING: Location 'file:" "$CACHE/wheelhouse.log" | tail -30 >&2
            echo "wheelhouse failed (whole log: $CACHE/wheelhouse.log)" >&2
            exit 5
        fi
        touch "$dir.tmp/.complete" && rm -rf "$dir" && mv "$dir.tmp" "$dir"
        note="$dir built"
        # Keep this wheelhouse and the one before it.
        find "$CACHE" -mindepth 1 -maxdepth 1 -name 'wheelhouse-*' -printf '%T@ %p\n' | sort -rn | tail -n +3 \
            | cut -d' ' -f2- | xargs -r rm -rf
    fi
    # The build context's wheelhouse folder (git-ignored) holds exactly these wheels: hard links, else copies.
    find "$WHEELHOUSE" -mindepth 1 -maxdepth 1 ! -name .gitignore -exec rm -rf {} +
    cp -al "$dir"/*.whl "$WHEELHOUSE"/ 2>/dev/null || cp "$dir"/*.whl "$WHEELHOUSE"/
    phase_end "$note ($(find "$dir" -name '*.whl' | wc -l) wheels, $(du -sh "$dir" | cut -f1))"
}

# --- image -----------------------------------------------------------------------------------------------------------
image_tag() { "$PY" -m moon3.pipelines.version image-tag; }
repository() {  # pipeline.image of params.yaml when it names a repository without a tag
    "$PY" - <<'EOF'
import yaml
image = (yaml.safe_load(open("params.yaml")).get("pipeline") or {}).get("image", "")
last = image.rsplit("/", 1)[-1]
print("" if not image or ":" in last or "@" in image else image)
EOF
}

image() {
    phase_start image
    local tag repo refs=()
    tag=$(image_tag)
    IMAGE=moon3:$tag
    repo=$(repository)
    [ -z "$repo" ] || [ "$repo" = moon3 ] || refs+=("$repo:$tag")
    if [ -z "${MOON3_IMAGE_FORCE:-}" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
        for r in "${refs[@]}"; do docker tag "$IMAGE" "$r"; done
        phase_end "$IMAGE cached"
        return
    fi
    local tag_args=(-t "$IMAGE")
    for r in "${refs[@]}"; do tag_args+=(-t "$r"); done
    mkdir -p "$CACHE"
    if ! docker build --network none --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg PIP_ARGS="--no-index --find-links /wheelhouse" --build-arg CJK_FONTS= \
        --label "org.opencontainers.image.version=$tag" \
        -f infra/docker/Dockerfile "${tag_args[@]}" . >"$CACHE/build.log" 2>&1; then
        tail -40 "$CACHE/build.log" >&2
        echo "docker build failed (whole log: $CACHE/build.log)" >&2
        exit 5
    fi
    # Keep the newest $KEEP moon3:src-* images (they share every layer but the moon3 one).
    docker images moon3 --format '{{.CreatedAt}}\t{{.Repository}}:{{.Tag}}' | grep -F ':src-' | sort -r \
        | tail -n +$((KEEP + 1)) | cut -f2 | while read -r old; do
            [ "$old" = "$IMAGE" ] || docker rmi "$old" "${repo:-moon3}:${old#moon3:}" >/dev/null 2>&1 || true
        done
    # The dependency stage's image is an untagged intermediate (legacy builder): name it, so that pruning the
    # dangling images of earlier builds keeps the layer cache of the next one.
    local deps
    deps=$(awk '/^Step [0-9]+\/[0-9]+ : FROM build AS wheel/ { getline; print $2 }' "$CACHE/build.log")
    if [ -n "$deps" ]; then
        docker tag "$deps" moon3-build-cache:deps
        docker image prune -f >/dev/null
    fi
    phase_end "$IMAGE built"
}

summary() {
    local size
    size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
    echo "image size: $(awk -v s="$size" 'BEGIN { printf "%.2f GB", s / 1e9 }')" >&2
    echo "IMAGE=$IMAGE"
}

stop() {  # stop the engine this script started (its pidfile), if it runs
    local pid
    pid=$(cat /var/run/moon3-dockerd.pid 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    echo "dockerd $pid still runs after 30 s" >&2
}

case "${1:-build}" in
    build) tools; engine; base; wheelhouse; image; report; summary ;;
    engine) tools; engine; report ;;
    tag) image_tag ;;
    stop) stop ;;
    *) echo "usage: $0 [build|engine|tag|stop]" >&2; exit 2 ;;
esac
