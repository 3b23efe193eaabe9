#!/usr/bin/env bash
# The GPU check in one command, on a lent GPU machine (bench/gpu/README.md):
#
#     bash bench/gpu/run.sh [gpu_vs_cpu.py options, e.g. --quick]
#
# 1. A Python: $PYTHON as is when set; else the venv .venv-gpu, made with --system-site-packages so
#    that a torch or faiss-gpu the machine already has is seen.
# 2. Installs, each allowed to fail (such a machine may have no registry): the project with its test
#    extra; faiss-gpu==1.15.1 in place of faiss-cpu when faiss sees no GPU; a CUDA torch==2.13.0 when
#    torch has no CUDA. Without pip, a symlink tree on PYTHONPATH stands in for the editable install.
#    Then it prints what it ended up with.
# 3. pytest tests/test_gpu.py (its GPU half runs only where faiss and torch both see a GPU), then
#    bench/gpu/gpu_vs_cpu.py. Everything printed also goes to $OUT (else bench/out/gpu): run.log,
#    pytest.txt, gpu_vs_cpu.txt and gpu_vs_cpu.json. Exit status: non-zero if either step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUTDIR="${OUT:-bench/out/gpu}"
mkdir -p "$OUTDIR"
exec > >(tee -a "$OUTDIR/run.log") 2>&1
say() { echo "== run.sh $(date -u +%H:%M:%S): $*"; }

if [ -n "${PYTHON:-}" ]; then
    PY="$PYTHON"
    say "using PYTHON=$PY as is (no installs)"
else
    VENV=.venv-gpu
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv --system-site-packages "$VENV" || { say "python3 -m venv failed"; exit 1; }
    fi
    PY="$VENV/bin/python"
    pip() { "$PY" -m pip --disable-pip-version-check --retries 0 --timeout 20 -q "$@"; }
    say "installing the project into $VENV (offline: whatever is installed is used)"
    pip install -e ".[test]" || pip install --no-build-isolation -e ".[test]" \
        || pip install --no-build-isolation --no-deps -e . || say "pip install -e . failed"
    if ! "$PY" -c 'import faiss, sys; sys.exit(faiss.get_num_gpus() == 0)' 2>/dev/null; then
        wheels=$(mktemp -d)
        if pip download -d "$wheels" faiss-gpu==1.15.1; then
            pip uninstall -y faiss-cpu
            pip install --no-index --find-links "$wheels" faiss-gpu==1.15.1 \
                || { say "faiss-gpu install failed; back to faiss-cpu"; pip install faiss-cpu==1.15.1; }
        else
            say "faiss-gpu==1.15.1 cannot be downloaded here: keeping the installed faiss"
        fi
    fi
    if ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
        pip install --force-reinstall torch==2.13.0 || say "no CUDA torch could be installed: keeping the installed torch"
    fi
fi
if ! "$PY" -c 'import interlingua.server' 2>/dev/null; then  # the editable install's layout, by hand
    tree=$(mktemp -d)
    mkdir "$tree/interlingua"
    for f in proto/interlingua/*; do ln -s "$PWD/$f" "$tree/interlingua/"; done
    ln -s "$PWD/server" "$tree/interlingua/server"
    ln -s "$PWD/client" "$tree/interlingua/client"
    export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}"
    say "interlingua not installed: importing it from $tree"
fi

say "environment"
"$PY" - <<'EOF' || { say "the Python environment is unusable (see above)"; exit 1; }
import platform
import faiss, numpy, torch
import interlingua.server
print(f"python {platform.python_version()} ({platform.python_implementation()}), numpy {numpy.__version__}")
print(f"faiss {faiss.__version__}: GPU support {hasattr(faiss, 'StandardGpuResources')}, "
      f"{faiss.get_num_gpus()} GPU(s), GpuIndexCagra {hasattr(faiss, 'GpuIndexCagra')}")
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__}: CUDA {torch.version.cuda if cuda else None}, "
      f"{torch.cuda.get_device_name(0) if cuda else 'no CUDA device'}")
print(f"interlingua from {interlingua.server.__file__}")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

status=0
say "pytest tests/test_gpu.py"
"$PY" -m pytest -q -rs -p no:cacheprovider -W ignore::pytest.PytestConfigWarning tests/test_gpu.py 2>&1 | tee "$OUTDIR/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
say "bench/gpu/gpu_vs_cpu.py $*"
"$PY" bench/gpu/gpu_vs_cpu.py --out "$OUTDIR/gpu_vs_cpu.json" "$@" | tee "$OUTDIR/gpu_vs_cpu.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
say "done (status $status); outputs in $OUTDIR"
exit $status
