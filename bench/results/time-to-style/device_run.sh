#!/bin/bash
# issue 17 item 3 on the device: wheels (pre-installed, stripped, xz) + this branch's code from the carried folder,
# a random-weight Klein 9B folder in /tmp/k9 (reused when the machine is still warm), then the serve bench.
set -u
D=$(cd "$(dirname "$0")" && pwd)
MODE=${1:-exact}; shift
T0=$(date +%s)
echo "repo root $PWD; carried $D; mode $MODE; $(date -u)"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
if [ -f /tmp/site/.ok ]; then echo "warm: /tmp/site present"; else
  mkdir -p /tmp/site && tar -xJf "$D/site.tar.xz" -C /tmp/site && touch /tmp/site/.ok || exit 3; fi
rm -rf /tmp/code && mkdir -p /tmp/code && tar -xJf "$D/code.tar.xz" -C /tmp/code || exit 4
export PYTHONPATH=/tmp/site:/tmp/code PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd /tmp/code
echo "[t+$(( $(date +%s) - T0 ))s] installed"
python3 -c "import ray.serve, fastapi, starlette, uvicorn, prometheus_client, python_multipart, diffusers, google.genai; print('imports ok', ray.__version__, diffusers.__version__)" || exit 5
if [ -f /tmp/k9/klein_random.json ]; then echo "warm: /tmp/k9 present"; else
  python3 scripts/make_klein_folder.py /tmp/k9 --size 9b --device cuda 2>&1 | grep -v "it/s" || exit 6; fi
echo "[t+$(( $(date +%s) - T0 ))s] folder ready"
BUDGET=$(( ${LIMIT:-590} - 18 - ($(date +%s) - T0) ))
echo "bench budget ${BUDGET}s"
mkdir -p $OUT/$MODE
python3 bench/time_to_style.py --model /tmp/k9 --out $OUT/$MODE --storage /tmp/tts-$MODE --skip-train --random-lora \
  --serve --accel $MODE --budget-s $BUDGET "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee $OUT/$MODE.log
RC=${PIPESTATUS[0]}
rm -f $OUT/$MODE/serve_config.yaml
echo "[t+$(( $(date +%s) - T0 ))s] bench rc=$RC"
if [ "$RC" != 0 ]; then
  (cd /tmp/ray/session_latest/logs 2>/dev/null && tail -n 200 *Generator*.err *Generator*.out raylet.err 2>/dev/null | tail -c 3000000 > $OUT/$MODE/ray_tail.txt)
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader
exit 0
