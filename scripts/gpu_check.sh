#!/usr/bin/env bash
# Device check, for the occasions a CUDA GPU machine is available (issue 14 item 7,
# issue 15 item 5): runs the CUDA tests and the benchmarks on the GPU in one go and
# prints a short table at the end. One script, one section per area:
#
#   tests  the tests that need CUDA (those that skip without it: `-k cuda` over every
#          test file that asks torch.cuda.is_available()), and on a GPU the LM backend
#          and batcher test files as a whole (HFCausalLM with device="auto" is on CUDA there)
#   lm     bench/bench_lm_batching.py with the Hugging Face backend (a randomly initialised
#          GPT-2 built from a config: nothing downloaded) on cuda: tokens/s of Q = 1, 4, 16
#          concurrent SMC queries one at a time vs through one BatchingLM
#   (other areas add their section here: a function section_NAME and a line in SECTIONS)
#
# Without CUDA it says so, runs the CPU part quickly (the same test selection, where the
# CUDA tests skip, and the LM benchmark with --quick on the CPU) and exits 0 if that
# passes. Usage: scripts/gpu_check.sh [SECTION ...]   (default: every section)
# Environment: PY (default .venv/bin/python), SECTION_TIMEOUT seconds (default 300).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TIMEOUT=${SECTION_TIMEOUT:-300}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SECTIONS=(tests lm)
[ $# -gt 0 ] && SECTIONS=("$@")

CUDA=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
if [ -n "$CUDA" ]; then
    echo "== CUDA device: $CUDA"
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'devices', torch.cuda.device_count())"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "== no CUDA device here (torch.cuda.is_available() is False): running the CPU part quickly"
fi
echo "== load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"

declare -A STATUS FIGURE

section_tests() {
    local files
    files=$(grep -l "cuda.is_available" tests/test_*.py | tr '\n' ' ')
    echo "== tests: -k cuda in: $files"
    timeout "$TIMEOUT" "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda $files 2>&1 | tee "$OUT/tests_cuda.txt"
    local rc=${PIPESTATUS[0]}
    FIGURE[tests]=$(tail -1 "$OUT/tests_cuda.txt")
    if [ -n "$CUDA" ] && [ "$rc" -eq 0 ]; then
        echo "== tests: the LM backend and batcher files, on a machine with CUDA"
        timeout "$TIMEOUT" "$PY" -m pytest -q -p no:cacheprovider tests/test_lm_backends.py tests/test_lm_batcher.py \
            2>&1 | tee "$OUT/tests_lm.txt"
        rc=${PIPESTATUS[0]}
        FIGURE[tests]="${FIGURE[tests]}; LM files: $(tail -1 "$OUT/tests_lm.txt")"
    fi
    return "$rc"
}

section_lm() {
    local args
    if [ -n "$CUDA" ]; then
        args=(--backend hf --device cuda --hf-layers 6 --hf-width 512 --repeats 3 --no-dsl)
    else
        args=(--backend hf --device cpu --quick --repeats 1 --no-dsl)
    fi
    echo "== lm: bench/bench_lm_batching.py ${args[*]}"
    timeout "$TIMEOUT" "$PY" bench/bench_lm_batching.py "${args[@]}" --json "$OUT/lm.json" 2>&1 | tee "$OUT/lm.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] && FIGURE[lm]=$("$PY" - "$OUT/lm.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
parts = []
for q, row in d["figures"]["hf_loop"].items():
    one, bat = row["one at a time"]["tokens_per_s"], row["concurrent, batched"]["tokens_per_s"]
    parts.append(f"Q={q}: {one:,.0f} -> {bat:,.0f} tok/s ({bat / one:.1f}x; {row['cpu_ratio']:.1f}x per CPU s)")
print(f"HF on {d['device']}: " + "; ".join(parts))
EOF
)
    return "$rc"
}

FAILED=0
for s in "${SECTIONS[@]}"; do
    if ! declare -F "section_$s" >/dev/null; then
        echo "== unknown section '$s' (sections: tests lm)"; STATUS[$s]="unknown"; FAILED=1; continue
    fi
    start=$(date +%s)
    if "section_$s"; then STATUS[$s]="ok"; else STATUS[$s]="FAILED"; FAILED=1; fi
    STATUS[$s]="${STATUS[$s]} ($(( $(date +%s) - start )) s)"
done

echo
echo "== device check summary (${CUDA:-no CUDA: CPU part only}; load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
printf '  %-7s %-14s %s\n' section status result
for s in "${SECTIONS[@]}"; do
    printf '  %-7s %-14s %s\n' "$s" "${STATUS[$s]}" "${FIGURE[$s]:-}"
done
echo "  (full output in $OUT)"
exit "$FAILED"
