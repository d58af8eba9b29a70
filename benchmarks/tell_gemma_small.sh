# The small Gemma CLI check of docs/tell.md (run from the repository root with the venv python on PATH as below).
set -x
S="--nsamples 4 --seqlen 128 --eval wiki:test --eval-rows 2 --te-rank 8 --latency-len 64 --latency-reps 3 --quiet"
PYTHONPATH=src /work/main/.venv/bin/python -m secateurs prune gemma3-270m --method tell --assign uniform --ratio 0.25 $S --out runs/gemma-small-r25 --overwrite
PYTHONPATH=src /work/main/.venv/bin/python -m secateurs explain runs/gemma-small-r25
PYTHONPATH=src /work/main/.venv/bin/python -m secateurs prune gemma3-270m --method tell --assign uniform --speedup 1.3 $S --out runs/gemma-small-s13 --overwrite
PYTHONPATH=src /work/main/.venv/bin/python -m secateurs explain runs/gemma-small-s13
