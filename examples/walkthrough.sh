#!/usr/bin/env bash
# The curl walk-through of docs/api.md, runnable: a team key, an upload, a job, its events and its artifacts.
#
#   examples/walkthrough.sh                       (from the repository root, with `make run` going)
#
# Settings (environment): URL (default http://127.0.0.1:8000); ADMIN, an admin key (default: the one `make run`
# wrote to .squeeze/admin_key); OUT, where artifacts go (default: ./walkthrough-out); EXAMPLES, the folder
# holding mlp.pt2 and eval.npz (default: this script's folder). Needs curl and python3 (for reading JSON).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
URL=${URL:-http://127.0.0.1:8000}
ADMIN=${ADMIN:-$(cat .squeeze/admin_key)}
OUT=${OUT:-walkthrough-out}
EXAMPLES=${EXAMPLES:-$HERE}
mkdir -p "$OUT"

# field NAME: prints one top-level field of the JSON object on stdin.
field() { python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
# api ARGS...: curl that fails on an HTTP error status and prints the server's error body.
api() { curl -sS --fail-with-body "$@"; }

# 1. A key for a team (admin only; the secret is shown once, in this answer).
KEY=$(api -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
      -d '{"team": "vision", "name": "walkthrough"}' "$URL/v1/keys" | field key)
AUTH="Authorization: Bearer $KEY"

# 2. Upload the model and an eval set; the answers are the stored objects, their ids captured.
MODEL=$(api -H "$AUTH" --data-binary @"$EXAMPLES/mlp.pt2" "$URL/v1/models?name=mlp.pt2" | field id)
EVAL=$(api -H "$AUTH" --data-binary @"$EXAMPLES/eval.npz" "$URL/v1/datasets?name=eval.npz" | field id)
echo "model $MODEL, eval set $EVAL"

# 3. A job: prune to 50% sparsity, write .pt2 and ONNX, evaluate on the eval set. 202: queued.
JOB=$(api -H "$AUTH" -H 'Content-Type: application/json' -H "Idempotency-Key: walkthrough-$MODEL" \
      -d '{"model_id": "'"$MODEL"'", "datasets": {"eval": "'"$EVAL"'"},
           "recipe": {"steps": [{"type": "prune", "method": "magnitude", "sparsity": 0.5}],
                      "outputs": ["pt2", "onnx"]}}' "$URL/v1/jobs" | field id)
echo "job $JOB queued"

# 4. Follow it: the job object carries status, progress and stage (or stream ?stream=true as server-sent events).
STATUS=queued
for _ in $(seq 600); do
  STATUS=$(api -H "$AUTH" "$URL/v1/jobs/$JOB" | field status)
  case $STATUS in succeeded|failed|canceled) break ;; esac
  sleep 1
done
echo "job $JOB $STATUS"
api -H "$AUTH" "$URL/v1/jobs/$JOB/events" > "$OUT/events.json"
[ "$STATUS" = succeeded ] || { api -H "$AUTH" "$URL/v1/jobs/$JOB"; exit 1; }

# 5. The artifacts: the pruned model and the measured report.
api -H "$AUTH" -o "$OUT/pruned.pt2" "$URL/v1/jobs/$JOB/artifacts/model.pt2"
api -H "$AUTH" -o "$OUT/report.json" "$URL/v1/jobs/$JOB/artifacts/report.json"
api -H "$AUTH" "$URL/v1/jobs/$JOB" > "$OUT/job.json"
echo "wrote $OUT/pruned.pt2, $OUT/report.json, $OUT/job.json and $OUT/events.json"
printf 'KEY=%s MODEL=%s EVAL=%s JOB=%s\n' "$KEY" "$MODEL" "$EVAL" "$JOB"
