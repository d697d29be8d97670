#!/usr/bin/env bash
# Regenerates tests/results.md, the source of the figures README.md and docs/testing.md quote
# about the tests: how many tests `bash scripts/test.sh` and `bash scripts/test.sh --fast` run and
# how long each takes on this machine, and the message a damaged checkpoint of the tiny test model
# gives (docs/cluster.md#checkpoints).
# Usage: bash scripts/measure_tests.sh   (on a quiet machine: the times are wall clock)
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

start=$SECONDS
bash scripts/test.sh 2>&1 | tee "$log"
script_s=$(( SECONDS - start ))
# pytest's last line, e.g. "404 passed, 3 warnings in 117.07s (0:01:57)"
summary=$(grep -E "^[0-9]+ passed" "$log" | tail -n 1)
load=$(cut -d' ' -f1-3 /proc/loadavg)

start=$SECONDS  # second: the environment is set up already, as in an edit loop
bash scripts/test.sh --fast 2>&1 | tee "$log"
fast_s=$(( SECONDS - start ))
fast_summary=$(grep -E "^[0-9]+ passed" "$log" | tail -n 1)
fast_load=$(cut -d' ' -f1-3 /proc/loadavg)

source "${VENV:-.venv}/bin/activate"  # the environment scripts/test.sh set up
message=$(OMP_NUM_THREADS=1 python - <<'EOF' | tail -n 1
"""The tiny model of tests/test_train.py trained 2 steps; its weights file cut in half; the
message verify_checkpoint gives, with the temporary folder left out."""
import tempfile
from pathlib import Path

import train
from checkpoints import CheckpointError, verify_checkpoint
from tests.fixtures import make_image_folder
from tests.test_train import TINY

with tempfile.TemporaryDirectory() as tmp:
    data = make_image_folder(Path(tmp) / "data", per_class=5, size=8)
    exp = train.main(train.parse_args([*TINY, "--data-path", str(data), "--results-dir",
                                       str(Path(tmp) / "results")]))
    folder = exp / "checkpoints" / "step-0000002"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    try:
        verify_checkpoint(folder)
    except CheckpointError as err:
        print(str(err).replace(str(folder.parent), "..."))
EOF
)

cat > tests/results.md <<EOF
# Test suite figures

Written by \`bash scripts/measure_tests.sh\` on $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPU cores;
torch $(python -c "import torch; print(torch.__version__)").

- \`bash scripts/test.sh\` (ruff, then pytest with one worker per core): ${script_s} s in all,
  setup of the virtual environment included; load average ${load} at its end.
- pytest: ${summary}
- \`bash scripts/test.sh --fast\` (the same without the tests marked \`slow\`), run right after:
  ${fast_s} s in all; load average ${fast_load} at its end.
- pytest: ${fast_summary}

The message for a damaged checkpoint (the tiny model of tests/test_train.py, 2 steps, its
model.safetensors cut to half its size), as \`verify_checkpoint\` gives it:

    ${message}
EOF
echo "Wrote tests/results.md"
