# ms-mm environment set-up. Use it sourced, from bash:   source auto_convert.sh
#
# - installs ms-mm (editable, with its pinned dependencies) into the active venv / conda env, or,
#   when none is active, creates .venv in this repository and activates it;
# - sources the Ascend CANN environment when it is installed;
# - exports PYTHONPATH (this repository) and MS_MM_DEVICE_TARGET (Ascend when CANN is present,
#   else CPU);
# - prints the versions and the device on one screen.
# The second time it is quick: pip is skipped while the installed ms-mm version and a hash of
# setup.py match the stamp file in the environment. Errors are reported and the function
# returns; it never exits your shell.

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "ms-mm: note: run this as 'source auto_convert.sh' so the environment stays in your shell"
fi

_ms_mm_setup() {
    local repo py stamp want have
    repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)" || return 1

    # 1. Ascend toolkit (only when installed)
    if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then
        # shellcheck disable=SC1091
        source /usr/local/Ascend/ascend-toolkit/set_env.sh || echo "ms-mm: warning: sourcing the CANN set_env.sh failed"
    fi
    if [ -f /usr/local/Ascend/nnal/atb/set_env.sh ]; then
        # shellcheck disable=SC1091
        source /usr/local/Ascend/nnal/atb/set_env.sh --cxx_abi=0 || true
    fi
    if [ -n "${ASCEND_HOME_PATH:-}" ] || [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then
        export MS_MM_DEVICE_TARGET=Ascend
    else
        export MS_MM_DEVICE_TARGET=CPU
    fi

    # 2. a Python environment: the active venv / conda env, else <repo>/.venv
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -z "${CONDA_PREFIX:-}" ]; then
        if [ ! -f "$repo/.venv/bin/activate" ]; then
            echo "ms-mm: no virtual environment active: creating $repo/.venv"
            python3 -m venv "$repo/.venv" || { echo "ms-mm: error: python3 -m venv $repo/.venv failed"; return 1; }
        fi
        # shellcheck disable=SC1091
        source "$repo/.venv/bin/activate" || { echo "ms-mm: error: cannot activate $repo/.venv"; return 1; }
    fi
    py="$(command -v python)" || { echo "ms-mm: error: no python in the active environment"; return 1; }

    # 3. install unless the stamp says this exact setup.py is installed already
    stamp="$("$py" -c 'import sys; print(sys.prefix)')/.ms_mm_install_stamp"
    want="$("$py" - "$repo/setup.py" <<'EOF'
import hashlib, re, sys
text = open(sys.argv[1], "rb").read()
version = re.search(rb'version="([^"]+)"', text)
print((version.group(1).decode() if version else "?") + " " + hashlib.sha256(text).hexdigest())
EOF
)" || { echo "ms-mm: error: cannot read $repo/setup.py"; return 1; }
    have="$("$py" -c 'import importlib.metadata as m; print(m.version("ms-mm"))' 2>/dev/null)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want $repo" ] && [ "$have" = "${want%% *}" ]; then
        echo "ms-mm: ms-mm $have already installed in $("$py" -c 'import sys; print(sys.prefix)') (setup.py unchanged)"
    else
        echo "ms-mm: installing $repo (editable) into $("$py" -c 'import sys; print(sys.prefix)') ..."
        if ! "$py" -m pip install -q -e "$repo[test]"; then
            echo "ms-mm: error: pip install -e $repo failed (see above); nothing else was changed"
            return 1
        fi
        echo "$want $repo" > "$stamp"
    fi

    # 4. environment
    case ":${PYTHONPATH:-}:" in
        *":$repo:"*) ;;
        *) export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" ;;
    esac

    # 5. one screen of versions (metadata only: importing mindspore/mindformers is slow)
    "$py" - <<'EOF'
import importlib.metadata as m, os, shutil, sys
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "not installed"
print("ms-mm environment")
print(f"  python        {sys.version.split()[0]}  ({sys.prefix})")
for pkg in ("ms-mm", "mindspore", "mindformers", "transformers", "numpy", "safetensors"):
    print(f"  {pkg:<13} {v(pkg)}")
print(f"  msrun         {shutil.which('msrun') or 'not found'}")
print(f"  device        {os.environ.get('MS_MM_DEVICE_TARGET')}  (MS_MM_DEVICE_TARGET)")
print(f"  PYTHONPATH    {os.environ.get('PYTHONPATH')}")
EOF
    return 0
}

if _ms_mm_setup; then
    unset -f _ms_mm_setup
    true
else
    unset -f _ms_mm_setup
    echo "ms-mm: set-up incomplete (your shell is unchanged otherwise)"
    # a non-zero status would close a shell running with `set -e`; report failure only without it
    case "$-" in
        *e*) true ;;
        *) false ;;
    esac
fi
