########## run 1: .device/run1.sh (called as: LIMIT=... bash .device/run1.sh, the folder carried)
#!/bin/bash
# issue 17, device run 1: `klein-style train` at Klein 9B size end to end (bench/time_to_style.py), 500 steps.
# Wheels (stripped, xz) + the branch's code from this carried folder; /tmp/k9 written by make_klein_folder.py.
set -u
D=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
echo "carried $D; $(date -u)"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
mkdir -p /tmp/site && tar -xJf "$D/site.tar.xz" -C /tmp/site || exit 3
rm -rf /tmp/code && mkdir -p /tmp/code && tar -xJf "$D/code.tar.xz" -C /tmp/code || exit 4
export PYTHONPATH=/tmp/site:/tmp/code PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd /tmp/code
echo "[t+$(el)s] unpacked"
# the CLI's import time, measured while the folder is written (the second import: the first compiles the .pyc files)
( for i in 1 2; do python3 -c "import time; t = time.perf_counter(); import cli.main as c; c.build_parser(); import ray, train.job, cluster.pools; print('IMPORT_S', time.perf_counter() - t)"; done > /tmp/import.txt 2>&1 ) &
IMP_PID=$!
python3 scripts/make_klein_folder.py /tmp/k9 --size 9b --device cuda 2>&1 | grep -v "it/s" || exit 6
wait $IMP_PID
tail -3 /tmp/import.txt
IMP=$(grep IMPORT_S /tmp/import.txt | tail -1 | awk '{print $2}')
echo "[t+$(el)s] folder ready; cli import ${IMP}s"
LEFT=$(( ${LIMIT:-590} - 15 - $(el) ))
echo "bench budget ${LEFT}s"
python3 bench/time_to_style.py --model /tmp/k9 --out /tmp/ttsout --storage /tmp/tts --job-id tts-9b --steps 500 \
  --save-every 250 --train-extra '{health: false}' --fresh-compile-dirs /tmp/cc ${IMP:+--cli-import-s $IMP} \
  --budget-s $LEFT "$@" 2>&1 | grep --line-buffered -v "it/s\]" > $OUT/bench.log
echo "[t+$(el)s] bench done"
cp /tmp/ttsout/time_to_style.json /tmp/ttsout/time_to_style.md $OUT/ 2>/dev/null
tail -c 4000000 /tmp/ttsout/train.log > $OUT/train.log 2>/dev/null
ls -la /tmp/tts/compile_cache/ 2>&1
for f in /tmp/tts/compile_cache/*.bin; do [ -f "$f" ] && [ $(stat -c %s "$f") -lt 16000000 ] && cp "$f" $OUT/; done
ls -la /tmp/tts/tenants/default/loras/tts-9b/ /tmp/tts/tenants/default/loras/tts-9b/samples 2>&1 | head -20
cat /tmp/ttsout/time_to_style.md
nvidia-smi --query-gpu=memory.used --format=csv,noheader
exit 0

########## run 2: .device/run2.sh (called as: LIMIT=... bash .device/run2.sh, the folder carried)
#!/bin/bash
# issue 17, device run 2: `klein-style serve` at Klein 9B size, 1 LoRA against 10 in round-robin (resident), fast then exact.
set -u
D=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
echo "carried $D; $(date -u)"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
mkdir -p /tmp/site && tar -xJf "$D/site.tar.xz" -C /tmp/site || exit 3
rm -rf /tmp/code && mkdir -p /tmp/code && tar -xJf "$D/code.tar.xz" -C /tmp/code || exit 4
export PYTHONPATH=/tmp/site:/tmp/code PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd /tmp/code
python3 scripts/make_klein_folder.py /tmp/k9 --size 9b --device cuda 2>&1 | grep -v "it/s" || exit 6
# preflight: the branch's load_pipeline (straight to the GPU) on the 9B folder; the previous commit's code if it fails
python3 -c "
import time, torch
from klein.model import load_pipeline
t = time.time(); p = load_pipeline('/tmp/k9', device='cuda', components=('text_encoder', 'tokenizer'))
print('PREFLIGHT text encoder straight to the GPU', round(time.time() - t, 2), 's', p.text_encoder.device, torch.cuda.max_memory_allocated() >> 20, 'MiB')
" 2>&1 | grep -v "it/s" | tail -3 | tee /tmp/preflight.txt
if ! grep -q PREFLIGHT /tmp/preflight.txt; then
  echo "preflight failed: running the previous commit"; rm -rf /tmp/code && mkdir -p /tmp/code && tar -xJf "$D/code_prev.tar.xz" -C /tmp/code; fi
echo "[t+$(el)s] folder ready"
B1=$(( 350 - $(el) ))
python3 bench/time_to_style.py --model /tmp/k9 --out /tmp/out-fast --storage /tmp/tts-fast --skip-train --random-lora \
  --serve --accel fast --copies-via storage --concurrency 1,4 --phase-images 1:4,4:8 --phase-budget-s 60 \
  --budget-s $B1 2>&1 | grep --line-buffered -v "it/s\]" > $OUT/fast.log
echo "[t+$(el)s] fast done"
B2=$(( ${LIMIT:-590} - 12 - $(el) ))
echo "exact budget ${B2}s"
python3 bench/time_to_style.py --model /tmp/k9 --out /tmp/out-exact --storage /tmp/tts-exact --skip-train --random-lora \
  --serve --accel exact --copies-via storage --concurrency 1,4 --phase-images 1:3,4:4 --phase-budget-s 60 \
  --budget-s $B2 2>&1 | grep --line-buffered -v "it/s\]" > $OUT/exact.log
echo "[t+$(el)s] exact done"
for m in fast exact; do
  cp /tmp/out-$m/time_to_style.json $OUT/$m.json; cp /tmp/out-$m/time_to_style.md $OUT/$m.md
  tail -c 3000000 /tmp/out-$m/serve.log > $OUT/${m}_serve.log; done
cat /tmp/out-fast/time_to_style.md /tmp/out-exact/time_to_style.md
exit 0

########## run 3: .device/run3.sh (called as: LIMIT=... bash .device/run3.sh, the folder carried)
#!/bin/bash
# issue 17, device run 3 (same machine as run 2): the exact serve results left in /tmp, then a priming job and a second
# job with fresh local compile folders: its start-up with the first job's compiled kernels from the job storage.
set -u
D=$(cd "$(dirname "$0")" && pwd)
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
for f in time_to_style.json time_to_style.md; do cp /tmp/out-exact/$f $OUT/exact_$f 2>/dev/null; done
tail -c 2000000 /tmp/out-exact/serve.log > $OUT/exact_serve.log 2>/dev/null
ls /tmp/out-exact /tmp/k9 2>&1 | head -5
[ -f /tmp/site/ray/__init__.py ] || { mkdir -p /tmp/site && tar -xJf "$D/site.tar.xz" -C /tmp/site; }
rm -rf /tmp/code && mkdir -p /tmp/code && tar -xJf "$D/code.tar.xz" -C /tmp/code || exit 4
export PYTHONPATH=/tmp/site:/tmp/code PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd /tmp/code
[ -f /tmp/k9/klein_random.json ] || python3 scripts/make_klein_folder.py /tmp/k9 --size 9b --device cuda 2>&1 | grep -v "it/s"
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
echo "[t+$(el)s] ready"
LEFT=$(( ${LIMIT:-390} - 12 - $(el) ))
python3 bench/time_to_style.py --model /tmp/k9 --out /tmp/out3 --storage /tmp/tts3 --job-id prime --steps 2 --save-every 2 \
  --sample-steps 1 --train-extra '{health: false}' --warm-job-steps 10 --fresh-compile-dirs /tmp/cc3 --cli-import-s 15.5 \
  --budget-s $LEFT 2>&1 | grep --line-buffered -v "it/s\]" > $OUT/warm.log
echo "[t+$(el)s] done"
cp /tmp/out3/time_to_style.json $OUT/warm.json; cp /tmp/out3/time_to_style.md $OUT/warm.md
ls -la /tmp/tts3/compile_cache
cat /tmp/out3/time_to_style.md

########## run 4: .device/run4.sh (called as: LIMIT=... bash .device/run4.sh, the folder carried)
#!/bin/bash
# issue 17, device run 4 (same machine as run 3): a second job on another board, fresh local compile folders, the
# priming job's compiled kernels in the job storage (/tmp/tts3/compile_cache).
set -u
export PYTHONPATH=/tmp/site:/tmp/code PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd /tmp/code
( while true; do cp /tmp/tts3/jobs/warm/status.json $OUT/warm_status.json 2>/dev/null; cp /tmp/out4/time_to_style.json $OUT/ 2>/dev/null; sleep 3; done ) &
python3 bench/time_to_style.py --model /tmp/k9 --out /tmp/out4 --storage /tmp/tts3 --job-id warm --steps 10 --save-every 10 \
  --style neon --sample-steps 1 --train-extra '{health: false}' --fresh-compile-dirs /tmp/cc4 --cli-import-s 15.5 \
  --budget-s ${LEFT:-150} 2>&1 | grep --line-buffered -v "it/s\]" > $OUT/warm2.log
cp /tmp/tts3/jobs/warm/status.json $OUT/warm_status.json
cp /tmp/out4/time_to_style.json /tmp/out4/time_to_style.md $OUT/; cat /tmp/out4/time_to_style.md

