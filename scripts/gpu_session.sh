#!/usr/bin/env bash
# One device call for a session that has the GPU machine (15 minutes of device time, all starts included): the
# checks of issue 11 in the order of what they decide, each with its own time limit (505 s in all), so that the call
# ends in time with whatever finished in $OUT (stages.txt: each stage's exit code and seconds; at most 8 files come
# back, so the runs' logs are packed into logs.tgz).
#
#   1. bits: the CUDA tests (the Triton kernel, the perturbed forward, the update) against the CPU reference;
#   2. speed: the bench for RoBERTa-large and OPT-1.3B in bf16 (bench.jsonl: one JSON line per model);
#   3. the runs: model=tiny trainer=gpu in fp32 and bf16-true, replayed on the GPU (gpuruns.tgz: replay it on a
#      CPU, the weights_sha256 must match), and two ranks on gloo, one on the GPU and one on the CPU (hetero.log;
#      their summaries, with generator_calls, in logs.tgz).
#
# Prepared here as ../shared/gpu/README.md says (.gpu and .whl in the root, both ignored), then:
#   run(command="bash scripts/gpu_session.sh", carry=[".gpu", ".whl"], timeout_s=540)
# A second call, if the time is left: `bash .gpu/check.sh bench13 profile` (OPT-13B, and where a step's time goes).
set -o pipefail
cd "$(dirname "$0")/.."
O=${OUT:-/tmp/out}
mkdir -p "$O"
if [ ! -f .gpu/check.sh ]; then
  echo "no .gpu/check.sh: copy ../shared/gpu to .gpu and carry it (../shared/gpu/README.md)"
  exit 2
fi

stage() {  # stage NAME SECONDS COMMAND...: the command under its limit; its exit code and time into stages.txt
  # In a session of its own, so that the limit also ends what the harness started under timeouts of its own (each
  # `timeout` makes a process group), and nothing of a stage runs on into the next one. Over the limit: rc=124.
  local name=$1 limit=$2 start=$SECONDS pid over=
  shift 2
  echo "=== $name (limit ${limit} s) $(date +%T)"
  setsid "$@" &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && ((SECONDS - start < limit)); do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name: over its limit of $limit s"
    over=124
    pkill -TERM -s "$pid"
    sleep 5
  fi
  pkill -KILL -s "$pid"
  wait "$pid"
  echo "$name rc=${over:-$?} seconds=$((SECONDS - start))" | tee -a "$O/stages.txt"
}

stage env 30 bash .gpu/check.sh env  # also installs the carried wheels (hydra-core, omegaconf) into /tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HYDRA_FULL_ERROR=1 PYTHONPATH=/tmp/site:$PWD
# The files named: they hold every CUDA case and import neither hydra nor the CLI, so the cases run even if the
# carried wheels did not install.
stage cuda 100 bash -c "set -o pipefail; python3 -m pytest -q -n 4 -p xdist --tb=short -rfEs -k cuda \
  tests/test_codecs.py tests/test_noise.py tests/test_triton.py 2>&1 | tee '$O/cuda.log' | tail -25"
stage bench 190 bash -c "set -o pipefail; python3 -m lightning_zo.bench --model roberta-large --model opt-1.3b 2>&1 \
  | grep -v Warning | tee '$O/bench.jsonl'"
stage train 110 bash .gpu/check.sh train
stage hetero 75 bash .gpu/check.sh hetero
for f in /tmp/hetero/summary.rank*.json; do  # generator_calls: the GPU rank's Triton launches, the CPU rank's C kernel
  [ -f "$f" ] && cp "$f" "$O/hetero_$(basename "$f")"
done
logs=$(cd "$O" && ls train_*.log hetero?.log hetero_summary.rank*.json 2>/dev/null)
[ -n "$logs" ] && tar czf "$O/logs.tgz" -C "$O" $logs && (cd "$O" && rm -f $logs)
cat "$O/stages.txt"
